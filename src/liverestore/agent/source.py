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
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
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
    shared: bool = False  # copied from another ask's fetch of the same chunk (``SharedChunks``), not fetched


Sink = Callable[[bytes], None]
"""Where a fetched block goes (the read-cache file at its offset). It is called in the fetch
thread that decoded the block, so the write leaves the event loop free to serve reads; it may
raise OSError (a full cache disk), which fails that fetch alone."""


class Rereadable:
    """A sink whose block can be read back once it is written and its fetch answered: a block of
    a read-cache. ``SharedChunks`` serves another restore point's fetch of the same chunk from it
    rather than from the repository."""

    __slots__ = ()

    def __call__(self, data: bytes) -> None:
        raise NotImplementedError

    def read_back(self) -> bytes | None:
        """The block's bytes, or None once they cannot be had (its cache was closed)."""
        raise NotImplementedError


Ask = tuple[int, "Sink | None"]
"""One block of a ``fetch_many``: its index in the manifest, and where its bytes go."""

Answer = Callable[[int, "Fetched | Exception"], None]
"""How one block of a ``fetch_many`` went: called on the event loop with the block's place among
the asks, once per block, as each lands (not when all have)."""


class BlockSource(Protocol):
    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched: ...

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        """Fetch several blocks of one disk, answering each as it lands; return once all are
        answered. The agent's reads start blocks in batches (a 1 MiB read is 16 blocks of 64
        KiB): one call, rather than a coroutine and a future per block, kept a cold read at 64
        KiB from spending most of the event loop on bookkeeping."""
        ...


async def fetch_one(source: BlockSource, manifest: DiskManifest, index: int, sink: Sink | None) -> Fetched:
    """``fetch`` as a ``fetch_many`` of one block: every source implements the batch, and a
    single fetch (the classic copy, the tests) takes the same path with its retries and link."""
    answers: list[Fetched | Exception] = []
    await source.fetch_many(manifest, [(index, sink)], lambda _n, got: answers.append(got))
    if isinstance(answers[0], Exception):
        raise answers[0]
    return answers[0]


class _Source:
    """What every source here shares: ``fetch`` is a ``fetch_many`` of one block."""

    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched:
        return await fetch_one(self, manifest, index, sink)

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        raise NotImplementedError


ANSWER_BYTES = 4 * 1024 * 1024  # a fetch thread answers readers after decoding this much of a run


class _Taker(Protocol):
    """Who waits for a fetched block (one ``fetch_many``)."""

    def answer(self, n: int, got: Fetched | Exception) -> None: ...

    def cancel(self) -> None: ...


class _Many:
    """One ``fetch_many``: relays each block's answer and is done once all have come. Cancelled
    (its reader went away, or the agent closes), it relays nothing more."""

    def __init__(self, answer: Answer, count: int) -> None:
        self.relay, self.left = answer, count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def answer(self, n: int, got: Fetched | Exception) -> None:
        if self.done.done():
            return
        self.left -= 1
        if self.left == 0:
            self.done.set_result(None)
        self.relay(n, got)

    def cancel(self) -> None:
        self.done.cancel()


_Waiting = tuple[_Taker, int, "Sink | None"]  # who takes a block, its place among their asks, its sink
_Answer = tuple[_Taker, int, "Fetched | Exception"]


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
        for taker, n, got in answers:
            try:
                taker.answer(n, got)
            except Exception:  # one reader's bookkeeping must not leave the others waiting
                log.exception("a fetched block could not be handed to its reader")


