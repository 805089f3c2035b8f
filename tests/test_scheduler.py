"""Scheduler priorities: measured on a real agent over NBD against a slow emulated repository."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from liverestore.agent import scheduler
from liverestore.agent.scheduler import FetchClass, FetchScheduler, Job, Mode
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.nbdclient import NbdClient

KiB = 1024


def _small_block_point(tmp_path: Path) -> tuple[Repository, RestorePoint]:
    repo = Repository.init(tmp_path / "repo64k", block_size=64 * KiB)
    disk = tmp_path / "busy.raw"
    disk.write_bytes(random.Random(7).randbytes(256 * 64 * KiB))  # 256 allocated blocks
    return repo, run_backup(repo, "vm1", [disk], [])[0]


def _demand_latency(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory, cache: Path, mode: Mode, prefetch: int
) -> float:
    agent = start_agent(repo, point, cache_dir=cache, repo_latency_ms=20, fetch_slots=4, mode=mode)
    if prefetch:
        agent.run(agent.agent.prefetch, "vm1/busy", range(prefetch), FetchClass.PREFETCH)
        time.sleep(0.1)  # the queue is now long and busy
        assert agent.agent.scheduler.queued(FetchClass.PREFETCH) > prefetch // 2
    c = NbdClient("127.0.0.1", agent.port, "vm1/busy")
    t0 = time.monotonic()
    c.read(250 * 64 * KiB, 4096)  # a block no prefetch asked for
    took = time.monotonic() - t0
    c.close()
    agent.close()
    return took


def test_demand_read_jumps_a_long_prefetch_queue(tmp_path: Path, start_agent: AgentFactory) -> None:
    repo, point = _small_block_point(tmp_path)
    alone = _demand_latency(repo, point, start_agent, tmp_path / "c1", Mode.DEMAND_FIRST, 0)
    with_prefetch = _demand_latency(repo, point, start_agent, tmp_path / "c2", Mode.DEMAND_FIRST, 200)
    fifo = _demand_latency(repo, point, start_agent, tmp_path / "c3", Mode.FIFO, 200)
    print(
        f"demand read latency: alone {alone * 1000:.1f} ms, behind 200 prefetches "
        f"demand-first {with_prefetch * 1000:.1f} ms, fifo {fifo * 1000:.1f} ms"
    )
    # 200 queued fetches at 20 ms on 4 slots is ~1 s of work: FIFO pays it, demand-first does not
    assert fifo > 0.6
    assert with_prefetch < alone + 0.05
    assert with_prefetch < fifo / 5


def _started_order(mode: Mode, jobs: list[tuple[str, FetchClass]]) -> list[str]:
    return _tenant_order([(name, None, cls) for name, cls in jobs], mode=mode)


def test_fair_mode_alternates_demand_and_relocation() -> None:
    jobs = [(f"r{i}", FetchClass.RELOCATION) for i in range(4)] + [
        (f"d{i}", FetchClass.DEMAND) for i in range(4)
    ]
    jobs.append(("p0", FetchClass.PREFETCH))
    assert _started_order(Mode.FAIR, jobs) == ["d0", "r0", "d1", "r1", "d2", "r2", "d3", "r3", "p0"]
    assert _started_order(Mode.DEMAND_FIRST, jobs) == ["d0", "d1", "d2", "d3", "r0", "r1", "r2", "r3", "p0"]
    assert _started_order(Mode.FIFO, jobs) == [n for n, _ in jobs]


def test_demand_promotes_a_queued_prefetch_and_fetches_once() -> None:
    runs: list[tuple[str, FetchClass]] = []

    async def main() -> None:
        sched = FetchScheduler(slots=2, mode=Mode.DEMAND_FIRST)
        gate = asyncio.Event()

        async def slow(cls: FetchClass, name: str = "x") -> None:
            runs.append((name, cls))
            await gate.wait()

        def named(name: str) -> Job:
            return functools.partial(slow, name=name)

        blockers = [sched.submit(f"b{i}", FetchClass.DEMAND, named(f"b{i}")) for i in range(2)]
        pre = [sched.submit(f"k{i}", FetchClass.PREFETCH, named(f"k{i}")) for i in range(5)]
        again = sched.submit("k4", FetchClass.DEMAND, named("dup"))
        assert again is pre[4]  # joined, not duplicated
        gate.set()
        await asyncio.gather(*blockers, *pre)

    asyncio.run(main())
    names = [n for n, _ in runs]
    assert "dup" not in names and names.count("k4") == 1
    assert runs[2] == ("k4", FetchClass.DEMAND)  # promoted ahead of k0..k3


def _tenant_order(
    setup: Sequence[tuple[str, str | None, FetchClass]], modes: dict[str, Mode] | None = None,
    mode: Mode = Mode.DEMAND_FIRST,
) -> list[str]:
    """Start order of (name, tenant, class) jobs queued behind two busy slots."""
    order: list[str] = []

    async def main() -> None:
        sched = FetchScheduler(slots=2, mode=mode)
        for tenant, tmode in (modes or {}).items():
            sched.set_mode(tmode, tenant)
        gate = asyncio.Event()

        def job(name: str) -> Job:
            async def run(_cls: FetchClass) -> None:
                order.append(name)
                await gate.wait()
                await asyncio.sleep(0)

            return run

        # occupy both slots so everything after queues up
        blockers = [sched.submit(f"block{i}", FetchClass.DEMAND, job(f"block{i}")) for i in range(2)]
        futs = [sched.submit(name, cls, job(name), tenant) for name, tenant, cls in setup]
        gate.set()
        await asyncio.gather(*blockers, *futs)

    asyncio.run(main())
    return order[2:]


def test_tenants_take_turns_and_background_waits_for_every_tenant() -> None:
    """VM a floods the scheduler with guest reads and has set 2 queued; VM b's few reads, queued
    last, still start every other slot, and a's set 2 waits until nobody's reads are waiting."""
    jobs = [(f"a{i}", "a", FetchClass.DEMAND) for i in range(4)] + [("a-pre", "a", FetchClass.PREFETCH)]
    jobs += [(f"b{i}", "b", FetchClass.DEMAND) for i in range(2)]
    assert _tenant_order(jobs) == ["a0", "b0", "a1", "b1", "a2", "a3", "a-pre"]


def test_fair_mode_of_one_tenant_shares_only_its_own_turns() -> None:
    """a relocates (fair: its guest reads and set 3 alternate), b boots (demand-first); b is
    offered every other slot whatever a queues."""
    jobs = [(f"ar{i}", "a", FetchClass.RELOCATION) for i in range(3)] + [("ad0", "a", FetchClass.DEMAND)]
    jobs += [(f"b{i}", "b", FetchClass.DEMAND) for i in range(3)]
    order = _tenant_order(jobs, {"a": Mode.FAIR})
    assert order == ["ad0", "b0", "ar0", "b1", "ar1", "b2", "ar2"]
    # without the per-tenant mode, a's set 3 is background: after every guest read of both
    assert _tenant_order(jobs) == ["ad0", "b0", "b1", "b2", "ar0", "ar1", "ar2"]


def test_fifo_is_agent_wide() -> None:
    async def main() -> None:
        sched = FetchScheduler(slots=2)
        with pytest.raises(ValueError, match="agent-wide"):
            sched.set_mode(Mode.FIFO, "a")

    asyncio.run(main())


def test_forget_stops_one_tenant_and_leaves_the_others() -> None:
    """A point released at its pivot: its running fetch is stopped before its cache closes, its
    queued ones never start, and another point's work goes on."""
    ran: list[str] = []
    stopped: list[str] = []

    async def main() -> None:
        sched = FetchScheduler(slots=2)
        gate = asyncio.Event()

        def job(name: str) -> Job:
            async def run(_cls: FetchClass) -> None:
                ran.append(name)
                try:
                    await gate.wait()
                except asyncio.CancelledError:
                    stopped.append(name)
                    raise

            return run

        a_running = sched.submit("a0", FetchClass.RELOCATION, job("a0"), "a")
        b_running = sched.submit("b0", FetchClass.DEMAND, job("b0"), "b")
        a_queued = sched.submit("a1", FetchClass.DEMAND, job("a1"), "a")
        b_queued = sched.submit("b1", FetchClass.DEMAND, job("b1"), "b")
        await asyncio.sleep(0)
        await sched.forget("a")
        assert a_running.cancelled() and a_queued.cancelled()
        gate.set()
        await asyncio.gather(b_running, b_queued)

    asyncio.run(main())
    assert stopped == ["a0"] and "a1" not in ran and ran.count("b1") == 1


