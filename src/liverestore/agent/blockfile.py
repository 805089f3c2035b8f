"""A sparse data file plus a persisted bitmap of which blocks in it are valid.

Used for the read-cache and for the copy-on-write area. Ordering is what keeps it crash-safe:
a bit is set in memory only after its block is written, and the bitmap is saved (atomic rename)
only after the data file is fdatasync'd, so the bitmap on disk never claims a block the data file
does not hold — after ``kill -9`` or a power cut the worst case is refetching a few blocks.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from liverestore.agent.bitmap import Bitmap
from liverestore.errors import LiverestoreError
from liverestore.libc import (
    SYNC_FILE_RANGE_WAIT_AFTER,
    SYNC_FILE_RANGE_WAIT_BEFORE,
    SYNC_FILE_RANGE_WRITE,
    last_error,
    sync_file_range,
)
from liverestore.repository.backend import write_atomically

log = logging.getLogger("liverestore.cache")

_MAGIC = b"LRBITMAP"
_HEADER = struct.Struct(">8s64sQQ")  # magic, identity (manifest id), block count, block size


class BlockFile:
    def __init__(self, data_path: Path, identity: str, size: int, block_size: int) -> None:
        self.data_path = data_path
        self.bitmap_path = data_path.with_suffix(data_path.suffix + ".bitmap")
        self.identity = identity
        self.size = size
        self.block_size = block_size
        self.block_count = -(-size // block_size)
        self.bitmap = Bitmap(self.block_count)  # saved to ``bitmap_path`` by ``persist``
        self.dirty = False
        self.present = 0
        self._persist_lock = threading.Lock()
        # Fetch and copy threads write (and read back) through ``fd`` off the event loop, and may
        # still be at it when the point is released: ``close`` waits for them, and after it they
        # get EBADF, never a write into whatever file the kernel gave the number to next.
        self._users = 0
        self._fd_cond = threading.Condition(threading.Lock())
        try:
            data_path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise LiverestoreError(f"cannot open cache file {data_path}: {e.strerror}") from None
        self.file = open(self.fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 - for sendfile
        self._load()
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)

    def _load(self) -> None:
        try:
            blob = self.bitmap_path.read_bytes()
        except FileNotFoundError:
            blob = b""
        if blob:
            try:
                magic, ident, count, bsize = _HEADER.unpack_from(blob)
                bits = blob[_HEADER.size :]
                ok = (
                    magic == _MAGIC
                    and ident.decode() == self.identity
                    and count == self.block_count
                    and bsize == self.block_size
                    and len(bits) == len(self.bitmap.bits)
                )
            except (struct.error, UnicodeDecodeError):
                ok = False
            if ok:
                self.bitmap.bits[:] = bits
                self.present = self.bitmap.count()
                return
            log.warning("%s does not belong to this disk or is damaged; starting it empty", self.bitmap_path)
        # no valid bitmap: nothing in the data file can be trusted
        os.ftruncate(self.fd, 0)

    def has(self, idx: int) -> bool:
        return self.bitmap.has(idx)

    def mark(self, idx: int) -> None:
        if self.bitmap.set(idx):
            self.present += 1
            self.dirty = True

    def write_block(self, idx: int, data: bytes) -> None:
        self.pwrite(data, idx * self.block_size)
        self.mark(idx)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Safe from any thread, also against ``close`` (see ``_users``)."""
        view = memoryview(data)
        fd = self._enter()
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        finally:
            self._leave()

    def _enter(self) -> int:
        """The descriptor, held open until ``_leave``."""
        with self._fd_cond:
            if self.fd < 0:
                raise OSError(errno.EBADF, f"{self.data_path} is closed")
            self._users += 1
            return self.fd

    def _leave(self) -> None:
        with self._fd_cond:
            self._users -= 1
            if self._users == 0:
                self._fd_cond.notify_all()

    def pread(self, length: int, offset: int) -> bytes:
        data: bytes = os.pread(self.fd, length, offset)
        if len(data) < length:  # a file shorter than the disk reads as zeros past its end
            data += bytes(length - len(data))
        return data

    def read_block(self, idx: int) -> bytes | None:
        """Block ``idx`` as held here, or None when it is not (or the file is closed). Safe from
        any thread, also against ``close`` (a bit, once set, stays set while the file is open)."""
        if not self.has(idx):
            return None
        try:
            fd = self._enter()
        except OSError:
            return None
        try:
            start = idx * self.block_size
            length = min(self.block_size, self.size - start)
            data: bytes = os.pread(fd, length, start)
            return data if len(data) == length else None
        finally:
            self._leave()

    def drop_pages(self, spans: Sequence[tuple[int, int]]) -> None:
        """Write these (offset, length) spans back and let the page cache drop them (see
        dropbehind.py). Only written-back pages are dropped, so no data is lost; durability is
        still ``persist``'s job (write-back is not a flush of the disk's cache)."""
        if sync_file_range is None:
            return
        with self._persist_lock:  # not while ``close`` gives the descriptor back
            if self.fd < 0:
                return
            for offset, length in spans:
                flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                if sync_file_range(self.fd, offset, length, flags) != 0:
                    raise last_error()
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def persist(self) -> None:
        """Safe to call from a worker thread; serialised with ``close`` by ``_persist_lock``."""
        with self._persist_lock:
            if not self.dirty or self.fd < 0:
                return
            self.dirty = False
            bits = bytes(self.bitmap.bits)  # snapshot first: every bit in it has its data written already
            try:
                os.fdatasync(self.fd)
                header = _HEADER.pack(
                    _MAGIC, self.identity.encode().ljust(64, b"\0"), self.block_count, self.block_size
                )
                write_atomically(self.bitmap_path, header + bits, fsync=True)
            except OSError:
                self.dirty = True
                raise

    def close(self) -> None:
        try:
            self.persist()
        finally:
            with self._persist_lock, self._fd_cond:
                self._fd_cond.wait_for(lambda: self._users == 0)
                if self.fd >= 0:
                    self.file.close()
                    os.close(self.fd)
                    self.fd = -1
