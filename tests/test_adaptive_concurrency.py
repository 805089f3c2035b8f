"""Fetch concurrency that fits the link: the real scheduler and the real link emulation
(``ThrottledSource``: latency per request, one shared bandwidth), fixed 32 slots vs adaptive."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence

from liverestore.agent.concurrency import AdaptiveLimit
from liverestore.agent.scheduler import FetchClass, FetchScheduler, Job
from liverestore.agent.source import Answer, Ask, Fetched, Sink, ThrottledSource
from liverestore.repository import DiskManifest

KiB, MiB = 1024, 1024 * 1024


class InstantStore:
    """A store that answers at once: all the time is the emulated link's."""

    def __init__(self, block: int) -> None:
        self.block = block

    async def fetch(self, manifest: DiskManifest, index: int, sink: Sink | None = None) -> Fetched:
        return Fetched(self.block, self.block)

    async def fetch_many(self, manifest: DiskManifest, asks: Sequence[Ask], answer: Answer) -> None:
        for n in range(len(asks)):
            answer(n, Fetched(self.block, self.block))


def _sustained(link: ThrottledSource, limit: AdaptiveLimit | None, block: int, count: int,
               cls: FetchClass = FetchClass.DEMAND) -> tuple[list[float], float, int]:  # fmt: skip
    """(each fetch's latency, seconds for all, final slots) of ``count`` fetches all queued at
    once through the real scheduler: a load that keeps the link busy. ``limit`` None: 32 slots."""

    async def go() -> tuple[list[float], float, int]:
        manifest = DiskManifest(name="d", virtual_size=block * count, block_size=block, blocks=(None,) * count,
                                source_format="raw")  # fmt: skip
        sched = FetchScheduler(slots=32, adaptive=limit)
        latencies: list[float] = []

        def job(i: int) -> Job:
            async def run(_cls: FetchClass) -> None:
                t0 = time.monotonic()
                await link.fetch(manifest, i)
                latencies.append(time.monotonic() - t0)

            return run

        t0 = time.monotonic()
        await asyncio.gather(*(sched.submit(("d", i), cls, job(i)) for i in range(count)))
        took = time.monotonic() - t0
        await sched.close()
        return latencies, took, sched.slots

    return asyncio.run(go())


def _run(latency_ms: float, mbps: float, block: int, count: int, adaptive: bool) -> tuple[float, float, int]:
    """(throughput MB/s, median fetch latency s, final slots) of ``count`` background fetches."""
    link = ThrottledSource(InstantStore(block), latency_ms, mbps)
    latencies, took, slots = _sustained(link, AdaptiveLimit() if adaptive else None, block, count,
                                        FetchClass.RELOCATION)  # fmt: skip
    return block * count / 1e6 / took, statistics.median(latencies), slots


def test_a_long_fat_link_gets_more_fetches_in_flight() -> None:
    """50 ms per request, 1 Gbit/s, 64 KiB objects: 32 in flight move ~40 MB/s of the link's 125."""
    fixed, _, _ = _run(50, 1000, 64 * KiB, 2500, adaptive=False)
    adaptive, _, slots = _run(50, 1000, 64 * KiB, 2500, adaptive=True)
    print(f"50 ms / 1 Gbit/s: fixed 32 slots {fixed:.0f} MB/s, adaptive {adaptive:.0f} MB/s ({slots} slots)")
    assert slots > 60 and adaptive >= 1.5 * fixed


def test_a_short_congested_link_gets_fewer_and_stops_queueing() -> None:
    """1 ms per request, 400 Mbit/s, 1 MiB objects: 32 in flight only queue on the link."""
    fixed_tp, fixed_lat, _ = _run(1, 400, 1 * MiB, 120, adaptive=False)
    ad_tp, ad_lat, slots = _run(1, 400, 1 * MiB, 120, adaptive=True)
    print(f"1 ms / 400 Mbit/s: fixed {fixed_tp:.0f} MB/s, median latency {1000 * fixed_lat:.0f} ms; adaptive "
          f"{ad_tp:.0f} MB/s, {1000 * ad_lat:.0f} ms ({slots} slots)")  # fmt: skip
    assert slots < 16 and ad_lat < 0.5 * fixed_lat and ad_tp >= 0.9 * fixed_tp


def test_a_busy_link_holds_a_steady_short_queue() -> None:
    """10 ms per request, 1 Gbit/s, 64 KiB: ~20 fetches fill the link, and the limit lets the queue
    grow to about one more base latency. A limit stepped on every sample (2,000 a second) swung
    between 6 and 100 every 1.6 s, so fetches waited 12-57 ms (p5-p95); and where the queue never
    drained, a base latency that drifted up with the samples let the limit run to 256 (a guest
    beside 15 relocations once took 32.7 s, not 5.7 s)."""
    limit = AdaptiveLimit()
    latencies, _, _ = _sustained(ThrottledSource(InstantStore(64 * KiB), 10, 1000), limit, 64 * KiB, 10_000)
    late = statistics.quantiles(latencies[-5000:], n=20)
    print(f"busy 10 ms link: late p5 {1000 * late[0]:.1f} ms, p95 {1000 * late[-1]:.1f} ms, {limit.snapshot()}")
    assert late[-1] < 0.040 and limit.limit < 100


def test_a_link_that_became_slower_is_learned_again() -> None:
    """5 ms per request, then 30 ms for good: the base must follow, or the limit reads the new
    latency as a queue and shrinks to its minimum (4 fetches per 30 ms on a 1 Gbit/s link)."""
    limit = AdaptiveLimit(probe_every_s=0.5)
    link = ThrottledSource(InstantStore(64 * KiB), 5, 1000)
    _sustained(link, limit, 64 * KiB, 2000)
    link.latency = 0.030
    latencies, _, _ = _sustained(link, limit, 64 * KiB, 4000)
    snap = limit.snapshot()
    print(f"5 -> 30 ms: {snap}, late median {1000 * statistics.median(latencies[-1000:]):.1f} ms")
    assert limit.probes >= 1 and 0.025 < limit._base < 0.045 and limit.limit > 20