def _gated(started: list[str], gates: dict[str, asyncio.Event]) -> Callable[[str], Job]:
    """Jobs that note when they start and then hold their slot until their gate is set."""

    def job(name: str) -> Job:
        gates[name] = asyncio.Event()

        async def run(_cls: FetchClass) -> None:
            started.append(name)
            await gates[name].wait()

        return run

    return job


def test_a_free_slot_goes_to_the_tenant_with_fewest_fetches_in_flight() -> None:
    """Three VMs copy in bulk and hold every slot; a fourth boots, one read at a time. When a slot
    frees, the booting VM's read starts in it, not after a turn of every copier."""
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}
    job = _gated(started, gates)

    async def main() -> None:
        sched = FetchScheduler(slots=4)

        futs = [sched.submit(n, FetchClass.DEMAND, job(n), n[0]) for n in ("a0", "a1", "c0", "d0")]
        futs += [sched.submit(f"{t}{i}", FetchClass.DEMAND, job(f"{t}{i}"), t) for i in range(2, 5) for t in "cda"]
        await asyncio.sleep(0)
        futs.append(sched.submit("g0", FetchClass.DEMAND, job("g0"), "g"))
        await asyncio.sleep(0)
        assert started == ["a0", "a1", "c0", "d0"]
        gates["a0"].set()  # a still has a1 in flight, c and d one each, g none: g goes first
        await asyncio.sleep(0.01)
        assert started[4] == "g0", started
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*futs)

    asyncio.run(main())


