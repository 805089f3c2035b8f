"""One scheduler for every repository fetch, so priorities hold across all exports.

Classes: ``demand`` (a client is waiting), ``relocation`` (set 3, ahead of the mirror) and
``prefetch`` (sets 1 and 2). Modes:

* ``demand-first`` — demand strictly first; background classes may never hold the last free
  slot, so a demand fetch that arrives finds a slot at once and is delayed by no prefetch block.
* ``fair`` — during relocation the guest and the mirror are both waiting on us: demand and
  relocation alternate round-robin; plain prefetch only fills idle slots (still never the last).
* ``fifo`` — one queue in arrival order; the naive baseline the benchmarks compare against.

A key (export, block) is fetched once: a second request joins the first, and a demand request
for a block queued as background work promotes it.
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


@dataclass
class _Entry:
    key: Hashable
    cls: FetchClass
    job: Job
    future: asyncio.Future[None]
    enqueued: float
    started: bool = False


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
    _queues: dict[FetchClass, deque[_Entry]] = field(default_factory=dict)
    _fifo: deque[_Entry] = field(default_factory=deque)
    _pending: dict[Hashable, _Entry] = field(default_factory=dict)
    _running: dict[FetchClass, int] = field(default_factory=dict)
    _turn: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stats: dict[FetchClass, ClassStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slots < 2:
            raise ValueError("the scheduler needs at least 2 fetch slots (one is kept for demand)")
        if self.adaptive is not None:
            self.slots = max(2, int(self.adaptive.limit))
        for c in FetchClass:
            self._queues[c] = deque()
            self._running[c] = 0
            self.stats[c] = ClassStats()

    # -- public --------------------------------------------------------------------------------
    def set_mode(self, mode: Mode) -> None:
        if mode != self.mode:
            log.info("scheduler mode %s -> %s", self.mode, mode)
            if Mode.FIFO in (mode, self.mode):
                self._requeue_all(mode)
            self.mode = mode
            self._pump()

    def submit(self, key: Hashable, cls: FetchClass, job: Job) -> asyncio.Future[None]:
        """Queue ``job`` under ``key`` (or join the pending one) and return its completion future."""
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
        entry = _Entry(key, cls, job, loop.create_future(), time.monotonic())
        self._pending[key] = entry
        self.stats[cls].queued += 1
        self._enqueue(entry)
        self._pump()
        return entry.future

    def cancel_queued(self, cls: FetchClass) -> int:
        """Drop not-yet-started work of a class (e.g. set 3 once the mirror has finished)."""
        dropped = 0
        for entry in list(self._pending.values()):
            if entry.cls == cls and not entry.started:
                del self._pending[entry.key]
                self.stats[cls].queued -= 1
                entry.future.cancel()
                dropped += 1
        return dropped

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
            "classes": {str(c): s.as_dict() for c, s in self.stats.items()},
        }

    # -- internals -----------------------------------------------------------------------------
    def _enqueue(self, entry: _Entry) -> None:
        (self._fifo if self.mode == Mode.FIFO else self._queues[entry.cls]).append(entry)

    def _requeue_all(self, mode: Mode) -> None:
        waiting = sorted((e for e in self._pending.values() if not e.started), key=lambda e: e.enqueued)
        self._fifo.clear()
        for q in self._queues.values():
            q.clear()
        for e in waiting:
            (self._fifo if mode == Mode.FIFO else self._queues[e.cls]).append(e)

    def _live_head(self, q: deque[_Entry], cls: FetchClass | None) -> _Entry | None:
        while q:
            e = q[0]
            if e.started or self._pending.get(e.key) is not e or (cls is not None and e.cls != cls):
                q.popleft()  # stale: started, cancelled or promoted to another queue
                continue
            return e
        return None

    def _pick(self) -> _Entry | None:
        busy = sum(self._running.values())
        free = self.slots - busy
        if free <= 0:
            return None
        if self.mode == Mode.FIFO:
            return self._live_head(self._fifo, None)
        demand = self._live_head(self._queues[FetchClass.DEMAND], FetchClass.DEMAND)
        reloc = self._live_head(self._queues[FetchClass.RELOCATION], FetchClass.RELOCATION)
        pre = self._live_head(self._queues[FetchClass.PREFETCH], FetchClass.PREFETCH)
        background_ok = free > 1  # the last slot is always kept for demand
        if self.mode == Mode.FAIR:
            if demand and (reloc is None or self._turn % 2 == 0):
                self._turn += 1
                return demand
            if reloc:
                self._turn += 1
                return reloc
        else:
            if demand:
                return demand
            if reloc and background_ok:
                return reloc
        if pre and background_ok:
            return pre
        return None

    def _pump(self) -> None:
        while (entry := self._pick()) is not None:
            entry.started = True
            st = self.stats[entry.cls]
            st.queued -= 1
            st.started += 1
            wait = time.monotonic() - entry.enqueued
            st.wait_total += wait
            st.wait_max = max(st.wait_max, wait)
            self._running[entry.cls] += 1
            task = asyncio.get_running_loop().create_task(self._run(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, entry: _Entry) -> None:
        cls = entry.cls
        inflight, t0 = sum(self._running.values()), time.monotonic()
        try:
            await entry.job(cls)
        except asyncio.CancelledError:
            if not entry.future.done():
                entry.future.cancel()
            raise
        except BaseException as e:
            if not entry.future.done():
                entry.future.set_exception(e)
        else:
            if not entry.future.done():
                entry.future.set_result(None)
            if self.adaptive is not None:  # only completed fetches say something about the link
                self.slots = max(2, self.adaptive.sample(time.monotonic() - t0, inflight))
        finally:
            self._running[cls] -= 1
            if self._pending.get(entry.key) is entry:
                del self._pending[entry.key]
            with contextlib.suppress(RuntimeError):
                self._pump()


def _rank(cls: FetchClass) -> int:
    return {FetchClass.DEMAND: 0, FetchClass.RELOCATION: 1, FetchClass.PREFETCH: 2}[cls]
