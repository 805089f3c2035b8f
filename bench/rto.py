"""RTO at real data sizes: instant restore (with and without the boot profile) against a classic
restore, for a VM holding 2, 8 and 32 GiB of allocated data, from a repository behind an
emulated 1 Gbit/s link with 10 ms per fetch.

The VM is the test VM (its boot disk: 90 MB read at boot) plus a data disk of the given
allocated size, which the guest does not read while booting (a database volume, a file share).
A classic restore must bring all of it over the link before the VM can start; an instant restore
boots once the blocks the boot reads are there. Target (issue "Performance at real sizes"): the
classic/instant ratio grows with the data, >= 10x at 8 GiB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.boot import three_ways
from bench.common import MiB, bar_chart, series, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.testvm import build_test_vm

GiB = 1024 * MiB
MBPS = 1000.0
LINK: dict[str, Any] = {"name": "10ms+1Gbit", "latency_ms": 10.0, "mbps": MBPS}


def _data_disk(path: Path, size: int) -> None:
    """``size`` bytes, every block allocated and half-compressible (random 32 KiB, twice), as the
    other benchmarks' data: the link carries about half of it."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(b"".join(os.urandom(32 * 1024) * 2 for _ in range(MiB // (64 * 1024))))


def run(quick: bool) -> dict[str, Any]:
    sizes = [2] if quick else [2, 8, 32]
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rto-", dir=os.environ.get("BENCH_TMP")) as tmpd:
        tmp = Path(tmpd)
        image = build_test_vm(tmp / "vm.raw", size=512 * MiB, payload_mb=90)
        for gib in sizes:
            data = tmp / "data.raw"
            _data_disk(data, gib * GiB)
            repo = Repository.init(tmp / "repo", block_size=64 * 1024)
            _, stats = run_backup(repo, "vm", [image.path, data], [])
            data.unlink()  # the repository holds it; the disk space goes to the classic copy
            tag = f"{gib}GiB"
            classic, cold, warm, boot_s = three_ways(repo, tmp, tag, LINK)
            link_s = stats.bytes_new_stored * 8 / (MBPS * 1e6)
            ideal = link_s + boot_s  # a classic restore that runs at the link's speed, then boots
            r = {
                "allocated_gib": gib, "stored_gib": round(stats.bytes_new_stored / GiB, 2),
                "link_time_s": round(link_s, 1), "classic_s": classic, "no_profile_s": cold, "profile_s": warm,
                "classic_over_profile": round(classic / warm, 1), "classic_over_no_profile": round(classic / cold, 1),
                "link_bound_classic_s": round(ideal, 1), "link_bound_classic_over_profile": round(ideal / warm, 1),
                "classic_over_link_time": round(classic / link_s, 2),
            }  # fmt: skip
            results[tag] = r
            rows.append(list(r.values()))
            print(f"rto {tag}: {r}", flush=True)
            repo.close()
            shutil.rmtree(tmp / "repo")
    bar_chart("rto", "time to boot (s) behind 1 Gbit/s + 10 ms: lower is better", list(results), series(results, {
        "classic": "classic_s", "instant, no profile": "no_profile_s", "instant + profile": "profile_s",
    }), "seconds")  # fmt: skip
    notes = (
        "Time from the start of the restore until the guest prints BOOT-OK (QEMU TCG, 2 cores, 64 KiB repository "
        "blocks), repository behind an emulated 1 Gbit/s link at 10 ms per fetch. The VM: the test VM's 512 MiB "
        "boot disk (90 MB read at boot) plus a data disk of the given allocated size (half-compressible blocks) "
        "that the boot does not read. Link time: the stored bytes of the whole backup over 1 Gbit/s. Link-bound "
        "classic: that link time plus the classic restore's own boot (after launch), what a classic restore that "
        "ran at the link's speed would take (ours is slower: see the last column). Side by side in one run. "
        "Target: classic / instant (profile) >= 10x at 8 GiB."
    )
    write_results("rto", {"rows": results}, rows,
                  ["allocated GiB", "stored GiB", "link time s", "classic s", "instant, no profile s",
                   "instant + profile s", "classic / profile", "classic / no profile", "link-bound classic s",
                   "link-bound classic / profile", "classic / link time"],
                  notes)  # fmt: skip
    return results
