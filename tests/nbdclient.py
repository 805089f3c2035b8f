"""A minimal blocking NBD client for tests: lets a test speak the protocol byte by byte, including
the malformed bits no well-behaved client (qemu, libnbd) will send."""

from __future__ import annotations

import socket
import struct

from liverestore.agent.nbd import protocol as p


class NbdError(Exception):
    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(f"NBD error {errno}: {message}")
        self.errno = errno


class NbdClient:
    def __init__(
        self, host: str, port: int, export: str, structured: bool = True, timeout: float = 30
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.handle = 0
        magic, opt, _flags = struct.unpack(">8sQH", self._recv(18))
        assert magic == p.NBDMAGIC and opt == p.IHAVEOPT, "bad greeting"
        self.sock.sendall(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))
        self.structured = False
        if structured:
            rtype, _ = self.option(p.OPT_STRUCTURED_REPLY, b"")
            self.structured = rtype == p.REP_ACK
            q = p.BASE_ALLOCATION.encode()
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q
            replies = self.option_all(p.OPT_SET_META_CONTEXT, data)
            self.base_allocation = any(r == p.REP_META_CONTEXT for r, _ in replies)
        name = export.encode()
        replies = self.option_all(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        if replies[-1][0] != p.REP_ACK:
            raise NbdError(replies[-1][0] & 0xFF, replies[-1][1].decode(errors="replace"))
        info = next(
            d for r, d in replies if r == p.REP_INFO and struct.unpack(">H", d[:2])[0] == p.INFO_EXPORT
        )
        _, self.size, self.flags = struct.unpack(">HQH", info)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def option(self, opt: int, data: bytes) -> tuple[int, bytes]:
        self.sock.sendall(struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data)
        return self._option_reply()

    def _option_reply(self) -> tuple[int, bytes]:
        magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        assert magic == p.OPT_REPLY_MAGIC
        return rtype, self._recv(length)

    def option_all(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        out = [self.option(opt, data)]
        while out[-1][0] not in (p.REP_ACK,) and not out[-1][0] & p.REP_FLAG_ERROR:
            out.append(self._option_reply())
        return out

    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> int:
        self.handle += 1
        hdr = p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, flags, cmd, self.handle, offset, length)
        self.sock.sendall(hdr + payload)
        return self.handle

    def reply(self, length_hint: int = 0) -> tuple[int, bytes, list[tuple[int, int]]]:
        """(handle, data, block-status extents) of the next complete reply; raises NbdError."""
        magic = struct.unpack(">I", self._recv(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self._recv(12))
            if err:
                raise NbdError(err)
            return handle, self._recv(length_hint) if length_hint else b"", []
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, extents = bytearray(), []
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self._recv(16))
            body = self._recv(length)
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
                data += bytes(struct.unpack(">QI", body)[1])
            elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
                extents += [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((length - 4) // 8)]
            elif rtype & 0x8000:
                err, mlen = struct.unpack_from(">IH", body)
                raise NbdError(err, body[6 : 6 + mlen].decode(errors="replace"))
            if flags & p.REPLY_FLAG_DONE:
                return handle, bytes(data), extents
            magic = struct.unpack(">I", self._recv(4))[0]

    def read(self, offset: int, length: int) -> bytes:
        self.request(p.CMD_READ, offset, length)
        return self.reply(length if not self.structured else 0)[1]

    def write(self, offset: int, data: bytes) -> None:
        self.request(p.CMD_WRITE, offset, len(data), data)
        self.reply()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self.request(p.CMD_BLOCK_STATUS, offset, length)
        return self.reply()[2]

    def close(self) -> None:
        try:
            self.request(p.CMD_DISC, 0, 0)
        finally:
            self.sock.close()
