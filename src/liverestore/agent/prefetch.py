"""Prefetchers that feed the scheduler: background copy (set 2) and relocation-ahead (set 3).

Set 3 watches the mirror's cursor through the reads the agent itself serves — QEMU's mirror
reads the source strictly ascending in 1 MiB requests, far larger than any guest read during
normal running — and keeps the cache a window of blocks ahead of it. QEMU's job progress is no
use for this: it counts skipped holes too, so it says nothing about where the reads are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from liverestore.agent.export import DiskExport
from liverestore.agent.scheduler import FetchClass

log = logging.getLogger("liverestore.prefetch")

MIRROR_READ_MIN = 512 * 1024  # reads at least this long are taken to be the mirror's


BACKGROUND_WINDOW = 256  # set 2's blocks queued at once: enough to fill idle slots, not the disk


def relocation_order(export: DiskExport) -> Sequence[int]:
    """The order the mirror will copy in: allocated blocks, ascending (the manifest's own array)."""
    return export.manifest.allocated_index


def start_background(export: DiskExport) -> int:
    """Set 2: copy every block not yet cached, in relocation order, at the lowest priority; the
    number of blocks it will copy. It streams: at most ``BACKGROUND_WINDOW`` blocks are queued at
    a time, so memory does not grow with the disk (one queued fetch per block of a 1 TiB disk
    would be gigabytes)."""
    todo = sum(1 for i in relocation_order(export) if not export.present(i))
    if todo:
        export.run_in_background(_copy_in_order(export))
    return todo


async def _copy_in_order(export: DiskExport) -> None:
    outstanding: set[asyncio.Future[None]] = set()
    for idx in relocation_order(export):
        if export.present(idx):
            continue
        outstanding.update(export.prefetch((idx,), FetchClass.PREFETCH))
        if len(outstanding) >= BACKGROUND_WINDOW:
            _, outstanding = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
    if outstanding:
        await asyncio.wait(outstanding)


WINDOW_MIN_BLOCKS = 64
WINDOW_MIN_BYTES = 16 * 1024 * 1024  # a 50 ms, 1 Gbit/s link holds 6 MB in flight: room for that


class RelocationPrefetcher:
    """Set 3. It tops the window up in batches (when half of it has been consumed), not a block
    per mirror read: a batch's blocks reach the fetcher together, so neighbours in a pack go out
    as one ranged read."""

    def __init__(self, export: DiskExport, window_blocks: int | None = None) -> None:
        self.export = export
        self.window = window_blocks or max(WINDOW_MIN_BLOCKS, WINDOW_MIN_BYTES // export.block_size)
        self.cursor = 0  # byte offset just past the highest mirror read seen
        self.issued = 0
        self.ahead_to = -1
        self._moved = asyncio.Event()
        self._last_log = 0.0

    def observe(self, offset: int, length: int) -> None:
        if length >= MIRROR_READ_MIN and offset + length > self.cursor:
            self.cursor = offset + length
            self._moved.set()

    async def run(self) -> None:
        self.export.read_observers.append(self.observe)
        readahead = self.export.readahead
        if readahead is not None:  # this walk already fetches ahead of the mirror
            readahead.paused = True
        try:
            order = relocation_order(self.export)
            pos, planned = 0, -1  # planned: the highest block number the window has covered
            bs = self.export.block_size
            while pos < len(order):
                limit = self.cursor // bs + self.window
                batch = []
                if planned < 0 or limit - planned >= self.window // 2:  # else: wait for the mirror
                    while pos < len(order) and order[pos] <= limit:
                        batch.append(order[pos])
                        pos += 1
                    planned = limit
                if batch:
                    self.issued += len(self.export.prefetch(batch, FetchClass.RELOCATION))
                    self.ahead_to = batch[-1]
                now = time.monotonic()
                if now - self._last_log > 1.0:
                    self._last_log = now
                    log.info(
                        "set3 %s: mirror cursor at block %d, prefetched ahead to block %d (+%d), %d issued",
                        self.export.name, self.cursor // bs, self.ahead_to, self.ahead_to - self.cursor // bs,
                        self.issued,
                    )  # fmt: skip
                self._moved.clear()
                await self._moved.wait()
        finally:
            self.export.read_observers.remove(self.observe)
            if readahead is not None:
                readahead.paused = False
