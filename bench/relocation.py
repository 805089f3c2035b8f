"""Relocation: launch-to-pivot time and repository traffic, with set 3 (ahead of the mirror) vs without,
compared with a classic full restore. Every block should leave the repository once."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport, classic_restore
from liverestore.testvm import build_test_vm


async def _instant(repo: Repository, work: Path, tag: str, set3: bool, latency: float) -> RestoreReport:
    opts = RestoreOptions(vm="vm", dest=work / f"d-{tag}", cache_dir=work / f"c-{tag}", use_profile=True,
                          record_profile=False, repo_latency_ms=latency, relocation_prefetch=set3)  # fmt: skip
    job = InstantRestore(repo, opts)
    try:
        return await job.run()
    finally:
        await job.close()
        shutil.rmtree(work / f"d-{tag}", ignore_errors=True)
        shutil.rmtree(work / f"c-{tag}", ignore_errors=True)


def run(quick: bool) -> dict[str, Any]:
    latency = 5.0
    with tempfile.TemporaryDirectory(prefix="bench-reloc-") as tmpd:
        tmp = Path(tmpd)
        image = build_test_vm(tmp / "vm.raw", size=2048 * MiB, payload_mb=90, cold_mb=300 if quick else 900)
        repo = Repository.init(tmp / "repo", block_size=64 * 1024)
        point, _ = run_backup(repo, "vm", [image.path], [])
        allocated = sum(sum(1 for _ in repo.load_manifest(d).allocated_blocks()) for d in point.record.disks)
        # record the profile once so both variants boot alike and differ only in relocation
        asyncio.run(_instant(repo, tmp, "warmup", True, 0.0))
        results: dict[str, Any] = {}
        for label, set3 in (("with set 3", True), ("without set 3", False)):
            r = asyncio.run(_instant(repo, tmp, label.replace(" ", "-"), set3, latency))
            results[label] = {
                "launch_to_pivot_s": round(sum(r.phases.get(p, 0) for p in ("launch", "run", "relocate", "pivot")), 3),
                "relocate_s": r.phases.get("relocate", 0), "blocks_fetched": r.blocks_fetched,
                "bytes_fetched": r.bytes_fetched, "fetched_by_class": r.fetched_by_class,
            }  # fmt: skip
            print(f"relocation {label}: {results[label]}", flush=True)

        async def classic() -> Any:
            rep, vm = await classic_restore(repo, RestoreOptions(vm="vm", dest=tmp / "classic",
                                                                 cache_dir=tmp / "u", repo_latency_ms=latency))  # fmt: skip
            await vm.stop()
            return rep

        c = asyncio.run(classic())
        results["classic"] = {"launch_to_pivot_s": None, "relocate_s": c.phases["restore"],
                              "blocks_fetched": c.blocks_fetched, "bytes_fetched": c.bytes_fetched,
                              "fetched_by_class": {}}  # fmt: skip
        w, wo = results["with set 3"], results["without set 3"]
        ratios = {
            "relocate_without_over_with_set3": round(wo["relocate_s"] / max(w["relocate_s"], 1e-6), 2),
            "fetches_instant_over_classic": round(w["blocks_fetched"] / max(c.blocks_fetched, 1), 3),
            "fetches_over_allocated_blocks": round(w["blocks_fetched"] / allocated, 3),
        }
        rows = [[k, v["launch_to_pivot_s"], v["relocate_s"], v["blocks_fetched"], round(v["bytes_fetched"] / MiB, 1)]
                for k, v in results.items()]  # fmt: skip
        notes = (
            f"2 GiB test VM with {'300' if quick else '900'} MB of data the guest does not read at boot, {latency:g} ms "
            f"per fetch, 64 KiB blocks, boot profile already recorded; relocation starts right after boot. "
            f"{allocated} allocated blocks. Ratios: {ratios}. For 'classic' the relocate column is the full copy."
        )
        write_results("relocation", {"rows": results, "ratios": ratios, "allocated_blocks": allocated}, rows,
                      ["variant", "launch→pivot s", "relocate s", "blocks fetched", "MiB fetched"], notes)  # fmt: skip
        bar_chart("relocation", "relocation phase (s)", list(results),
                  {"seconds": [v["relocate_s"] for v in results.values()]}, "seconds")  # fmt: skip
        return {"rows": results, "ratios": ratios}
