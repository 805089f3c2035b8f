"""Per-disk manifest: the block → chunk map that makes a restore point addressable block by block.

Held compactly, because the agent keeps one per disk for as long as it serves: the allocated
block numbers as one array of integers (32-bit once decoded, where the disk allows) and their
chunk ids as one byte string of 32-byte digests — 36 bytes per allocated block and nothing per
hole, so a 1 TiB disk with 8 GiB allocated in 64 KiB blocks costs 4.5 MiB, not a Python string
per block (a tuple of 16 million entries alone was 128 MiB). Stored the same way (format 2: a
JSON header line, then 64-bit block numbers and the ids, zstd-compressed); manifests of format 1
(JSON with one entry per block) still load.
"""

from __future__ import annotations

import bisect
import functools
import json
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import zstandard

from liverestore.errors import IntegrityError

MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 1024 * 1024
ID_BYTES = 32


def check_block_size(block_size: int) -> None:
    """Block sizes are powers of two so block math stays shifts and NBD alignment stays simple."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block size {block_size} is invalid: use a power of two between "
            f"{MIN_BLOCK_SIZE // 1024} KiB and {MAX_BLOCK_SIZE // (1024 * 1024)} MiB"
        )


def _u64(values: Iterable[int] = ()) -> array[int]:
    return array("Q", values)


class DiskManifest:
    """One disk of a restore point: which blocks hold data, and the chunk each one is."""

    def __init__(self, name: str, virtual_size: int, block_size: int,
                 blocks: Iterable[str | None] = (), source_format: str = "raw") -> None:  # fmt: skip
        self.name = name
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.source_format = source_format
        indices, ids = _u64(), bytearray()
        for i, cid in enumerate(blocks):
            if cid is not None:
                indices.append(i)
                ids += bytes.fromhex(cid)
        self._indices = indices
        self._ids: bytes | bytearray = bytes(ids)  # a bytearray when decoded (filled in place)

    @classmethod
    def _from_arrays(cls, name: str, virtual_size: int, block_size: int, source_format: str,
                     indices: array[int], ids: bytes | bytearray) -> DiskManifest:  # fmt: skip
        m = cls(name, virtual_size, block_size, (), source_format)
        m._indices, m._ids = indices, ids
        return m

    # -- lookups -------------------------------------------------------------------------------
    @property
    def block_count(self) -> int:
        return -(-self.virtual_size // self.block_size)

    def block_length(self, index: int) -> int:
        """The last block is short when the disk size is not a multiple of the block size."""
        return min(self.block_size, self.virtual_size - index * self.block_size)

    def position(self, index: int) -> int | None:
        """Where block ``index`` is among the allocated blocks (its row in per-block tables), or
        None for a hole / all-zero block."""
        k = bisect.bisect_left(self._indices, index)
        return k if k < len(self._indices) and self._indices[k] == index else None

    def chunk(self, index: int) -> str | None:
        """The chunk id of block ``index``, or None for a hole / all-zero block."""
        k = self.position(index)
        return None if k is None else self._ids[k * ID_BYTES : (k + 1) * ID_BYTES].hex()

    @property
    def raw_ids(self) -> bytes | bytearray:
        """Every allocated block's 32-byte chunk id, end to end, as held (do not modify)."""
        return self._ids

    def raw_id(self, position: int) -> bytes:
        """The 32-byte chunk id of the allocated block at ``position`` (see ``position``)."""
        return bytes(self._ids[position * ID_BYTES : (position + 1) * ID_BYTES])

    @functools.cached_property
    def _allocation(self) -> bytearray:
        bits = bytearray(-(-self.block_count // 8))
        for i in self._indices:
            bits[i >> 3] |= 1 << (i & 7)
        return bits

    def is_allocated(self, index: int) -> bool:
        """O(1): the agent asks for every block of every read (a bit per block of the disk)."""
        return bool(self._allocation[index >> 3] & (1 << (index & 7)))

    def allocated_blocks(self) -> Iterator[int]:
        return iter(self._indices)

    @property
    def allocated_index(self) -> Sequence[int]:
        """The allocated block numbers, ascending, as held (no copy: do not modify)."""
        return self._indices

    def chunks(self) -> Iterator[tuple[int, str]]:
        """(block, chunk id) of every allocated block, ascending."""
        ids = self._ids
        for k, i in enumerate(self._indices):
            yield i, ids[k * ID_BYTES : (k + 1) * ID_BYTES].hex()

    def chunk_ids(self) -> set[str]:
        return {cid for _, cid in self.chunks()}

    @property
    def blocks(self) -> BlockView:
        """Every block's chunk id or None, as a read-only sequence computed on access."""
        return BlockView(self)

    @property
    def allocated_count(self) -> int:
        return len(self._indices)

    @property
    def allocated_bytes(self) -> int:
        n = len(self._indices)
        if n and self._indices[-1] == self.block_count - 1:
            return (n - 1) * self.block_size + self.block_length(self.block_count - 1)
        return n * self.block_size

    def memory_bytes(self) -> int:
        """What this manifest holds in memory (the benchmarks check it stays per allocated block)."""
        alloc = len(self._allocation) if "_allocation" in self.__dict__ else 0
        return self._indices.itemsize * len(self._indices) + len(self._ids) + alloc

    # -- storage -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {"version": 2, "name": self.name, "virtual_size": self.virtual_size, "block_size": self.block_size,
                  "source_format": self.source_format, "allocated": len(self._indices)}  # fmt: skip
        indices = array("Q", self._indices)
        if sys.byteorder != "little":
            indices.byteswap()
        doc = json.dumps(header).encode() + b"\n" + indices.tobytes() + self._ids
        return bytes(zstandard.ZstdCompressor(level=9).compress(doc))

    @classmethod
    def from_bytes(cls, blob: bytes, label: str) -> DiskManifest:
        """Decoded as a stream straight into the two arrays: decompressing the whole document
        first held it, its body and the arrays at once (about 150 bytes a block at the peak, the
        agent's peak RSS on a large disk), where streaming holds the arrays and the blob alone."""
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(blob)
            head = bytearray()
            while b"\n" not in head and len(head) < _MAX_HEADER:
                more = reader.read(64 * 1024)
                if not more:
                    break
                head += more
            header_line, newline, rest = bytes(head).partition(b"\n")
            header = json.loads(header_line if newline else bytes(head) + reader.read())
            if header.get("version", 1) == 1:
                blocks = _v1_blocks(header["blocks"])
                m = cls(str(header["name"]), int(header["virtual_size"]), int(header["block_size"]), blocks,
                        str(header.get("source_format", "raw")))  # fmt: skip
                if len(blocks) != m.block_count:
                    raise ValueError("block table length")
            else:
                n, count = int(header["allocated"]), -(-int(header["virtual_size"]) // max(1, int(header["block_size"])))
                if not newline or not 0 <= n <= count:
                    raise ValueError("block table length")
                indices = _read_indices(reader, rest, n, count)
                ids = bytearray(n * ID_BYTES)
                _fill(reader, indices.leftover, memoryview(ids))
                m = cls._from_arrays(str(header["name"]), int(header["virtual_size"]), int(header["block_size"]),
                                     str(header.get("source_format", "raw")), indices.numbers, ids)  # fmt: skip
        except (zstandard.ZstdError, ValueError, KeyError, TypeError, OverflowError) as e:
            raise IntegrityError(f"manifest {label} is unreadable ({type(e).__name__})") from None
        count = m.block_count if m.block_size > 0 else -1
        idx = m._indices
        if (count < 0 or any(idx[k] >= idx[k + 1] for k in range(len(idx) - 1))
                or (len(idx) and idx[-1] >= count)):  # fmt: skip
            raise IntegrityError(f"manifest {label} is inconsistent (block table does not match its size)")
        return m


_MAX_HEADER = 1 << 20  # a format-2 header line is a few hundred bytes


def _fill(reader: zstandard.ZstdDecompressionReader, start: bytes | memoryview, view: memoryview) -> None:
    """Fill ``view`` from ``start`` and then ``reader``; the stream must end exactly where the
    view does (a short or long block table is damage)."""
    pending = memoryview(start)
    pos = min(len(pending), len(view))
    view[:pos] = pending[:pos]
    pending = pending[pos:]
    while pos < len(view):
        got = reader.readinto(view[pos:])
        if got <= 0:
            raise ValueError("block table length")
        pos += got
    if len(pending) or reader.read(1):
        raise ValueError("block table length")


@dataclass
class _Indices:
    numbers: array[int]
    leftover: memoryview  # what was read past the block numbers: the start of the ids


def _read_indices(reader: zstandard.ZstdDecompressionReader, start: bytes, n: int, block_count: int) -> _Indices:
    """The ``n`` stored 64-bit block numbers, held as 32-bit ones where the disk's block count
    allows (always, below 256 TiB at 64 KiB blocks): 36 bytes a block instead of 40. Read in
    slices, so the 64-bit form never exists whole."""
    numbers = array("I" if block_count <= 1 << 32 else "Q")
    buf, left = bytearray(start), 8 * n
    while left:
        take = min(64 * 1024, left)
        while len(buf) < take:
            more = reader.read(take - len(buf))
            if not more:
                raise ValueError("block table length")
            buf += more
        part = array("Q")
        part.frombytes(bytes(buf[:take]))
        del buf[:take]
        if sys.byteorder != "little":
            part.byteswap()
        numbers.fromlist(part.tolist())  # a number past the block count is caught by the caller's check
        left -= take
    return _Indices(numbers, memoryview(bytes(buf)))


def _v1_blocks(blocks: object) -> list[str | None]:
    if not isinstance(blocks, list) or any(c is not None and not isinstance(c, str) for c in blocks):
        raise TypeError("block table")
    return blocks


class BlockView(Sequence["str | None"]):
    """``manifest.blocks``: block i's chunk id or None, without holding one entry per block."""

    def __init__(self, manifest: DiskManifest) -> None:
        self._m = manifest

    def __len__(self) -> int:
        return self._m.block_count

    @overload
    def __getitem__(self, index: int) -> str | None: ...
    @overload
    def __getitem__(self, index: slice) -> list[str | None]: ...
    def __getitem__(self, index: int | slice) -> str | list[str | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._m.chunk(index)

    def __iter__(self) -> Iterator[str | None]:
        nxt = 0
        for i, cid in self._m.chunks():
            yield from (None for _ in range(nxt, i))
            yield cid
            nxt = i + 1
        yield from (None for _ in range(nxt, len(self)))
