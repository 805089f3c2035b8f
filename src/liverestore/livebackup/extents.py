"""Which blocks of a live disk to read: its allocation map and, for an incremental backup, its
dirty bitmap, both asked of QEMU's NBD export and reduced to one flag per repository block.

A block is read when some byte of it may be non-zero (``base:allocation`` without the ZERO flag)
and, in an incremental backup, when the guest wrote to it since the checkpoint
(``qemu:dirty-bitmap:backup-<disk>``). Neighbouring blocks are read in one request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from liverestore.agent.nbd import protocol as p
from liverestore.nbdclient import DIRTY, NbdClientError, NbdReader

STATUS_SPAN = 1 << 30  # one BLOCK_STATUS request asks about at most 1 GiB
READ_SPAN = 2 * 1024 * 1024  # neighbouring blocks are read together, up to this many bytes


def dirty_context(export: str) -> str:
    """The meta context libvirt gives an incremental backup's bitmap (its default exportbitmap)."""
    return f"qemu:dirty-bitmap:backup-{export}"


@dataclass
class BlockMap:
    """One byte per block: ``data[i]`` — may hold non-zero bytes; ``dirty[i]`` — written since
    the checkpoint (``None``: a full backup, everything counts as written)."""

    size: int
    block_size: int
    data: bytearray
    dirty: bytearray | None

    @property
    def count(self) -> int:
        return len(self.data)

    def to_read(self, idx: int) -> bool:
        return bool(self.data[idx]) and (self.dirty is None or bool(self.dirty[idx]))

    def zeroed(self, idx: int) -> bool:
        """Written since the checkpoint and now all zeros (discarded): no longer the old block."""
        return self.dirty is not None and bool(self.dirty[idx]) and not self.data[idx]


def _mark(flags: bytearray, offset: int, length: int, bs: int) -> None:
    first, end = offset // bs, min(len(flags), -(-(offset + length) // bs))
    flags[first:end] = b"\x01" * (end - first)


def map_blocks(reader: NbdReader, block_size: int, dirty_ctx: str | None) -> BlockMap:
    size, count = reader.size, -(-reader.size // block_size)
    alloc_id = reader.contexts.get(p.BASE_ALLOCATION)
    if alloc_id is None:
        raise NbdClientError(f"the NBD export {reader.export!r} offers no {p.BASE_ALLOCATION} map")
    dirty_id = None
    if dirty_ctx is not None:
        dirty_id = reader.contexts.get(dirty_ctx)
        if dirty_id is None:
            raise NbdClientError(f"the NBD export {reader.export!r} offers no {dirty_ctx} bitmap")
    bmap = BlockMap(size, block_size, bytearray(count), None if dirty_id is None else bytearray(count))
    wanted = {alloc_id} | ({dirty_id} if dirty_id is not None else set())
    pos = 0
    while pos < size:
        got = reader.block_status(pos, min(size - pos, STATUS_SPAN))
        if set(got) != wanted:
            raise NbdClientError(f"the NBD export {reader.export!r} answered block status without all its maps")
        ends = []
        for ctx, extents in got.items():
            at = pos
            for length, flags in extents:
                if ctx == alloc_id and not flags & p.STATE_ZERO:
                    _mark(bmap.data, at, length, block_size)
                elif ctx == dirty_id and flags & DIRTY and bmap.dirty is not None:
                    _mark(bmap.dirty, at, length, block_size)
                at += length
            ends.append(at)
        if min(ends) <= pos:
            raise NbdClientError(f"the NBD export {reader.export!r} reported no extent at offset {pos}")
        pos = min(ends)
    return bmap


def read_runs(bmap: BlockMap) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` requests covering every block to read, neighbours joined."""
    bs, per_run = bmap.block_size, max(1, READ_SPAN // bmap.block_size)
    idx = 0
    while idx < bmap.count:
        if not bmap.to_read(idx):
            idx += 1
            continue
        start = idx
        while idx < bmap.count and idx - start < per_run and bmap.to_read(idx):
            idx += 1
        yield start * bs, min(idx * bs, bmap.size) - start * bs


def read_blocks(reader: NbdReader, bmap: BlockMap) -> Iterator[tuple[int, bytes]]:
    """``(block index, data)`` of every block to read, in disk order."""
    bs = bmap.block_size
    for offset, buf in reader.read_ranges(read_runs(bmap)):
        view = memoryview(buf)
        for k in range(0, len(buf), bs):
            yield (offset + k) // bs, bytes(view[k : k + bs])
