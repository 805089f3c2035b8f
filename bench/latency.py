"""Guest read latency while set 2 (background copy) runs: is the priority real?

A real boot trace is recorded once (an instant restore of the test VM), then replayed by an NBD
client against a cold agent with a slow repository, three ways: no background work, background
copy under ``demand-first`` scheduling, and the same background copy through a plain FIFO queue.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, percentile, write_results
from liverestore.agent.agent import AgentConfig
from liverestore.agent.prefetch import start_background
from liverestore.agent.scheduler import Mode
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions
from liverestore.testvm import build_test_vm
from tests.helpers import AgentThread
from tests.nbdclient import NbdClient


def record_trace(repo: Repository, work: Path) -> list[tuple[int, int]]:
    async def go() -> list[tuple[int, int]]:
        job = InstantRestore(repo, RestoreOptions(vm="vm", dest=work / "trace", cache_dir=work / "trace-cache",
                                                  relocate=False, use_profile=False, record_profile=False))  # fmt: skip
        try:
            await job.run()
            assert job.agent is not None
            return [(e.offset, e.length) for e in job.agent.recorder.events]
        finally:
            await job.close()

    return asyncio.run(go())


def traced_test_vm(tmp: Path, quick: bool) -> tuple[Repository, list[tuple[int, int]]]:
    """The test VM (1 GiB) backed up as ``vm`` at 64 KiB blocks, and its boot trace (the first
    1,500 reads with ``quick``)."""
    image = build_test_vm(tmp / "vm.raw", size=1024 * MiB, payload_mb=90, cold_mb=200 if quick else 400)
    repo = Repository.init(tmp / "repo", block_size=64 * 1024)
    run_backup(repo, "vm", [image.path], [])
    trace = record_trace(repo, tmp)
    return repo, trace[:1500] if quick else trace


def replay(
    repo: Repository,
    work: Path,
    trace: list[tuple[int, int]],
    mode: Mode | None,
    latency: float,
    pace_s: float,
) -> list[float]:
    cache = work / f"cache-{mode}"
    shutil.rmtree(cache, ignore_errors=True)
    point = repo.get_point("vm")
    agent = AgentThread(repo, point, AgentConfig(cache_dir=cache, repo_latency_ms=latency, fetch_slots=8,
                                                 mode=mode or Mode.DEMAND_FIRST))  # fmt: skip
    try:
        if mode is not None:
            agent.run(start_background, agent.agent.exports["vm/vm"])
            time.sleep(0.05)
        c = NbdClient("127.0.0.1", agent.port, "vm/vm")
        out = []
        for offset, length in trace:
            t0 = time.perf_counter()
            c.read(offset, length)
            out.append(time.perf_counter() - t0)
            if pace_s:
                time.sleep(pace_s)
        c.close()
        return out
    finally:
        agent.close()


def run(quick: bool) -> dict[str, Any]:
    latency = 10.0
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmpd:
        tmp = Path(tmpd)
        repo, boot_trace = traced_test_vm(tmp, quick)
        manifest = repo.load_manifest(repo.get_point("vm").record.disks[0])
        allocated = list(manifest.allocated_blocks())
        rnd = random.Random(5)
        app_reads = [(rnd.choice(allocated) * manifest.block_size + rnd.randrange(16) * 4096, 4096)
                     for _ in range(200)]  # fmt: skip
        workloads = {"boot trace": (boot_trace, 0.0), "random 4K app reads, 50/s": (app_reads, 0.02)}
        results: dict[str, Any] = {}
        for wname, (trace, pace) in workloads.items():
            for label, mode in (
                ("no background", None),
                ("demand-first", Mode.DEMAND_FIRST),
                ("fifo", Mode.FIFO),
            ):
                lat = replay(repo, tmp, trace, mode, latency, pace)
                results[f"{wname} / {label}"] = {
                    "reads": len(lat), "total_s": round(sum(lat), 3),
                    "mean_ms": round(1000 * sum(lat) / len(lat), 3),
                    "p50_ms": round(1000 * percentile(lat, 0.5), 3), "p99_ms": round(1000 * percentile(lat, 0.99), 3),
                    "max_ms": round(1000 * max(lat), 1),
                }  # fmt: skip
                print(f"latency {wname} / {label}: {results[f'{wname} / {label}']}", flush=True)
        ratios = {}
        for wname in workloads:
            base, df, fifo = (results[f"{wname} / {m}"] for m in ("no background", "demand-first", "fifo"))
            ratios[wname] = {
                "demand_first_max_over_none": round(df["max_ms"] / max(base["max_ms"], 1e-6), 2),
                "fifo_max_over_demand_first": round(fifo["max_ms"] / max(df["max_ms"], 1e-6), 2),
                "fifo_mean_over_demand_first": round(fifo["mean_ms"] / max(df["mean_ms"], 1e-6), 2),
            }
        rows = [[k, v["reads"], v["total_s"], v["mean_ms"], v["p50_ms"], v["p99_ms"], v["max_ms"]]
                for k, v in results.items()]  # fmt: skip
        notes = (
            f"Reads replayed by an NBD client against a cold cache, {latency:g} ms per repository fetch, 64 KiB "
            "blocks, 8 fetch slots, while set 2 copies the whole disk in relocation order in the background. "
            "The boot trace is mostly ascending like set 2 itself, so the background copy often fetches its "
            "blocks first; random application reads show the scheduling: under FIFO a miss waits behind the "
            f"whole background queue (the max column). Ratios: {ratios}."
        )
        write_results("latency", {"rows": results, "ratios": ratios}, rows,
                      ["workload / scheduler", "reads", "total s", "mean ms", "p50 ms", "p99 ms", "max ms"],
                      notes)  # fmt: skip
        bar_chart("latency", "read latency with background copy (ms, log scale)", ["mean", "p99", "max"],
                  {k: [v["mean_ms"], v["p99_ms"], v["max_ms"]] for k, v in results.items()}, "ms", log=True)  # fmt: skip
        return {"rows": results, "ratios": ratios}
