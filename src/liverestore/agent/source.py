"""Where missing blocks come from: the repository, optionally behind filters (nbdkit-style).

``ThrottledSource`` emulates a real dedup appliance or object store: a fixed latency per fetch and
a shared link bandwidth. Tests and benchmarks need it because a local directory answers in
microseconds and would hide every scheduling decision.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from weakref import WeakKeyDictionary

from liverestore.errors import RepositoryUnavailable
from liverestore.repository import DiskManifest, Repository
from liverestore.repository.chunkstore import ChunkLocations, Want, plan_runs

log = logging.getLogger("liverestore.source")


@dataclass(frozen=True)
class Fetched:
    """A fetched block: its size and stored size, and its bytes when the fetch had no sink. A
    sink takes the bytes in the fetch thread; keeping them until the event loop saw the result
    held every block of a ranged read at once (8 MiB read plus 16 MiB decoded per read)."""

    size: int
    stored_bytes: int
    data: bytes = b""
    request_share: float = 1.0  # 1/n of the ranged read it was one of n blocks of: per-VM request counts


Sink = Callable[[bytes], None]
"""Where a fetched block goes (the read-cache file at its offset). It is called in the fetch
thread that decoded the block, so the write leaves the event loop free to serve reads; it may
raise OSError (a full cache disk), which fails that fetch alone."""


class BlockSource(Protocol):
    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched: ...


ANSWER_BYTES = 1024 * 1024  # a fetch thread answers readers after decoding this much of a run

_Taker = tuple["asyncio.Future[Fetched]", "Sink | None"]
_Answer = tuple["asyncio.Future[Fetched]", "Fetched | Exception"]


class _Completions:
    """Answers from fetch threads to the event loop, with one wake-up for all that arrive while
    the loop is busy: a wake-up per block (``call_soon_threadsafe`` writes to the loop's pipe)
    would cost a system call and a loop turn per 64 KiB."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._answers: list[_Answer] = []
        self._lock = threading.Lock()
        self._woken = False

    def put(self, answers: list[_Answer]) -> None:
        with self._lock:
            self._answers.extend(answers)
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        with self._lock:
            answers, self._answers, self._woken = self._answers, [], False
        for f, answer in answers:
            if f.done():  # cancelled meanwhile
                continue
            if isinstance(answer, Exception):
                f.set_exception(answer)
            else:
                f.set_result(answer)


class RepositorySource:
    """Fetches chunks, coalescing the requests that arrive together: fetches started in one turn of
    the event loop (the scheduler starts a batch whenever slots free up) that name neighbouring
    chunks of one pack become one ranged read. Set 2 and set 3 walk the disk in order and a backup
    packs blocks in order, so a relocation costs about one request per pack span rather than one
    per block. The reads run in the agent's own thread pool, sized for requests in flight, not
    for cores (decompression and hashing release the GIL)."""

    def __init__(self, repo: Repository, io_threads: int = 32) -> None:
        self.repo = repo
        self.requests = 0  # ranged reads issued (the benchmarks count requests per GiB)
        self._waiting: list[tuple[Want, asyncio.Future[Fetched], Sink | None]] = []
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="fetch")
        self._tasks: set[asyncio.Task[None]] = set()
        self._located: WeakKeyDictionary[DiskManifest, ChunkLocations] = WeakKeyDictionary()
        self._completions: _Completions | None = None

    def locate(self, manifests: Sequence[DiskManifest]) -> None:
        """Find where every block of these manifests is stored, and let go of the repository's
        merged index if something read it: an agent's memory then follows the disks it serves
        (12 bytes a block) rather than every chunk of every backup in the repository (48 bytes
        each). Manifests not located here are looked up in the index, read again when needed."""
        for manifest, located in zip(manifests, self.repo.chunks.locations(manifests), strict=True):
            self._located[manifest] = located
        self.repo.chunks.drop_index()

    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched:
        k = manifest.position(index)
        assert k is not None, "zero blocks are never fetched"
        cid = manifest.raw_id(k).hex()
        loop = asyncio.get_running_loop()
        size = manifest.block_length(index)
        located = self._located.get(manifest)
        where = located.at(k) if located is not None else None
        want = Want(cid, size, where) if where is not None else self.repo.chunks.cached_want(cid, size)
        if want is None:  # first use (the index is read), a chunk the index lacks, or a loose chunk
            want = await loop.run_in_executor(self._pool, self.repo.chunks.want, cid, size)
        fut: asyncio.Future[Fetched] = loop.create_future()
        self._waiting.append((want, fut, sink))
        if len(self._waiting) == 1:
            loop.call_soon(self._dispatch)  # after the other fetches started in this turn
        return await fut

    def _dispatch(self) -> None:
        waiting, self._waiting = self._waiting, []
        takers: dict[str, list[_Taker]] = {}
        for want, fut, sink in waiting:
            takers.setdefault(want.cid, []).append((fut, sink))
        unique = list({w.cid: w for w, _, _ in waiting}.values())
        loop = asyncio.get_running_loop()
        for run in plan_runs(unique):
            self.requests += 1
            task = loop.create_task(self._load(run, {w.cid: takers[w.cid] for w in run}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _load_and_sink(self, run: list[Want], takers: dict[str, list[_Taker]], share: float,
                       done: _Completions) -> None:  # fmt: skip
        """In a fetch thread: read the run and hand each good block to its takers' sinks as it is
        decoded, so a block is let go once written. Readers are answered every ``ANSWER_BYTES``
        rather than when the whole run (up to 8 MiB) is decoded: the event loop sends those
        blocks while this thread decodes the next. Answering every 64 KiB block on its own woke
        the event loop so often that it fought the fetch threads for the GIL (1.7x slower)."""
        answers: list[_Answer] = []
        size = 0
        for want, got in zip(run, self.repo.chunks.iter_run(run), strict=True):
            entries = takers[want.cid]
            if isinstance(got, Exception):
                answers += [(f, got) for f, _ in entries]
            else:
                data, stored = got
                for f, sink in entries:
                    try:
                        if sink is not None:
                            sink(data)
                        answers.append((f, Fetched(len(data), stored, b"" if sink else data, request_share=share)))
                    except OSError as e:
                        answers.append((f, e))
                size += len(data)
            if size >= ANSWER_BYTES:
                done.put(answers)
                answers, size = [], 0
        if answers:
            done.put(answers)

    async def _load(self, run: list[Want], takers: dict[str, list[_Taker]]) -> None:
        loop = asyncio.get_running_loop()
        done = self._completions_for(loop)
        share = 1 / sum(len(entries) for entries in takers.values())
        try:
            await loop.run_in_executor(self._pool, self._load_and_sink, run, takers, share, done)
        except asyncio.CancelledError:
            for entries in takers.values():
                for f, _ in entries:
                    f.cancel()
            raise
        except Exception as e:  # a transport failure: every chunk of the run not answered sees it
            done.drain()
            for entries in takers.values():
                for f, _ in entries:
                    if not f.done():
                        f.set_exception(e)

    def _completions_for(self, loop: asyncio.AbstractEventLoop) -> _Completions:
        if self._completions is None or self._completions.loop is not loop:
            self._completions = _Completions(loop)
        return self._completions

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ThrottledSource:
    def __init__(self, inner: BlockSource, latency_ms: float = 0.0, mbps: float = 0.0) -> None:
        self.inner = inner
        self.latency = latency_ms / 1000.0
        self.bytes_per_s = mbps * 1_000_000 / 8 if mbps > 0 else 0.0
        self._link_free_at = 0.0

    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched:
        if self.latency:
            await asyncio.sleep(self.latency)
        got = await self.inner.fetch(manifest, index, sink)
        if self.bytes_per_s:
            # one shared link: transfers queue behind each other, as on a real WAN/SAN port
            now = time.monotonic()
            start = max(now, self._link_free_at)
            self._link_free_at = start + got.stored_bytes / self.bytes_per_s
            await asyncio.sleep(self._link_free_at - now)
        return got


class RetryingSource:
    """Rides out repository outages: retries unavailability with exponential backoff for up to
    ``deadline_s`` and warns while it does. Damage (a corrupt or missing chunk) is never retried:
    it will not heal, and the read must fail with EIO rather than hang."""

    def __init__(self, inner: BlockSource, deadline_s: float = 120.0, max_delay_s: float = 2.0) -> None:
        self.inner = inner
        self.deadline_s = deadline_s
        self.max_delay_s = max_delay_s
        self.outages = 0
        self.retries = 0
        self.available = True

    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched:
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                got = await self.inner.fetch(manifest, index, sink)
            except RepositoryUnavailable as e:
                waited = time.monotonic() - start
                if waited >= self.deadline_s:
                    raise
                if self.available:
                    self.available = False
                    self.outages += 1
                    log.warning("repository unavailable (%s); retrying for up to %.0f s", e, self.deadline_s)
                self.retries += 1
                await asyncio.sleep(min(delay, self.deadline_s - waited))
                delay = min(delay * 2, self.max_delay_s)
                continue
            if not self.available:
                self.available = True
                log.warning("repository is back after an outage; resuming")
            return got


def emulate_link(source: BlockSource, latency_ms: float = 0.0, mbps: float = 0.0) -> BlockSource:
    """``source`` behind the slow-repository emulation when one is asked for."""
    if latency_ms > 0 or mbps > 0:
        return ThrottledSource(source, latency_ms, mbps)
    return source