class RepositorySource(_Source):
    """Fetches chunks, coalescing the requests that arrive together: fetches started in one turn of
    the event loop (the scheduler starts a batch whenever slots free up) that name neighbouring
    chunks of one pack become one ranged read. Set 2 and set 3 walk the disk in order and a backup
    packs blocks in order, so a relocation costs about one request per pack span rather than one
    per block. The reads run in the agent's own thread pool, sized for requests in flight, not
    for cores (decompression and hashing release the GIL)."""

    def __init__(self, repo: Repository, io_threads: int = 32) -> None:
        self.repo = repo
        self.requests = 0  # ranged reads issued (the benchmarks count requests per GiB)
        self._waiting: list[tuple[Want, _Waiting]] = []
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

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        if not asks:
            return
        many = _Many(answer, len(asks))
        try:
            await self._queue(manifest, asks, many)
            await many.done
        finally:
            many.cancel()  # done, or its caller went away: nothing more is relayed

    async def _queue(self, manifest: DiskManifest, asks: Sequence[Ask], taker: _Taker) -> None:
        """Add the blocks to those that start in this turn of the event loop."""
        located = self._located.get(manifest)
        loop = asyncio.get_running_loop()
        for n, (index, sink) in enumerate(asks):
            k = manifest.position(index)
            assert k is not None, "zero blocks are never fetched"
            cid = manifest.raw_id(k).hex()
            size = manifest.block_length(index)
            where = located.at(k) if located is not None else None
            want = Want(cid, size, where) if where is not None else self.repo.chunks.cached_want(cid, size)
            if want is None:  # first use (the index is read), a chunk the index lacks, or a loose chunk
                want = await loop.run_in_executor(self._pool, self.repo.chunks.want, cid, size)
            self._waiting.append((want, (taker, n, sink)))
            if len(self._waiting) == 1:
                loop.call_soon(self._dispatch)  # after the other fetches started in this turn

    def _dispatch(self) -> None:
        waiting, self._waiting = self._waiting, []
        takers: dict[str, list[_Waiting]] = {}
        for want, taker in waiting:
            takers.setdefault(want.cid, []).append(taker)
        unique = list({w.cid: w for w, _ in waiting}.values())
        loop = asyncio.get_running_loop()
        for run in plan_runs(unique):
            self.requests += 1
            task = loop.create_task(self._load(run, {w.cid: takers[w.cid] for w in run}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _load_and_sink(self, run: list[Want], takers: dict[str, list[_Waiting]], share: float,
                       done: _Completions) -> None:  # fmt: skip
        """In a fetch thread: read the run and hand each good block to its takers' sinks as it is
        decoded, so a block is let go once written. Readers are answered every ``ANSWER_BYTES``
        rather than when the whole run (up to 8 MiB) is decoded: the event loop sends those
        blocks while this thread decodes the next. Answering every 64 KiB block on its own woke
        the event loop so often that it fought the fetch threads for the GIL (1.7x slower).
        Answers also free the blocks' fetch slots, and the slots freed together start the next
        fetches together, which share ranged reads: answering every 1 MiB, a cold read at 64 KiB
        blocks from SeaweedFS took 823-874 requests per GiB; every 4 MiB (so most runs, of
        about 20 blocks, answer once) 412-423, and 5.3-6.3 s instead of 6.3-6.9 s. Answering the
        first 1 MiB early and the rest every 4 MiB kept the small reads (846-871 requests)."""
        answers: list[_Answer] = []
        size = taken = 0
        try:
            for want, got in zip(run, self.repo.chunks.iter_run(run), strict=True):
                entries = takers[want.cid]
                taken += 1
                if isinstance(got, Exception):
                    answers += [(taker, n, got) for taker, n, _ in entries]
                    continue
                data, stored = got
                for taker, n, sink in entries:
                    try:
                        if sink is not None:
                            sink(data)
                        answers.append((taker, n, Fetched(len(data), stored, b"" if sink else data, request_share=share)))
                    except OSError as e:
                        answers.append((taker, n, e))
                size += len(data)
                if size >= ANSWER_BYTES:
                    done.put(answers)
                    answers, size = [], 0
        except Exception as e:  # a transport failure: every chunk of the run not answered sees it
            answers += [(taker, n, e) for want in run[taken:] for taker, n, _ in takers[want.cid]]
        if answers:
            done.put(answers)

    async def _load(self, run: list[Want], takers: dict[str, list[_Waiting]]) -> None:
        loop = asyncio.get_running_loop()
        done = self._completions_for(loop)
        share = 1 / sum(len(entries) for entries in takers.values())
        try:
            await loop.run_in_executor(self._pool, self._load_and_sink, run, takers, share, done)
        except asyncio.CancelledError:
            for entries in takers.values():
                for taker, _, _ in entries:
                    taker.cancel()
            raise
        except Exception as e:  # the pool would not run it (it is shutting down): nothing was answered
            for entries in takers.values():
                for taker, n, _ in entries:
                    taker.answer(n, e)

    def _completions_for(self, loop: asyncio.AbstractEventLoop) -> _Completions:
        if self._completions is None or self._completions.loop is not loop:
            self._completions = _Completions(loop)
        return self._completions

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ThrottledSource(_Source):
    def __init__(self, inner: BlockSource, latency_ms: float = 0.0, mbps: float = 0.0) -> None:
        self.inner = inner
        self.latency = latency_ms / 1000.0
        self.bytes_per_s = mbps * 1_000_000 / 8 if mbps > 0 else 0.0
        self._link_free_at = 0.0

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        """Blocks asked together wait out one latency together, then each its turn on the link as
        it lands: one shared link, where transfers queue behind each other as on a real WAN/SAN
        port. No task per block."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if not self.bytes_per_s:
            await self.inner.fetch_many(manifest, asks, answer)
            return
        loop = asyncio.get_running_loop()
        many = _Many(answer, len(asks))
        timers: list[asyncio.TimerHandle] = []

        def landed(n: int, got: Fetched | Exception) -> None:
            if isinstance(got, Exception):  # a failure pays no transfer time
                many.answer(n, got)
                return
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + got.stored_bytes / self.bytes_per_s
            timers.append(loop.call_later(self._link_free_at - now, many.answer, n, got))

        try:
            await self.inner.fetch_many(manifest, asks, landed)
            await many.done
        finally:
            many.cancel()  # done, or its caller went away: nothing more is relayed
            for timer in timers:
                timer.cancel()


class RetryingSource(_Source):
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

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        """The blocks that met an outage are asked again, with exponential backoff, until they
        land or ``deadline_s`` has passed; the others are answered as they land."""
        start = time.monotonic()
        delay = 0.05
        todo = list(range(len(asks)))
        while failed := await self._ask(manifest, asks, todo, answer, start):
            waited = time.monotonic() - start
            self._down(failed[0][1], len(failed))
            await asyncio.sleep(min(delay, max(0.0, self.deadline_s - waited)))
            delay = min(delay * 2, self.max_delay_s)
            todo = sorted(n for n, _ in failed)

    async def _ask(self, manifest: DiskManifest, asks: Sequence[Ask], todo: list[int], answer: Answer,
                   start: float) -> list[tuple[int, RepositoryUnavailable]]:  # fmt: skip
        """One round of ``fetch_many``: the blocks ``todo`` of ``asks``; those that met an outage
        (while the deadline allows another round) are not answered but returned."""
        failed: list[tuple[int, RepositoryUnavailable]] = []

        def relay(k: int, got: Fetched | Exception) -> None:
            n = todo[k]
            if isinstance(got, RepositoryUnavailable) and time.monotonic() - start < self.deadline_s:
                failed.append((n, got))
                return
            if not isinstance(got, Exception):
                self._back()
            answer(n, got)

        await self.inner.fetch_many(manifest, [asks[n] for n in todo], relay)
        return failed

    def _down(self, e: RepositoryUnavailable, blocks: int) -> None:
        if self.available:
            self.available = False
            self.outages += 1
            log.warning("repository unavailable (%s); retrying for up to %.0f s", e, self.deadline_s)
        self.retries += blocks

    def _back(self) -> None:
        if not self.available:
            self.available = True
            log.warning("repository is back after an outage; resuming")


REMEMBER_CHUNKS = 16384  # landed chunks ``SharedChunks`` copies from: 1 GiB of 64 KiB blocks, about 3 MB


@dataclass(slots=True)
class _Joiner:
    """An ask served by another ask's fetch of the same chunk."""

    taker: _Many
    n: int  # its place among its caller's asks
    manifest: DiskManifest
    index: int
    sink: Sink | None


class SharedChunks(_Source):
    """Filter: one fetch per chunk for all the restore points one agent serves.

    Restore points of one VM, and VMs cloned from one template, share most of their chunks. The
    repository stores each chunk once, but each point has a read-cache of its own, and each
    fetched it again: 16 VMs restored from one golden image brought every boot block over the
    link 16 times (bench mass_restore). Here an ask for a chunk that is being fetched for another
    ask waits for that fetch and copies its block from the cache it landed in; an ask for a
    chunk that landed lately (the last ``remember``) copies it at once. The copy is a local read
    and write in a thread; if the block cannot be read back (its point was released), the ask is
    fetched after all. A joined ask crosses no link: it is answered with no stored bytes and no
    share of a request, once the fetch it joined is answered (after that fetch's link time).
    Only asks whose sink is ``Rereadable`` (a read-cache block) can be joined."""

    def __init__(self, inner: BlockSource, remember: int = REMEMBER_CHUNKS) -> None:
        self.inner = inner
        self.remember = remember
        self.shared_blocks = 0  # asks answered from another ask's fetch
        self._flying: dict[bytes, list[_Joiner]] = {}  # chunk id -> asks waiting for its fetch
        self._landed: OrderedDict[bytes, Rereadable] = OrderedDict()  # chunk id -> a block holding it
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="share")
        self._tasks: set[asyncio.Task[None]] = set()

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        if not asks:
            return
        many = _Many(answer, len(asks))
        own: list[tuple[int, bytes]] = []  # the asks fetched here: place among ``asks``, chunk id
        flying: dict[bytes, int] = {}  # chunks fetched here that others may join, and which ask fetches each
        for n, (index, sink) in enumerate(asks):
            k = manifest.position(index)
            assert k is not None, "zero blocks are never fetched"
            cid = manifest.raw_id(k)
            if (waiting := self._flying.get(cid)) is not None:
                waiting.append(_Joiner(many, n, manifest, index, sink))
            elif (kept := self._landed.get(cid)) is not None:
                self._landed.move_to_end(cid)
                self._spawn(self._copy(cid, kept, [_Joiner(many, n, manifest, index, sink)]))
            else:
                own.append((n, cid))
                if isinstance(sink, Rereadable):
                    self._flying[cid] = []
                    flying[cid] = n

        def relay(j: int, got: Fetched | Exception) -> None:
            n, cid = own[j]
            many.answer(n, got)  # first: the block is marked as held in its cache before it is read back
            if flying.get(cid) != n:
                return
            del flying[cid]
            joiners = self._flying.pop(cid)
            sink = asks[n][1]
            assert isinstance(sink, Rereadable), "only a rereadable ask is flown for others"
            if isinstance(got, Exception):
                self._refetch(joiners)  # a failure is theirs to meet (or not) on their own
                return
            self._keep(cid, sink)
            if joiners:
                self._spawn(self._copy(cid, sink, joiners))

        try:
            if own:
                await self.inner.fetch_many(manifest, [asks[n] for n, _ in own], relay)
            await many.done
        finally:
            many.cancel()  # done, or its caller went away: nothing more is relayed
            for cid in flying:  # fetches never answered (the reader went away): their joiners fetch
                self._refetch(self._flying.pop(cid))
            flying.clear()  # a late answer must not take another call's entry for the same chunk

    def _keep(self, cid: bytes, block: Rereadable) -> None:
        self._landed[cid] = block
        self._landed.move_to_end(cid)
        if len(self._landed) > self.remember:
            self._landed.popitem(last=False)

    async def _copy(self, cid: bytes, kept: Rereadable, joiners: list[_Joiner]) -> None:
        """Copy the block ``kept`` holds into each joiner's sink, in a thread; fetch the joiners
        after all when it cannot be read back."""
        joiners = [j for j in joiners if not j.taker.done.done()]  # whose reader went away gets nothing
        if not joiners:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._pool, _copy_into, kept, joiners)
        except RuntimeError as e:  # the pool is shut down: the agent is closing
            for joiner in joiners:
                joiner.taker.answer(joiner.n, e)
            return
        if results is None:
            if self._landed.get(cid) is kept:
                del self._landed[cid]
            self._refetch(joiners)
            return
        for joiner, got in zip(joiners, results, strict=True):
            if not isinstance(got, Exception):
                self.shared_blocks += 1
            joiner.taker.answer(joiner.n, got)

    def _refetch(self, joiners: list[_Joiner]) -> None:
        for joiner in joiners:
            if not joiner.taker.done.done():  # its reader is still there
                self._spawn(self._fetch_alone(joiner))

    async def _fetch_alone(self, joiner: _Joiner) -> None:
        try:
            await self.inner.fetch_many(joiner.manifest, [(joiner.index, joiner.sink)],
                                        lambda _j, got: joiner.taker.answer(joiner.n, got))  # fmt: skip
        except Exception as e:
            joiner.taker.answer(joiner.n, e)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _copy_into(kept: Rereadable, joiners: list[_Joiner]) -> list[Fetched | Exception] | None:
    """In a ``SharedChunks`` thread: the block ``kept`` holds, written to each joiner's sink (or
    handed over when it has none); None when it cannot be read back."""
    try:
        data = kept.read_back()
    except OSError:  # the cache disk failed a read: the repository still has the chunk
        return None
    if data is None:
        return None
    out: list[Fetched | Exception] = []
    for joiner in joiners:
        try:
            if joiner.sink is not None:
                joiner.sink(data)
            out.append(Fetched(len(data), 0, b"" if joiner.sink is not None else data, request_share=0.0, shared=True))
        except OSError as e:  # its own cache is full: that read fails, as a fetch's would
            out.append(e)
    return out


def emulate_link(source: BlockSource, latency_ms: float = 0.0, mbps: float = 0.0) -> BlockSource:
    """``source`` behind the slow-repository emulation when one is asked for."""
    if latency_ms > 0 or mbps > 0:
        return ThrottledSource(source, latency_ms, mbps)
    return source
