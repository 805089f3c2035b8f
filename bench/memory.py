"""Agent memory at real disk sizes: peak RSS of ``liverestore serve`` after a cold read of every
allocated block (nbdcopy, which skips holes by block status), for a 1 TiB sparse disk and a fully
allocated one, 64 KiB blocks. Target (issue "Performance at real sizes"): RSS <= 64 MiB + 48
bytes per allocated block, at any size. The interpreter with the agent's imports is measured
the same way (``serve`` on an empty 64 KiB disk) and shown as the baseline."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, series, stop_process, write_results, write_spread
from bench.nbd import _free_port, _wait_port
from liverestore.backup import run_backup
from liverestore.repository import Repository

GiB = 1024 * MiB
BS = 64 * 1024


def _sparse_disk(path: Path, size: int, allocated: int, seed: int) -> None:
    """``allocated`` bytes of half-compressible 64 KiB blocks spread in 1 MiB extents over ``size``."""
    rnd = random.Random(seed)
    write_spread(path, size, allocated, MiB, lambda: b"".join(rnd.randbytes(BS // 2) * 2 for _ in range(MiB // BS)))


def _peak_rss(repo: Path, work: Path) -> tuple[int, float]:
    """Peak RSS (bytes) of ``serve`` over a cold nbdcopy of the whole export, and its seconds."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(repo), "--vm", "vm",
                             "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{_free_port()}",
                             "--cache-dir", str(work / "cache")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_port(port, None, timeout=120)
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", "--request-size=1048576", "--requests=16", f"nbd://127.0.0.1:{port}/vm/disk",
                        "null:"], check=True)  # fmt: skip
        secs = time.monotonic() - t0
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
        return hwm, secs
    finally:
        stop_process(proc, 20)
        shutil.rmtree(work / "cache", ignore_errors=True)


def run(quick: bool) -> dict[str, Any]:
    cases = [("empty 64 KiB disk (baseline)", 64 * 1024, 0),
             ("1 TiB sparse", 1024 * GiB, (1 if quick else 8) * GiB),
             ("fully allocated", (1 if quick else 16) * GiB, (1 if quick else 16) * GiB)]  # fmt: skip
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-mem-", dir=os.environ.get("BENCH_TMP")) as tmpd:
        work = Path(tmpd)
        for label, size, allocated in cases:
            disk = work / "disk.raw"
            _sparse_disk(disk, size, allocated, seed=len(label)) if allocated else disk.write_bytes(bytes(size))
            repo_path = work / "repo"
            repo = Repository.init(repo_path, BS)
            run_backup(repo, "vm", [disk], [])
            repo.close()
            disk.unlink()
            rss, secs = _peak_rss(repo_path, work)
            blocks = allocated // BS
            budget = 64 * MiB + 48 * blocks
            r = {"virtual_gib": round(size / GiB, 3), "allocated_gib": round(allocated / GiB, 3), "allocated_blocks": blocks,
                 "peak_rss_mib": round(rss / MiB, 1), "budget_mib": round(budget / MiB, 1),
                 "rss_over_budget": round(rss / budget, 2), "cold_read_s": round(secs, 2)}  # fmt: skip
            results[label] = r
            rows.append([label, r["virtual_gib"], r["allocated_gib"], blocks, r["peak_rss_mib"], r["budget_mib"],
                         r["rss_over_budget"], r["cold_read_s"]])  # fmt: skip
            print(f"memory {label}: {r}", flush=True)
            shutil.rmtree(repo_path)
    bar_chart("memory", "agent peak RSS vs the budget (64 MiB + 48 B per allocated block)", list(results),
              series(results, {"peak RSS MiB": "peak_rss_mib", "budget MiB": "budget_mib"}), "MiB")  # fmt: skip
    notes = (
        "Peak RSS (VmHWM) of `liverestore serve` after nbdcopy read every allocated block of the export from a "
        "cold cache (1 MiB requests, 16 in flight; holes skipped by block status). 64 KiB blocks, repository on "
        "a local directory holding just this disk. Budget: 64 MiB + 48 bytes per allocated block."
    )
    write_results("memory", {"rows": results}, rows,
                  ["disk", "virtual GiB", "allocated GiB", "allocated blocks", "peak RSS MiB", "budget MiB",
                   "RSS / budget", "cold read s"], notes)  # fmt: skip
    return results
