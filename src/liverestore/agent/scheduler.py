"""One scheduler for every repository fetch, so priorities hold across all exports.

Classes: ``demand`` (a client is waiting), ``relocation`` (set 3 ahead of the mirror, and
readahead ahead of any reader walking a disk in order) and ``prefetch`` (sets 1 and 2). Modes:

* ``demand-first`` — demand strictly first; background classes may never hold the last free
  slot, so a demand fetch that arrives finds a slot at once and is delayed by no prefetch block.
  On packs they start in batches, once a quarter of the slots are free, so their blocks share
  ranged requests.
* ``fair`` — during relocation the guest and the mirror are both waiting on us: demand and
  relocation alternate round-robin; plain prefetch only fills idle slots (still never the last).
* ``fifo`` — one queue in arrival order; the naive baseline the benchmarks compare against.

A key (export, block) is fetched once: a second request joins the first, and a demand request
for a block queued as background work promotes it. The fetches that start in one turn run as
one call per disk, tenant and class (``GroupJob``), each still its own slot and its own answer.

One agent may serve several restore points at once (mass restore). Each fetch names its
*tenant* (the point it serves), every tenant has its own queues and may have its own mode, and
the foreground work of the tenants — guest reads, and set 3 where that tenant is relocating —
shares the slots: a free slot goes to the tenant with the fewest fetches in flight, ties in
turn. So one VM's relocation or read flood gets its share of the link and no more, and a booting
guest, one read at a time, starts its fetch at the next free slot; taking strict turns, it waited
for a turn of every bulk copier first. No tenant's background copy (set 2) starts while any
tenant has a guest read waiting, and while a light tenant (a booting guest) is reading, the heavy
ones together start no more fetches than a quarter of the slots. ``fifo`` stays agent-wide: it is
the baseline with no priorities at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from liverestore.agent.concurrency import AdaptiveLimit

log = logging.getLogger("liverestore.scheduler")


class FetchClass(StrEnum):
    DEMAND = "demand"
    RELOCATION = "relocation"
    PREFETCH = "prefetch"


class Mode(StrEnum):
    DEMAND_FIRST = "demand-first"
    FAIR = "fair"
    FIFO = "fifo"


Job = Callable[["FetchClass"], Awaitable[None]]
Tenant = Hashable  # whose fetch: one served restore point (None when an agent serves one)


class Report(Protocol):
    """Item ``n`` of a group is done (``error`` None) or failed. ``fetched`` False: it was done
    without a fetch over the link (already cached, or copied from another point's fetch of the
    same chunk), so its time is no sample of the link's latency: such answers, in a millisecond,
    made the adaptive limit take 0.16 ms for the link's own latency and hold 4 fetches in flight
    for 16 booting clones (the short trace of bench mass_restore: 20.5 s against 16.4 s
    unshared; 11.4-13.2 s once these answers were no longer samples)."""

    def __call__(self, n: int, error: BaseException | None, fetched: bool = True) -> None: ...


GroupRunner = Callable[[list[Any], "FetchClass", Report], Awaitable[None]]

LIGHT_BLOCKS = 32  # a tenant with fewer fetches than this running and queued reads like a booting guest
LIGHT_HOLD_S = 1.0  # how long after a light tenant's last read the heavy tenants stay capped
BULK_SHARE = 4  # meanwhile the heavy tenants together hold at most 1/BULK_SHARE of the slots (see _pump)


@dataclass(frozen=True)
class GroupJob:
    """A fetch that runs together with the others of its ``runner`` (and tenant and class) that
    start in the same turn of the scheduler: one call for all their ``item``s, which reports
    each item as it is done. A cold 1 MiB read at 64 KiB blocks starts 16 fetches at once; a
    task, a chain of coroutines and a future each cost more of the event loop than the read."""

    runner: GroupRunner
    item: Any


async def _run_jobs(jobs: list[Job], cls: FetchClass, report: Report) -> None:
    """The runner of plain jobs: each on its own, reported as it ends."""

    async def one(n: int, job: Job) -> None:
        try:
            await job(cls)
        except Exception as e:
            report(n, e)
        else:
            report(n, None)

    if len(jobs) == 1:
        await one(0, jobs[0])
    else:
        await asyncio.gather(*(one(n, job) for n, job in enumerate(jobs)))


@dataclass
class _Entry:
    key: Hashable
    cls: FetchClass
    job: GroupJob
    future: asyncio.Future[None]
    enqueued: float
    tenant: Tenant = None
    started: bool = False
    task: asyncio.Task[None] | None = None  # once started
    counted_in: _TenantQueues | None = None  # whose in-flight count it raised when it started
    finished: bool = False  # its slot is given back


@dataclass
class _TenantQueues:
    """One tenant's queues, its own mode (None: the scheduler's) and its demand/relocation turn."""

    queues: dict[FetchClass, deque[_Entry]] = field(default_factory=lambda: {c: deque() for c in FetchClass})
    mode: Mode | None = None
    turn: int = 0
    running: int = 0  # its fetches in flight: who holds fewer is offered a free slot first


@dataclass
class ClassStats:
    queued: int = 0
    started: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "started": self.started,
            "queued_now": self.queued,
            "wait_avg_ms": round(1000 * self.wait_total / self.started, 3) if self.started else 0.0,
            "wait_max_ms": round(1000 * self.wait_max, 3),
        }


@dataclass
class FetchScheduler:
    slots: int = 4
    mode: Mode = Mode.DEMAND_FIRST
    adaptive: AdaptiveLimit | None = None  # when set, ``slots`` follows the link (see concurrency.py)
    background_batch: float = 0.0  # share of the slots free before background work starts (see ``_pump``)
    _tenants: dict[Tenant, _TenantQueues] = field(default_factory=dict)
    _rotation: list[_TenantQueues] = field(default_factory=list)  # the tenants in turn order (no copy per pick)
    _fifo: deque[_Entry] = field(default_factory=deque)
    _pending: dict[Hashable, _Entry] = field(default_factory=dict)
    _running: dict[FetchClass, int] = field(default_factory=dict)
    _next_tenant: int = 0  # round-robin: the tenant offered the next slot first
    _light_until: float = 0.0  # until when a light tenant (a booting guest) counts as reading
    _pump_due: bool = False  # a _pump is scheduled for this turn (slots freed by a group's reports)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stats: dict[FetchClass, ClassStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slots < 2:
            raise ValueError("the scheduler needs at least 2 fetch slots (one is kept for demand)")
        if self.adaptive is not None:
            self.slots = max(2, int(self.adaptive.limit))
        for c in FetchClass:
            self._running[c] = 0
            self.stats[c] = ClassStats()

    # -- public --------------------------------------------------------------------------------
    def set_mode(self, mode: Mode, tenant: Tenant = None) -> None:
        """The agent-wide mode, or (``tenant`` given) one tenant's: a restore that starts relocating
        puts its own point in ``fair`` and leaves the other VMs' reads where they were."""
        if tenant is not None:
            if mode == Mode.FIFO:
                raise ValueError("fifo has no priorities to give one tenant: it is agent-wide")
            t = self._tenant(tenant)
            if t.mode != mode:
                log.info("scheduler mode %s -> %s for point %s", t.mode or self.mode, mode, tenant)
                t.mode = mode
                self._pump()
            return
        if mode != self.mode:
            log.info("scheduler mode %s -> %s", self.mode, mode)
            if Mode.FIFO in (mode, self.mode):
                self._requeue_all(mode)
            self.mode = mode
        for t in self._tenants.values():
            t.mode = None
        self._pump()

    def submit(self, key: Hashable, cls: FetchClass, job: Job | GroupJob, tenant: Tenant = None) -> asyncio.Future[None]:
        """Queue ``job`` under ``key`` (or join the pending one) and return its completion future."""
        if not isinstance(job, GroupJob):
            job = GroupJob(_run_jobs, job)
        entry = self._pending.get(key)
        if entry is not None:
            if not entry.started and _rank(cls) < _rank(entry.cls):
                self.stats[entry.cls].queued -= 1
                entry.cls = cls  # promote; the stale copy in the old queue is skipped when popped
                self.stats[cls].queued += 1
                self._enqueue(entry)
                self._pump()
            return entry.future
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if cls == FetchClass.DEMAND and len(self._rotation) > 1:
            t = self._tenants.get(tenant)
            if t is None or self._load(t) < LIGHT_BLOCKS:
                self._light_until = now + LIGHT_HOLD_S
        entry = _Entry(key, cls, job, loop.create_future(), now, tenant)
        self._pending[key] = entry
        self.stats[cls].queued += 1
        self._enqueue(entry)
        self._pump()
        return entry.future

    def cancel_queued(self, cls: FetchClass, tenant: Tenant = None) -> int:
        """Drop not-yet-started work of a class (e.g. set 3 once the mirror has finished), of one
        tenant or (``tenant`` None) of all."""
        dropped = 0
        for entry in list(self._pending.values()):
            if entry.cls == cls and not entry.started and (tenant is None or entry.tenant == tenant):
                del self._pending[entry.key]
                self.stats[cls].queued -= 1
                entry.future.cancel()
                dropped += 1
        return dropped

    async def forget(self, tenant: Tenant) -> None:
        """Drop a tenant's queued fetches and stop its running ones (its point is released while
        the others are served on). A fetch or copy thread already running may still write a
        block into its cache: no bit is set for it, and once the cache is closed such a write
        fails with EBADF (``BlockFile._users``)."""
        for cls in FetchClass:
            self.cancel_queued(cls, tenant)
        running = [e.task for e in self._pending.values() if e.tenant == tenant and e.task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        t = self._tenants.pop(tenant, None)
        if t is not None:
            self._rotation.remove(t)
            self._next_tenant = 0

    async def close(self) -> None:
        """Drop queued work and stop fetches in flight (the agent is shutting down)."""
        for cls in FetchClass:
            self.cancel_queued(cls)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def queued(self, cls: FetchClass) -> int:
        return self.stats[cls].queued

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": str(self.mode),
            "slots": self.slots,
            "adaptive": self.adaptive.snapshot() if self.adaptive else None,
            "running": {str(c): n for c, n in self._running.items()},
            "tenants": {str(k): str(t.mode or self.mode) for k, t in self._tenants.items()},
            "classes": {str(c): s.as_dict() for c, s in self.stats.items()},
        }

    # -- internals -----------------------------------------------------------------------------
    def _tenant(self, tenant: Tenant) -> _TenantQueues:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _TenantQueues()
            self._rotation.append(t)
        return t

    def _enqueue(self, entry: _Entry) -> None:
        if self.mode == Mode.FIFO:
            self._fifo.append(entry)
        else:
            self._tenant(entry.tenant).queues[entry.cls].append(entry)

    def _requeue_all(self, mode: Mode) -> None:
        waiting = sorted((e for e in self._pending.values() if not e.started), key=lambda e: e.enqueued)
        self._fifo.clear()
        for t in self._tenants.values():
            for q in t.queues.values():
                q.clear()
        for e in waiting:
            if mode == Mode.FIFO:
                self._fifo.append(e)
            else:
                self._tenant(e.tenant).queues[e.cls].append(e)

    def _live_head(self, q: deque[_Entry], cls: FetchClass | None) -> _Entry | None:
        while q:
            e = q[0]
            if e.started or self._pending.get(e.key) is not e or (cls is not None and e.cls != cls):
                q.popleft()  # stale: started, cancelled or promoted to another queue
                continue
            return e
        return None

    def _head(self, t: _TenantQueues, cls: FetchClass) -> _Entry | None:
        return self._live_head(t.queues[cls], cls)

    def _foreground(self, t: _TenantQueues, set3_ok: bool) -> _Entry | None:
        """A tenant's guest read, or in ``fair`` mode its guest reads and set 3 in alternation
        (set 3 only when ``set3_ok``, as background work: see ``_pump``)."""
        demand = self._head(t, FetchClass.DEMAND)
        if (t.mode or self.mode) != Mode.FAIR:
            return demand
        reloc = self._head(t, FetchClass.RELOCATION) if set3_ok else None
        if demand and (reloc is None or t.turn % 2 == 0):
            t.turn += 1
            return demand
        if reloc:
            t.turn += 1
        return reloc

    def _background(self, t: _TenantQueues) -> _Entry | None:
        """Set 3 of a tenant in ``demand-first`` mode, then set 2: never in the last free slot."""
        if (t.mode or self.mode) != Mode.FAIR and (reloc := self._head(t, FetchClass.RELOCATION)):
            return reloc
        return self._head(t, FetchClass.PREFETCH)

    @staticmethod
    def _load(t: _TenantQueues) -> int:
        """A tenant's fetches running, and its guest reads and set 3 queued (stale queue entries
        included: an estimate). Its set 2 does not count: every restore queues one."""
        return t.running + len(t.queues[FetchClass.DEMAND]) + len(t.queues[FetchClass.RELOCATION])

    def _pick(self, background_ok: bool, bulk_cap: int | None = None, set3_ok: bool = True) -> _Entry | None:
        """The next entry to start, if a slot is free: foreground work first (set 3 of a ``fair``
        tenant only when ``set3_ok``), background work only when ``background_ok`` and never into
        the last free slot; with ``bulk_cap``, no tenant heavier than a booting guest starts one
        while such tenants hold that many."""
        busy = sum(self._running.values())
        free = self.slots - busy
        if free <= 0:
            return None
        if self.mode == Mode.FIFO:
            return self._live_head(self._fifo, None)
        # Nothing queued that could start: the last pick of every pump, and most picks at all,
        # since a pump runs at every submit and every answered batch. Said by the counters, not
        # by a pass over every tenant's queues: 16 booting guests at 64 KiB spent 5-6 s more of
        # the agent's one core under this mode than under fifo, most of it in such passes.
        stats = self.stats
        if not (stats[FetchClass.DEMAND].queued or stats[FetchClass.RELOCATION].queued) and not (
                background_ok and free > 1 and stats[FetchClass.PREFETCH].queued):  # fmt: skip
            return None
        tenants = self._rotation
        n = len(tenants)
        turns = [(self._next_tenant + k) % n for k in range(n)]
        if n > 1:  # fewest in flight first, ties in turn (sorted() keeps the turn order)
            turns.sort(key=lambda i: tenants[i].running)
        if bulk_cap is not None:
            heavy = [self._load(t) >= LIGHT_BLOCKS for t in tenants]
            if sum(t.running for t, h in zip(tenants, heavy, strict=True) if h) >= bulk_cap:
                turns = [i for i in turns if not heavy[i]]
        passes = (False, True) if free > 1 and background_ok else (False,)
        for background in passes:  # every tenant's foreground work before anyone's background work
            for i in turns:
                t = tenants[i]
                if (entry := self._background(t) if background else self._foreground(t, set3_ok)) is not None:
                    self._next_tenant = (i + 1) % n
                    return entry
        return None

    def _pump(self) -> None:
        # Where neighbouring blocks share ranged requests (packs), background work starts in
        # batches: only once ``background_batch`` of the slots are free, and then it fills them.
        # Started one by one as single fetches completed, its blocks reached the fetcher a few at
        # a time and split into small ranged reads: on SeaweedFS at 64 KiB blocks, a cold read
        # with readahead took 1.3x the requests and up to 1.1x the time it took without. Batched,
        # two thirds of those requests and less time than either. Where every block pays its
        # own round trip (the emulated link) batching saves no request and leaves slots idle:
        # a relocation at 64 KiB behind it took 1.21-1.33x the link time instead of 1.18-1.22x.
        # Guest reads are never held back: they take any free slot at once.
        free = self.slots - sum(self._running.values())
        if free <= 0:  # nothing can start: every submit pumps, and a cold read submits a block at a time
            return
        background_ok = free >= max(2, int(self.slots * self.background_batch))
        # Set 3 in ``fair`` mode too: it runs ahead of the mirror, so it can wait for a batch,
        # and started a few blocks at a time as single fetches answered, its ranged reads stayed
        # small (an instant restore from SeaweedFS at 64 KiB: 4.5 blocks a fetch call).
        set3_ok = free >= max(1, int(self.slots * self.background_batch))
        # While a light tenant (a booting guest, a read or a few at a time) has read within the
        # last second, the heavy ones (relocations, bulk copies) share a quarter of the slots.
        # On a link that is one FIFO queue the guest's fetch waits behind everything in flight,
        # and on 2 cores behind the agent's work for it too. One guest booting beside 15 bulk
        # readers (10 ms link, 64 KiB): 5.3-7.8 s uncapped, 5.2-5.3 s with half the slots,
        # 3.1-3.4 s with a quarter, against 1.8 s alone. The copiers get every slot back a
        # second after the guest's last read.
        bulk_cap = max(2, self.slots // BULK_SHARE) if time.monotonic() < self._light_until else None
        groups: dict[tuple[GroupRunner, Tenant, FetchClass], list[_Entry]] = {}
        while (entry := self._pick(background_ok, bulk_cap, set3_ok)) is not None:
            entry.started = True
            st = self.stats[entry.cls]
            st.queued -= 1
            st.started += 1
            wait = time.monotonic() - entry.enqueued
            st.wait_total += wait
            st.wait_max = max(st.wait_max, wait)
            self._running[entry.cls] += 1
            if (t := self._tenants.get(entry.tenant)) is not None:  # none under fifo
                t.running += 1
                entry.counted_in = t
            # one group is one tenant's: ``forget`` stops a tenant's fetches by their task
            groups.setdefault((entry.job.runner, entry.tenant, entry.cls), []).append(entry)
        for (runner, _, cls), entries in groups.items():
            task = asyncio.get_running_loop().create_task(self._run(runner, cls, entries))
            for entry in entries:
                entry.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, runner: GroupRunner, cls: FetchClass, entries: list[_Entry]) -> None:
        inflight, t0 = sum(self._running.values()), time.monotonic()

        def report(n: int, error: BaseException | None, fetched: bool = True) -> None:
            if not entries[n].finished:
                self._finish(entries[n], error, t0 if fetched else None, inflight)
                self._pump_soon()

        try:
            await runner([e.job.item for e in entries], cls, report)
        except asyncio.CancelledError:
            for e in entries:
                self._finish(e, asyncio.CancelledError())
            raise
        except BaseException as error:
            for e in entries:
                self._finish(e, error)
        else:
            for e in entries:  # a runner answers every item; one it forgot must not hang its reader
                self._finish(e, RuntimeError(f"fetch {e.key} ended without an answer"))
        finally:
            self._pump_soon()

    def _finish(self, entry: _Entry, error: BaseException | None, t0: float | None = None, inflight: int = 0) -> None:
        """Settle a started fetch (once) and give its slot back; a completed one that went over
        the link (``t0``: when it started) is a sample of the link's latency."""
        if entry.finished:
            return
        entry.finished = True
        if not entry.future.done():
            if isinstance(error, asyncio.CancelledError):
                entry.future.cancel()
            elif error is not None:
                entry.future.set_exception(error)
            else:
                entry.future.set_result(None)
        if error is None and t0 is not None and self.adaptive is not None:  # only completed fetches say something about the link
            self.slots = max(2, self.adaptive.sample(time.monotonic() - t0, inflight))
        self._running[entry.cls] -= 1
        if entry.counted_in is not None:
            entry.counted_in.running -= 1
        if self._pending.get(entry.key) is entry:
            del self._pending[entry.key]

    def _pump_soon(self) -> None:
        """One ``_pump`` for all the slots freed in this turn, not one per block answered."""
        if not self._pump_due:
            with contextlib.suppress(RuntimeError):  # no loop: the agent is shutting down
                asyncio.get_running_loop().call_soon(self._pump_later)
                self._pump_due = True

    def _pump_later(self) -> None:
        self._pump_due = False
        self._pump()


def _rank(cls: FetchClass) -> int:
    return {FetchClass.DEMAND: 0, FetchClass.RELOCATION: 1, FetchClass.PREFETCH: 2}[cls]
