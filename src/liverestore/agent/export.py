"""One backed-up disk as an NBD export: read-cache in front of the repository, optional COW area.

Every read is served from the local cache file; missing blocks are fetched (through the shared
scheduler) first. Guest writes, when allowed, go to a separate copy-on-write file at block
granularity — the repository is never written by the agent.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from liverestore.agent.bitmap import Bitmap
from liverestore.agent.blockfile import BlockFile
from liverestore.agent.dropbehind import DropBehind
from liverestore.agent.metrics import Metrics
from liverestore.agent.nbd import protocol as p
from liverestore.agent.nbd.export import ExportError, FileSlice
from liverestore.agent.readahead import Readahead
from liverestore.agent.recorder import AccessRecorder
from liverestore.agent.scheduler import FetchClass, FetchScheduler, GroupJob, Report, Tenant
from liverestore.agent.source import Ask, BlockSource, Fetched, Rereadable
from liverestore.errors import IntegrityError, RepositoryError
from liverestore.repository import DiskManifest

log = logging.getLogger("liverestore.export")

SENDFILE_MIN = 64 * 1024  # larger cached reads go out with sendfile(2) instead of through Python
INLINE_SPAN = 64 * 1024  # read at once for a connection reading small pieces in order


class CachedBlock(Rereadable):
    """Block ``idx`` of a read-cache as a fetch's sink: written by the fetch thread that decoded
    it, and read back for another restore point that needs the same chunk (``SharedChunks``)."""

    __slots__ = ("cache", "idx")

    def __init__(self, cache: BlockFile, idx: int) -> None:
        self.cache, self.idx = cache, idx

    def __call__(self, data: bytes) -> None:
        self.cache.pwrite(data, self.idx * self.cache.block_size)

    def read_back(self) -> bytes | None:
        return self.cache.read_block(self.idx)


class DiskExport:
    def __init__(
        self,
        name: str,
        manifest: DiskManifest,
        manifest_id: str,
        cache_dir: Path,
        scheduler: FetchScheduler,
        source: BlockSource,
        metrics: Metrics,
        recorder: AccessRecorder,
        writable: bool = False,
        tenant: Tenant = None,
        drop_behind: DropBehind | None = None,
        readahead_bytes: int = 0,
    ) -> None:
        self.name = name
        self.tenant = tenant  # the restore point this disk belongs to, for fairness between points
        self.manifest = manifest
        self.size = manifest.virtual_size
        self.block_size = manifest.block_size
        self.writable = writable
        self.description = f"liverestore {name} ({manifest.source_format} backup)"
        self.scheduler = scheduler
        self.source = source
        self.metrics = metrics
        self.recorder = recorder
        self.read_cache = BlockFile(
            cache_dir / f"{manifest.name}.cache", manifest_id, self.size, self.block_size
        )
        self.cow = (
            BlockFile(cache_dir / f"{manifest.name}.cow", manifest_id, self.size, self.block_size)
            if writable
            else None
        )
        self._cow_lock = asyncio.Lock()
        self.drop_behind = drop_behind
        self._unread = Bitmap(self.read_cache.block_count)  # fetched here, not yet read whole
        self.read_observers: list[Callable[[int, int], None]] = []  # e.g. the set-3 cursor tracker
        self._background: set[asyncio.Task[None]] = set()  # set 2's copier; stopped by ``close``
        self.readahead = Readahead(self, readahead_bytes) if readahead_bytes > 0 else None

    # -- block bookkeeping ---------------------------------------------------------------------
    def present(self, idx: int) -> bool:
        """In the cache, or a hole (reads as zeros); the cache first: most blocks read are in it."""
        return self.read_cache.has(idx) or not self.manifest.is_allocated(idx)

    def has_data(self, start: int, end: int) -> bool:
        """Whether an allocated block lies in bytes [start, end): one search of the manifest's
        allocated blocks, however large the hole."""
        alloc, k = self.manifest.allocated_index, self._first_allocated(start)
        return k < len(alloc) and alloc[k] * self.block_size < end

    def _first_allocated(self, offset: int) -> int:
        """Where in the manifest's allocated blocks the first one at or after byte ``offset`` is."""
        return bisect.bisect_left(self.manifest.allocated_index, offset // self.block_size)

    def blocks_of(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset // self.block_size, (offset + length - 1) // self.block_size + 1)

    async def ensure(self, idx: int, cls: FetchClass) -> None:
        if not self.present(idx):
            await self._submit(idx, cls)

    def _submit(self, idx: int, cls: FetchClass, why: str | None = None) -> asyncio.Future[None]:
        """The scheduler's future for block ``idx`` (queued, or joined when already pending). A read
        waits on these futures themselves: wrapping each in a task cost a task per block. ``why``
        names the fetch in the metrics when its class alone does not (readahead)."""
        return self.scheduler.submit((self.name, idx), cls, GroupJob(self._fill, (idx, why)), self.tenant)

    async def _fill(self, items: list[tuple[int, str | None]], cls: FetchClass, report: Report) -> None:
        """Fetch the blocks the scheduler started together into the cache, reporting each as it
        lands. A block is written by the fetch thread that decoded it, off the event loop."""
        asks: list[Ask] = []
        asked: list[int] = []  # which item each ask is
        for n, (idx, _) in enumerate(items):
            if self.present(idx):
                report(n, None, fetched=False)
            else:
                asks.append((idx, CachedBlock(self.read_cache, idx)))
                asked.append(n)

        def landed(k: int, got: Fetched | Exception) -> None:
            n = asked[k]
            idx, why = items[n]
            if isinstance(got, Exception):
                report(n, self._fetch_failed(idx, got))
                return
            self.read_cache.mark(idx)  # only now: a bit is never set before its block is written
            self._unread.set(idx)
            self.metrics.record_fetch(why or str(cls), got.size, got.stored_bytes, got.request_share)
            report(n, None, fetched=not got.shared)

        if asks:
            await self.source.fetch_many(self.manifest, asks, landed)

    def _fetch_failed(self, idx: int, e: Exception) -> Exception:
        """What a reader of block ``idx`` is told when its fetch failed, logged once here."""
        if isinstance(e, (IntegrityError, RepositoryError)):
            self.metrics.fetch_errors += 1
            log.error("%s: block %d (chunk %s) cannot be served: %s", self.name, idx, self.manifest.chunk(idx), e)
            return ExportError(p.EIO, f"block {idx}: {e}")
        if isinstance(e, OSError):  # e.g. the cache filesystem filled up: fail this read, keep serving
            log.error("%s: cannot write block %d to the cache %s: %s", self.name, idx, self.read_cache.data_path,
                      e.strerror)  # fmt: skip
            return ExportError(p.ENOSPC if e.errno == errno.ENOSPC else p.EIO, f"cache write failed: {e.strerror}")
        return e

    def prefetch(self, blocks: Iterable[int], cls: FetchClass, why: str | None = None) -> list[asyncio.Future[None]]:
        """Queue background copies into the cache; failures are logged by ``_fetch_failed``, not raised."""
        futs = []
        for idx in blocks:
            if not self.present(idx):
                fut = self._submit(idx, cls, why)
                fut.add_done_callback(_swallow)
                futs.append(fut)
        return futs

    def run_in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_background(self) -> None:
        """Stop set 2's copier before the scheduler closes (it would queue more fetches)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- NBD export interface ------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes | FileSlice:
        t0 = time.monotonic()
        for observe in self.read_observers:  # before waiting: set 3 must see the mirror's intent early
            observe(offset, length)
        if self.readahead is not None:
            self.readahead.observe(offset, length)
        blocks = self.blocks_of(offset, length)
        cow = self.cow
        missing = [i for i in blocks if not self.present(i) and not (cow and cow.has(i))]
        try:
            if missing:
                await _all([self._submit(i, FetchClass.DEMAND) for i in missing])
        except ExportError:
            self.metrics.read_errors += 1
            raise
        data: bytes | FileSlice
        if cow is None or not any(cow.has(i) for i in blocks):
            if length >= SENDFILE_MIN:
                data = FileSlice(self.read_cache.file, offset, length)
            else:
                data = self.read_cache.pread(length, offset)
        else:
            parts, pos, end = [], offset, offset + length
            for i in blocks:
                seg_end = min(end, (i + 1) * self.block_size)
                src = cow if cow.has(i) else self.read_cache
                parts.append(src.pread(seg_end - pos, pos))
                pos = seg_end
            data = b"".join(parts)
        if self.drop_behind is not None:
            self._release_read(blocks, offset, offset + length)
        now = time.monotonic()
        self.metrics.record_read(length, not missing, now - t0, now)
        if self.recorder.active:
            self.recorder.record(self.name, offset, length, not missing, now - t0, now)
        return data

    def inline_reads(self) -> InlineReads:
        return InlineReads(self)

    async def write(self, offset: int, data: bytes) -> None:
        cow = self._require_cow()
        view, pos = memoryview(data), offset
        try:
            for i in self.blocks_of(offset, len(data)):
                seg_end = min(offset + len(data), (i + 1) * self.block_size)
                full = pos == i * self.block_size and seg_end == i * self.block_size + self.manifest.block_length(i)
                await self._cow_prepare(i, full)
                cow.pwrite(view[pos - offset : seg_end - offset], pos)
                pos = seg_end
        except OSError as e:  # the copy-on-write area's disk is full or failing: the guest sees it
            errno_ = p.ENOSPC if e.errno == errno.ENOSPC else p.EIO
            raise ExportError(errno_, f"cannot write to the copy-on-write area: {e.strerror}") from None
        self.metrics.writes += 1
        self.metrics.write_bytes += len(data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(end - offset, self.block_size - offset % self.block_size)
            await self.write(offset, bytes(n))
            offset += n

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        """Make every cached and written block durable; a full or failing cache disk is an NBD
        error the client can act on (ENOSPC, EIO), not a crash."""
        files = [self.read_cache] + ([self.cow] if self.cow else [])

        def persist_all() -> None:
            for f in files:
                f.persist()

        try:
            await asyncio.to_thread(persist_all)
        except OSError as e:
            errno_ = p.ENOSPC if e.errno == errno.ENOSPC else p.EIO
            raise ExportError(errno_, f"cannot save the cache of {self.name}: {e.strerror}") from None

    async def cache(self, offset: int, length: int) -> None:
        await asyncio.gather(*self.prefetch(self.blocks_of(offset, length), FetchClass.PREFETCH))

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self.cow is None:
            return self._backup_extents(offset, length)
        extents: list[tuple[int, int]] = []
        end, pos = offset + length, offset
        for i in self.blocks_of(offset, length):
            allocated = self.manifest.is_allocated(i) or self.cow.has(i)
            seg_end = min(end, (i + 1) * self.block_size)
            _add_extent(extents, seg_end - pos, 0 if allocated else p.STATE_HOLE | p.STATE_ZERO)
            pos = seg_end
        return extents

    # -- internals -----------------------------------------------------------------------------
    def _release_read(self, blocks: range, start: int, end: int) -> None:
        """Hand the blocks this read took whole, and this agent fetched, to drop-behind (one range
        per run of neighbours): their reader has them, and nobody is expected to read them again."""
        assert self.drop_behind is not None
        bs, unread = self.block_size, self._unread
        run_start = run_end = -1
        for i in blocks:
            lo = i * bs
            hi = lo + self.manifest.block_length(i)
            if lo < start or hi > end or not unread.clear(i):  # a block read in part stays unread
                continue
            if lo != run_end:
                if run_end > run_start:
                    self.drop_behind.release(self.read_cache, run_start, run_end - run_start)
                run_start = lo
            run_end = hi
        if run_end > run_start:
            self.drop_behind.release(self.read_cache, run_start, run_end - run_start)

    def _backup_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents from the manifest's allocated blocks alone: it jumps over holes, so a 1 TiB
        disk with little data answers at once instead of walking 16 million blocks."""
        bs, end, pos = self.block_size, offset + length, offset
        alloc, k = self.manifest.allocated_index, self._first_allocated(offset)
        extents: list[tuple[int, int]] = []
        while pos < end:
            if k < len(alloc) and alloc[k] * bs < end:
                start = max(pos, alloc[k] * bs)
                _add_extent(extents, start - pos, p.STATE_HOLE | p.STATE_ZERO)
                j = k
                while j + 1 < len(alloc) and alloc[j + 1] == alloc[j] + 1 and alloc[j + 1] * bs < end:
                    j += 1
                pos = min(end, (alloc[j] + 1) * bs)
                _add_extent(extents, pos - start, 0)
                k = j + 1
            else:
                _add_extent(extents, end - pos, p.STATE_HOLE | p.STATE_ZERO)
                pos = end
        return extents

    def _require_cow(self) -> BlockFile:
        if self.cow is None:
            raise ExportError(p.EPERM, "export is read-only")
        return self.cow

    async def _cow_prepare(self, idx: int, full: bool) -> None:
        """Copy the base block into the COW file before a partial write lands on it."""
        cow = self._require_cow()
        if cow.has(idx):
            return
        if not full:
            await self.ensure(idx, FetchClass.DEMAND)
        async with self._cow_lock:
            if cow.has(idx):
                return
            if not full:
                start = idx * self.block_size
                cow.pwrite(self.read_cache.pread(self.manifest.block_length(idx), start), start)
            cow.mark(idx)

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.read_cache.close()
        if self.cow:
            self.cow.close()


def _add_extent(extents: list[tuple[int, int]], n: int, flags: int) -> None:
    """Append ``n`` bytes of ``flags``, merged into the last extent when it has the same flags."""
    if extents and extents[-1][1] == flags:
        extents[-1] = (extents[-1][0] + n, flags)
    elif n > 0:
        extents.append((n, flags))


async def _all(futures: list[asyncio.Future[None]]) -> None:
    """Wait for every one of ``futures``, raising the first failure in their order. A read's
    blocks mostly land together, so this wakes once or twice per read, where ``gather`` ran a
    callback for every block (16 for a 1 MiB read at 64 KiB). The failures not raised are
    retrieved, so none is reported as never retrieved."""
    for n, fut in enumerate(futures):
        try:
            await fut
        except BaseException:
            for rest in futures[n + 1 :]:
                rest.add_done_callback(_swallow)
            raise


def _swallow(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class InlineReads:
    """One connection's small cached reads (4 KiB guest I/O), answered with no task and no await,
    with the same bookkeeping as ``read``. A connection that reads in order (a copy, a scan: 16
    reads of 4 KiB in flight, one after another) gets ``INLINE_SPAN`` bytes from one ``pread``
    and the reads that follow from them: a ``pread`` costs 3.5 us here whatever its size up to a
    few pages, a fifth of the event loop's time per 4 KiB read. Keeping them is safe because a
    block's bytes in the read-cache never change once it is present (the backup is immutable;
    an evicted block comes back the same); only the blocks present when they were read are kept,
    and a copy-on-write export or one being relocated takes ``read`` instead."""

    def __init__(self, export: DiskExport) -> None:
        self.export = export
        self._start = 0  # disk offset of ``_kept``
        self._kept = memoryview(b"")
        self._next = -1  # where the connection's last read ended

    def read(self, offset: int, length: int) -> bytes | memoryview | None:
        e = self.export
        if length >= SENDFILE_MIN or length <= 0 or offset + length > e.size:
            return None
        if e.cow is not None or e.read_observers:
            return None
        t0 = time.monotonic()
        at = offset - self._start
        if at >= 0 and at + length <= len(self._kept):
            data: bytes | memoryview = self._kept[at : at + length]
        else:
            span = self._present_span(offset, length)
            if span is None:
                return None
            if span == length:
                data = e.read_cache.pread(length, offset)
            else:
                self._start, self._kept = offset, memoryview(e.read_cache.pread(span, offset))
                data = self._kept[:length]
        self._next = offset + length
        now = time.monotonic()
        e.metrics.record_read(length, True, now - t0, now)
        if e.recorder.active:
            e.recorder.record(e.name, offset, length, True, 0.0, now)
        return data

    def _present_span(self, offset: int, length: int) -> int | None:
        """How many bytes from ``offset`` to read: None when the read's own blocks are not all
        present; ``length`` for a read out of order; else up to ``INLINE_SPAN``, as far as the
        blocks are present."""
        e, bs = self.export, self.export.block_size
        last = (offset + length - 1) // bs  # the read's own last block
        end = offset + length
        if offset == self._next:  # in order: on as far as INLINE_SPAN
            end = max(end, min(offset + INLINE_SPAN, e.size))
        for i in range(offset // bs, (end - 1) // bs + 1):
            if not e.present(i):
                return None if i <= last else i * bs - offset  # a block past the read: stop before it
        return end - offset
