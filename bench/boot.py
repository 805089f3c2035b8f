"""Time-to-boot (RTO) of the test VM from an emulated slow repository.

(a) classic: full restore, then boot from the local copy;
(b) instant restore without a profile (pure on-demand, like Proxmox live-restore);
(c) instant restore with the boot profile prefetched;
(d) boot from a local disk: the floor.
Repeated for several virtual disk sizes holding the same data: (c) must not grow with empty space.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, series, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, classic_restore
from liverestore.testvm import build_test_vm
from liverestore.testvm.localboot import boot_local_copy

COLD_MB = 250  # data the VM holds but does not read at boot: what a classic restore copies first

SETTINGS = [
    {"name": "1ms", "latency_ms": 1.0, "mbps": 0.0},
    {"name": "10ms", "latency_ms": 10.0, "mbps": 0.0},
    {"name": "10ms+400Mbit", "latency_ms": 10.0, "mbps": 400.0},
]


async def instant_boot(repo: Repository, work: Path, tag: str, setting: dict[str, Any], profile: bool,
                       vm: str = "vm", hypervisor: str = "auto") -> float:
    """Time to boot of one instant restore (no relocation); its cache and scratch files go after."""
    opts = RestoreOptions(vm=vm, dest=work / f"d-{tag}", cache_dir=work / f"c-{tag}", relocate=False,
                          use_profile=profile, record_profile=not profile, hypervisor=hypervisor,
                          repo_latency_ms=setting["latency_ms"], repo_mbps=setting["mbps"])  # fmt: skip
    job = InstantRestore(repo, opts)
    try:
        return (await job.run()).time_to_boot_s
    finally:
        await job.close()
        shutil.rmtree(work / f"c-{tag}", ignore_errors=True)
        shutil.rmtree(work / f"d-{tag}", ignore_errors=True)


async def _classic(repo: Repository, work: Path, tag: str, setting: dict[str, Any]) -> tuple[float, float]:
    """(time to boot, of which the boot after launch) of a classic restore."""
    opts = RestoreOptions(vm="vm", dest=work / f"k-{tag}", cache_dir=work / "unused",
                          repo_latency_ms=setting["latency_ms"], repo_mbps=setting["mbps"])  # fmt: skip
    report, vm = await classic_restore(repo, opts)
    await vm.stop()
    shutil.rmtree(work / f"k-{tag}", ignore_errors=True)
    return report.time_to_boot_s, report.boot_after_launch_s


def three_ways(repo: Repository, work: Path, tag: str, setting: dict[str, Any]) -> tuple[float, float, float, float]:
    """Times to boot of a classic restore, an instant one without the profile (which records
    it) and one with it, side by side; and the classic restore's boot after its launch."""
    os.sync()  # each run starts with no write-back of the one before still going
    classic, boot_s = asyncio.run(_classic(repo, work, tag, setting))
    os.sync()  # the classic copy's GiBs would otherwise be written back during the instant boots
    cold = asyncio.run(instant_boot(repo, work, tag + "-cold", setting, profile=False))
    os.sync()
    warm = asyncio.run(instant_boot(repo, work, tag + "-warm", setting, profile=True))
    return classic, cold, warm, boot_s


def run(quick: bool) -> dict[str, Any]:
    sizes = [512, 2048, 8192]
    settings = SETTINGS[1:] if quick else SETTINGS
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmpd:
        tmp = Path(tmpd)
        for size in sizes:
            image = build_test_vm(tmp / "vm.raw", size=size * MiB, payload_mb=90, cold_mb=COLD_MB)
            repo = Repository.init(tmp / f"repo-{size}", block_size=64 * 1024)
            run_backup(repo, "vm", [image.path], [])
            local = asyncio.run(boot_local_copy(image.path, tmp / "local"))
            for s in settings:
                tag = f"{size}-{s['name']}"
                repo.delete_profile("vm")
                classic, cold, warm, _ = three_ways(repo, tmp, tag, s)
                r = {
                    "disk_mib": size, "setting": s["name"], "a_classic_s": classic, "b_no_profile_s": cold,
                    "c_profile_s": warm, "d_local_s": round(local, 3),
                    "c_over_d": round(warm / local, 2), "c_over_a": round(warm / classic, 2),
                    "c_over_b": round(warm / cold, 2),
                }  # fmt: skip
                results[tag] = r
                rows.append(list(r.values()))
                print(f"boot {tag}: {r}", flush=True)
            repo.close()
            shutil.rmtree(tmp / f"repo-{size}")
            image.path.unlink()
    bar_chart("boot", "time to boot (s): lower is better", list(results), series(results, {
        "classic (a)": "a_classic_s", "instant, no profile (b)": "b_no_profile_s", "instant + profile (c)": "c_profile_s",
        "local disk (d)": "d_local_s",
    }), "seconds")  # fmt: skip
    notes = (
        "Time from the start of the restore until the guest prints BOOT-OK (QEMU TCG, 2 cores, 64 KiB "
        f"repository blocks, 32 concurrent fetches). Every disk size holds the same data: 90 MB read at boot "
        f"plus {COLD_MB} MB the guest does not touch while booting; the rest is empty. Ratios are measured "
        "side by side in one run."
    )
    write_results("boot", {"rows": results}, rows,
                  ["disk MiB", "repository", "(a) classic s", "(b) no profile s", "(c) profile s",
                   "(d) local s", "c/d", "c/a", "c/b"], notes)  # fmt: skip
    return results
