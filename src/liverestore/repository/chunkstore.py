"""Content-addressed chunk store.

Chunks are named by the BLAKE3 hash of their *uncompressed* bytes, so identical blocks from any
disk, VM or restore point are stored once. Every read re-hashes: a repository on flaky secondary
storage must produce an error, never wrong data for a booting VM.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import zstandard

from liverestore.errors import IntegrityError, RepositoryError, RepositoryUnavailable

_ZSTD_LEVEL = 3


def chunk_id(data: bytes | memoryview) -> str:
    """Hex BLAKE3 digest: the chunk's name."""
    return str(blake3.blake3(data).hexdigest())


def write_atomically(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write via a temporary name + rename so a crash never leaves a half file under the real name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class ChunkStore:
    """Directory of zstd-compressed chunks, fanned out by the first two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # zstd contexts are not thread-safe; the agent decompresses in worker threads.
        self._local = threading.local()

    def _path(self, cid: str) -> Path:
        if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
            raise RepositoryError(f"malformed chunk id {cid!r}")
        return self.root / cid[:2] / cid[2:]

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def put(self, data: bytes, cid: str | None = None) -> tuple[str, int]:
        """Store ``data`` unless present; return (chunk id, bytes newly written)."""
        cid = cid or chunk_id(data)
        path = self._path(cid)
        if path.exists():
            return cid, 0
        path.parent.mkdir(exist_ok=True)
        blob = self._compressor().compress(data)
        write_atomically(path, blob)
        return cid, len(blob)

    def stored_size(self, cid: str) -> int:
        try:
            return self._path(cid).stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"chunk {cid} is missing from the repository") from None

    def get(self, cid: str, expected_size: int) -> bytes:
        """Read, decompress and verify one chunk."""
        path = self._path(cid)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            if not self.root.is_dir():  # the whole store is gone: an unmount or outage, not damage
                raise RepositoryUnavailable(f"chunk store {self.root} is unreachable") from None
            raise IntegrityError(f"chunk {cid} is missing from the repository") from None
        except OSError as e:
            raise RepositoryUnavailable(f"chunk {cid} cannot be read: {e.strerror}") from None
        try:
            data = self._decompressor().decompress(blob, max_output_size=expected_size)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {cid} is corrupt (cannot decompress: {e})") from None
        if len(data) != expected_size or chunk_id(data) != cid:
            raise IntegrityError(f"chunk {cid} is corrupt (content does not match its hash)")
        return data

    def iter_ids(self) -> list[str]:
        out: list[str] = []
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                out.extend(sub.name + p.name for p in sub.iterdir() if not p.name.startswith("."))
        return out
