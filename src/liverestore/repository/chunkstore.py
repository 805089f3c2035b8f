"""Content-addressed chunk store.

Chunks are named by the BLAKE3 hash of their *uncompressed* bytes, so identical blocks from any
disk, VM or restore point are stored once. Every read re-hashes: a repository on flaky secondary
storage must produce an error, never wrong data for a booting VM.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from liverestore.errors import IntegrityError, RepositoryError
from liverestore.repository.backend import Backend, Handle, ObjectMissing
from liverestore.repository.crypto import MasterKey

_ZSTD_LEVEL = 3


def chunk_id(data: bytes | memoryview) -> str:
    """Hex BLAKE3 digest: the chunk's name."""
    return str(blake3.blake3(data).hexdigest())


class ChunkStore:
    """zstd-compressed chunks in a backend, one object per chunk named by its id; in an encrypted
    repository each is sealed after compression and named by the keyed hash."""

    def __init__(self, backend: Backend, key: MasterKey | None = None) -> None:
        self.backend = backend
        self.key = key
        # zstd contexts are not thread-safe; the agent decompresses in worker threads.
        self._local = threading.local()

    @staticmethod
    def handle(cid: str) -> Handle:
        if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
            raise RepositoryError(f"malformed chunk id {cid!r}")
        return Handle("chunks", cid)

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

    def id_of(self, data: bytes | memoryview) -> str:
        """The name ``data`` is stored under in this repository."""
        return self.key.object_id(data) if self.key else chunk_id(data)

    def put(self, data: bytes, cid: str | None = None) -> tuple[str, int]:
        """Store ``data`` unless present; return (chunk id, bytes newly written)."""
        cid = cid or self.id_of(data)
        h = self.handle(cid)
        if self.backend.stat(h) is not None:
            return cid, 0
        blob = self._compressor().compress(data)
        if self.key:
            blob = self.key.seal(blob, f"chunk {cid}")
        self.backend.save(h, blob)
        return cid, len(blob)

    def stored_size(self, cid: str) -> int:
        size = self.backend.stat(self.handle(cid))
        if size is None:
            raise IntegrityError(f"chunk {cid} is missing from the repository")
        return size

    def get(self, cid: str, expected_size: int) -> bytes:
        """Read, decompress and verify one chunk."""
        return self.fetch(cid, expected_size)[0]

    def fetch(self, cid: str, expected_size: int) -> tuple[bytes, int]:
        """(data, stored bytes) of one chunk, verified: one request, however far the store is."""
        try:
            blob = self.backend.load(self.handle(cid))
        except ObjectMissing:
            raise IntegrityError(f"chunk {cid} is missing from the repository") from None
        stored = len(blob)
        if self.key:
            blob = self.key.open(blob, f"chunk {cid}")
        try:
            data = self._decompressor().decompress(blob, max_output_size=expected_size)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {cid} is corrupt (cannot decompress: {e})") from None
        if len(data) != expected_size or self.id_of(data) != cid:
            raise IntegrityError(f"chunk {cid} is corrupt (content does not match its hash)")
        return data, stored

    def iter_ids(self) -> list[str]:
        return list(self.backend.list("chunks"))