@pytest.mark.parametrize("batch", [0.25, 0.0])
def test_background_work_starts_in_batches_on_packs_and_guest_reads_never_wait(batch: float) -> None:
    """On packs (``background_batch`` 0.25 of 16 slots) prefetch starts only once 4 slots are
    free, and then fills all but the last: its blocks reach the fetcher together and share ranged
    reads. Without batching (the emulated link) a prefetch starts as soon as 2 slots are free. A
    guest read takes a free slot at once either way."""
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}
    job = _gated(started, gates)

    async def main() -> None:
        sched = FetchScheduler(slots=16, background_batch=batch)

        futs = [sched.submit(f"d{i}", FetchClass.DEMAND, job(f"d{i}")) for i in range(16)]
        futs += [sched.submit(f"p{i}", FetchClass.PREFETCH, job(f"p{i}")) for i in range(20)]
        await asyncio.sleep(0)
        assert len(started) == 16 and not any(s.startswith("p") for s in started)
        for i in range(3):  # three slots free up, one by one
            gates[f"d{i}"].set()
            await asyncio.sleep(0.01)
        prefetches = [s for s in started if s.startswith("p")]
        if batch:
            assert prefetches == [], "a prefetch started before a quarter of the slots were free"
            futs.append(sched.submit("guest", FetchClass.DEMAND, job("guest")))
            await asyncio.sleep(0)
            assert started[-1] == "guest"  # a guest read is not held back by the batching
            gates["d3"].set()
            gates["d4"].set()  # now 4 slots are free: prefetch fills all but the last
            await asyncio.sleep(0.01)
            assert [s for s in started if s.startswith("p")] == ["p0", "p1", "p2"]
        else:
            assert prefetches == ["p0", "p1"]  # as soon as a second slot was free, never the last
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*futs)

    asyncio.run(main())


def test_set3_in_fair_mode_starts_in_batches_on_packs_and_guest_reads_never_wait() -> None:
    """In ``fair`` mode set 3 alternates with guest and mirror reads, but on packs it too waits
    until a quarter of the slots is free, then starts together (one ranged read), where a read
    takes the first free slot. Started one by one as single fetches answered, set 3 of an
    instant restore from SeaweedFS went out 4.5 blocks a call, and its requests per GiB doubled."""
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}
    job = _gated(started, gates)

    async def main() -> None:
        sched = FetchScheduler(slots=16, mode=Mode.FAIR, background_batch=0.25)
        futs = [sched.submit(f"d{i}", FetchClass.DEMAND, job(f"d{i}")) for i in range(16)]
        futs += [sched.submit(f"r{i}", FetchClass.RELOCATION, job(f"r{i}")) for i in range(20)]
        await asyncio.sleep(0)
        for i in range(3):  # three slots free up, one by one: set 3 waits
            gates[f"d{i}"].set()
            await asyncio.sleep(0.01)
        assert not [s for s in started if s.startswith("r")], "set 3 started before a quarter of the slots were free"
        futs.append(sched.submit("guest", FetchClass.DEMAND, job("guest")))
        await asyncio.sleep(0)
        assert started[-1] == "guest", "a read is not held back by set 3's batching"
        gates["d3"].set()
        gates["d4"].set()  # 4 slots free: set 3 takes them all, together
        await asyncio.sleep(0.01)
        assert [s for s in started if s.startswith("r")] == ["r0", "r1", "r2", "r3"]
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*futs)

    asyncio.run(main())


def test_bulk_tenants_share_a_quarter_of_the_slots_while_a_guest_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two VMs copy in bulk and hold all 16 slots. Once a third VM's guest reads, its read takes
    the next free slot, and the copiers start new fetches only while they hold fewer than 4: on a
    link that is one FIFO queue the guest's fetch waits behind everything in flight. Once the
    guest has not read for ``LIGHT_HOLD_S``, the copiers fill every slot again."""
    monkeypatch.setattr(scheduler, "LIGHT_HOLD_S", 0.05)
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}
    job = _gated(started, gates)

    def bulk_in_flight() -> int:
        return sum(1 for n in started if n != "g0" and not gates[n].is_set())

    async def main() -> None:
        sched = FetchScheduler(slots=16)
        futs = [sched.submit(f"{t}{i}", FetchClass.DEMAND, job(f"{t}{i}"), t) for t in "ab" for i in range(64)]
        await asyncio.sleep(0.1)  # the copiers' own first reads counted as light: let that pass
        assert len(started) == 16
        futs.append(sched.submit("g0", FetchClass.DEMAND, job("g0"), "g"))
        for n in list(started[:14]):  # fourteen of the copiers' fetches finish, one by one
            gates[n].set()
            await asyncio.sleep(0.001)
        assert started[16] == "g0", started[16:]
        assert bulk_in_flight() == 4, f"{bulk_in_flight()} bulk fetches in flight while the guest reads (cap 4)"
        await asyncio.sleep(0.1)  # the guest is quiet: the cap is gone at the next free slot
        gates[next(n for n in started if n != "g0" and not gates[n].is_set())].set()
        await asyncio.sleep(0.01)
        assert bulk_in_flight() == 15  # every slot but the guest's
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*futs)

    asyncio.run(main())
