"""Per-disk manifest: the block → chunk map that makes a restore point addressable block by block."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from liverestore.errors import IntegrityError

MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 1024 * 1024


def check_block_size(block_size: int) -> None:
    """Block sizes are powers of two so block math stays shifts and NBD alignment stays simple."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block size {block_size} is invalid: use a power of two between "
            f"{MIN_BLOCK_SIZE // 1024} KiB and {MAX_BLOCK_SIZE // (1024 * 1024)} MiB"
        )


@dataclass(frozen=True)
class DiskManifest:
    """One disk of a restore point. ``blocks[i]`` is a chunk id, or None for an all-zero block."""

    name: str
    virtual_size: int
    block_size: int
    blocks: tuple[str | None, ...]
    source_format: str = "raw"

    @property
    def block_count(self) -> int:
        return len(self.blocks)

    def block_length(self, index: int) -> int:
        """The last block is short when the disk size is not a multiple of the block size."""
        return min(self.block_size, self.virtual_size - index * self.block_size)

    def allocated_blocks(self) -> Iterator[int]:
        return (i for i, c in enumerate(self.blocks) if c is not None)

    @functools.cached_property
    def allocated_count(self) -> int:
        """Counted once: progress displays ask for it twice a second."""
        return sum(c is not None for c in self.blocks)

    @property
    def allocated_bytes(self) -> int:
        return sum(self.block_length(i) for i in self.allocated_blocks())

    def to_bytes(self) -> bytes:
        doc = {
            "version": 1,
            "name": self.name,
            "virtual_size": self.virtual_size,
            "block_size": self.block_size,
            "source_format": self.source_format,
            "blocks": list(self.blocks),
        }
        return bytes(zstandard.ZstdCompressor(level=9).compress(json.dumps(doc).encode()))

    @classmethod
    def from_bytes(cls, blob: bytes, label: str) -> DiskManifest:
        try:
            doc = json.loads(zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 30))
            m = cls(
                name=str(doc["name"]),
                virtual_size=int(doc["virtual_size"]),
                block_size=int(doc["block_size"]),
                blocks=tuple(doc["blocks"]),
                source_format=str(doc.get("source_format", "raw")),
            )
        except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"manifest {label} is unreadable ({type(e).__name__})") from None
        expected = -(-m.virtual_size // m.block_size) if m.block_size > 0 else -1
        if expected != len(m.blocks) or any(c is not None and not isinstance(c, str) for c in m.blocks):
            raise IntegrityError(f"manifest {label} is inconsistent (block table does not match its size)")
        return m
