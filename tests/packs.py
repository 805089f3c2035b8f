"""Where a chunk's stored bytes are on disk, for tests that damage a local repository on purpose."""

from __future__ import annotations

from pathlib import Path

from liverestore.repository import Repository
from liverestore.repository.backend import Handle, LocalBackend


def chunk_file(repo: Repository, cid: str) -> tuple[Path, int, int]:
    """(pack file, offset, length) of a chunk of a local repository."""
    where = repo.chunks.reload().get(cid)
    assert where is not None and where.pack is not None and isinstance(repo.backend, LocalBackend)
    return repo.backend.path(Handle("packs", where.pack)), where.offset, where.length


def flip_chunk_byte(repo: Repository, cid: str, at: float = 0.5, mask: int = 0xFF) -> Path:
    """Flip bits of one byte inside the chunk (``at``: where, as a fraction of its length)."""
    path, offset, length = chunk_file(repo, cid)
    with open(path, "r+b") as f:
        f.seek(offset + int(length * at))
        b = f.read(1)[0]
        f.seek(offset + int(length * at))
        f.write(bytes([b ^ mask]))
    return path


def stored_bytes(repo: Repository, cid: str) -> bytes:
    path, offset, length = chunk_file(repo, cid)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
