"""A small blocking NBD client for reading exports other programs serve: QEMU's frozen backup view
of a running disk, with its allocation map and dirty bitmap.

Only what reading a backup needs: fixed-newstyle handshake, structured replies, meta contexts
(``base:allocation``, ``qemu:dirty-bitmap:...``), BLOCK_STATUS and pipelined READs. Counting
the bytes requested is part of the job: an incremental backup is judged by how little it reads.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from liverestore.agent.nbd import protocol as p
from liverestore.errors import LiverestoreError

DIRTY = 1  # the one flag of a qemu:dirty-bitmap: context


class NbdClientError(LiverestoreError):
    """The server refused, answered out of protocol, or went away."""


@dataclass
class _Pending:
    offset: int
    buf: bytearray
    done: bool = False


@dataclass
class NbdReader:
    """One connection to one export; not thread-safe (one reader per thread)."""

    sock: socket.socket
    export: str
    size: int = 0
    contexts: dict[str, int] = field(default_factory=dict)  # negotiated meta context → its id
    bytes_read: int = 0
    requests: int = 0
    _handle: int = 0

    @classmethod
    def connect_unix(cls, path: Path, export: str, meta_contexts: Iterable[str] = (),
                     timeout: float = 120) -> NbdReader:  # fmt: skip
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise NbdClientError(f"cannot connect to the NBD export at {path}: {e.strerror or e}") from None
        reader = cls(sock, export)
        try:
            reader._handshake(list(meta_contexts))
        except (OSError, struct.error) as e:
            sock.close()
            raise NbdClientError(f"NBD handshake with {path} failed: {e}") from None
        except NbdClientError:
            sock.close()
            raise
        return reader

    # -- handshake -----------------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise NbdClientError(f"the NBD server of export {self.export!r} closed the connection")
            got += k
        return bytes(buf)

    def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        self.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            if magic != p.OPT_REPLY_MAGIC:
                raise NbdClientError("NBD server sent a malformed option reply")
            replies.append((rtype, self._recv(length)))
            if rtype == p.REP_ACK or rtype & p.REP_FLAG_ERROR:
                return replies

    def _handshake(self, meta_contexts: list[str]) -> None:
        magic, opt, _flags = struct.unpack(">8sQH", self._recv(18))
        if magic != p.NBDMAGIC or opt != p.IHAVEOPT:
            raise NbdClientError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))
        if self._option(p.OPT_STRUCTURED_REPLY, b"")[-1][0] != p.REP_ACK:
            raise NbdClientError("the NBD server does not offer structured replies")
        name = self.export.encode()
        if meta_contexts:
            queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in meta_contexts)
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts)) + queries
            for rtype, body in self._option(p.OPT_SET_META_CONTEXT, data):
                if rtype == p.REP_META_CONTEXT:
                    self.contexts[body[4:].decode()] = struct.unpack(">I", body[:4])[0]
        replies = self._option(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        rtype, body = replies[-1]
        if rtype != p.REP_ACK:
            why = body[4:].decode(errors="replace") if len(body) > 4 else body.decode(errors="replace")
            raise NbdClientError(f"the NBD server refused export {self.export!r}: {why or hex(rtype)}")
        for rtype, body in replies:
            if rtype == p.REP_INFO and struct.unpack(">H", body[:2])[0] == p.INFO_EXPORT:
                _, self.size, _tflags = struct.unpack(">HQH", body[:12])

    # -- transmission --------------------------------------------------------------------------
    def _request(self, cmd: int, offset: int, length: int) -> int:
        self._handle += 1
        self.sock.sendall(p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, cmd, self._handle, offset, length))
        self.requests += 1
        return self._handle

    def _chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of the next structured reply chunk."""
        magic = struct.unpack(">I", self._recv(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:  # allowed for errors even with structured replies
            err, handle = struct.unpack(">IQ", self._recv(12))
            if err:
                return p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, handle, struct.pack(">IH", err, 0)
            return p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, handle, b""
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise NbdClientError(f"NBD server sent a reply with bad magic {magic:#x}")
        flags, rtype, handle, length = struct.unpack(">HHQI", self._recv(16))
        return flags, rtype, handle, self._recv(length)

    @staticmethod
    def _raise(what: str, body: bytes) -> None:
        err, mlen = struct.unpack_from(">IH", body)
        msg = body[6 : 6 + mlen].decode(errors="replace")
        raise NbdClientError(f"NBD {what} failed: errno {err}{': ' + msg if msg else ''}")

    def block_status(self, offset: int, length: int) -> dict[int, list[tuple[int, int]]]:
        """Extents ``(length, flags)`` per negotiated context id, from ``offset`` on."""
        handle = self._request(p.CMD_BLOCK_STATUS, offset, length)
        out: dict[int, list[tuple[int, int]]] = {}
        while True:
            flags, rtype, got, body = self._chunk()
            if got != handle:
                raise NbdClientError("NBD server answered a request that was not asked")
            if rtype == p.REPLY_TYPE_BLOCK_STATUS:
                ctx = struct.unpack_from(">I", body)[0]
                n = (len(body) - 4) // 8
                out[ctx] = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range(n)]
            elif rtype & 0x8000:
                self._raise(f"block status at {offset}", body)
            if flags & p.REPLY_FLAG_DONE:
                return out

    def read_ranges(self, ranges: Iterable[tuple[int, int]], depth: int = 8) -> Iterator[tuple[int, bytearray]]:
        """``(offset, data)`` for each ``(offset, length)``, in order, with ``depth`` requests in
        flight. Holes the server reports come back as zeros without crossing the wire."""
        pending: dict[int, _Pending] = {}
        order: list[int] = []
        it = iter(ranges)
        exhausted = False
        while True:
            while not exhausted and len(pending) < depth:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                off, length = nxt
                h = self._request(p.CMD_READ, off, length)
                self.bytes_read += length
                pending[h] = _Pending(off, bytearray(length))
                order.append(h)
            if not order:
                return
            while not pending[order[0]].done:
                self._read_chunk_into(pending)
            head = pending.pop(order.pop(0))
            yield head.offset, head.buf

    def _read_chunk_into(self, pending: dict[int, _Pending]) -> None:
        flags, rtype, handle, body = self._chunk()
        req = pending.get(handle)
        if req is None:
            raise NbdClientError("NBD server answered a read that was not asked")
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            at = struct.unpack_from(">Q", body)[0] - req.offset
            if at < 0 or at + len(body) - 8 > len(req.buf):
                raise NbdClientError("NBD server sent data outside the range asked for")
            req.buf[at : at + len(body) - 8] = body[8:]
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            pass  # the buffer starts zeroed
        elif rtype & 0x8000:
            self._raise(f"read at {req.offset}", body)
        if flags & p.REPLY_FLAG_DONE:
            req.done = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self.sock.close()
