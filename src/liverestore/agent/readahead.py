"""Readahead for sequential readers: fetch the blocks just past a reader that walks the disk.

A bulk reader (``nbdcopy``, ``qemu-img convert``, a guest's ``dd`` or table scan, QEMU's mirror
when set 3 is off) keeps a fixed number of requests in flight, 16 x 1 MiB for nbdcopy and the
mirror. From a cold cache each request waits for its own fetch. The reader then moves at one
window of requests per round trip, however fast the link is. Worse, its fetches come a few at a
time, so few neighbours share a ranged request: on SeaweedFS at 1 MiB blocks a cold whole read
took 478 requests per GiB, and the adaptive limit read its own decoding as queueing.

nbdkit's ``readahead`` filter answers the same problem for slow plugins. This is that filter for
the read-cache. Once a reader has read ``TRIGGER_BYTES`` in order, the blocks up to ``window``
bytes past it are fetched ahead. They go out in batches of half a window, so neighbours share
one ranged read. A reader that jumps elsewhere starts a new stream, so random readers never
trigger it, and a boot's scattered reads do not either.

The blocks go in the relocation class. In ``demand-first`` mode that ranks below every guest
read and never takes the last free slot; in ``fair`` mode it alternates with guest reads, as set
3 does. The metrics count them apart, as ``readahead``. While set 3 runs for an export it already
fetches ahead of the mirror, in relocation order, so readahead pauses there. The agent turns it
on by default only where it fills shared ranged requests (see ``MediaAgent``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from liverestore.agent.scheduler import FetchClass

TRIGGER_BYTES = 4 * 1024 * 1024  # read in order before a stream is trusted
WINDOW_BYTES = 32 * 1024 * 1024  # fetched ahead of the reader: two windows of the mirror's 16 x 1 MiB


class Prefetchable(Protocol):
    """What readahead needs of an export (``DiskExport``): its size, its blocks, a way to queue them."""

    size: int
    block_size: int

    def prefetch(self, blocks: Sequence[int], cls: FetchClass, why: str | None = None) -> Sequence[object]: ...

    def has_data(self, start: int, end: int) -> bool:
        """Whether any allocated block lies in bytes [start, end)."""
        ...


class Readahead:
    """One export's stream detector. ``observe`` runs for every read that reaches the export's
    slow path (cached reads under 64 KiB take a fast path and do not), before the read waits."""

    def __init__(self, export: Prefetchable, window_bytes: int = WINDOW_BYTES,
                 trigger_bytes: int = TRIGGER_BYTES) -> None:  # fmt: skip
        self.export = export
        self.window = max(window_bytes, 2 * export.block_size)
        self.trigger = trigger_bytes
        self.paused = False  # set by set 3 while it runs for this export
        self.issued = 0  # blocks queued ahead (status and tests)
        self._start = 0  # where the current stream began
        self._end = 0  # the highest byte read in it
        self._planned = 0  # blocks below this byte offset were handed to the scheduler

    def observe(self, offset: int, length: int) -> None:
        # A reader with requests in flight sends them in order, but they may reach us a little out
        # of order: a read that starts up to a window behind the stream's end still belongs to it.
        # One that starts ahead of it belongs only if it skipped a hole (nbdcopy and the mirror
        # skip what block status calls zero), never data.
        behind = self._end - self.window <= offset <= self._end
        skipped_hole = self._end < offset <= self._end + self.window and not self.export.has_data(self._end, offset)
        if offset < self._start or not (behind or skipped_hole):
            self._start, self._end, self._planned = offset, offset + length, offset + length
            return
        self._end = max(self._end, offset + length)
        if self.paused or self._end - self._start < self.trigger:
            return
        ahead_from = max(self._planned, self._end)
        target = min(self._end + self.window, self.export.size)
        if target - ahead_from < self.window // 2:
            return  # top up in batches: neighbours in one batch share ranged reads
        bs = self.export.block_size
        self._planned = target
        blocks = range(ahead_from // bs, (target - 1) // bs + 1)
        self.issued += len(self.export.prefetch(blocks, FetchClass.RELOCATION, why="readahead"))
