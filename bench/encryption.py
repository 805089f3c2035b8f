"""What encryption costs: backup ingest and a cold relocation read, plain vs encrypted repository.

One disk (half random, half compressible data) is backed up into a plain and an encrypted
repository (64 KiB blocks), alternating, and each is then read whole through a cold
``liverestore serve`` with ``nbdcopy`` (four connections, as a relocation reads). The medians
of the runs are compared side by side.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository

PASSPHRASE = "bench passphrase, not a secret"


def _disk(path: Path, data_mb: int) -> int:
    rnd = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(2 * data_mb * MiB)
        for i in range(data_mb):
            f.seek(2 * i * MiB)
            f.write(rnd.randbytes(MiB) if i % 2 else (b"liverestore encryption benchmark %d\n" % i) * 29000)
    return data_mb * MiB


def _cold_read(repo: Path, tmp: Path, encrypted: bool) -> float:
    """Seconds for nbdcopy to read the whole export from a fresh cache."""
    env = dict(os.environ, LIVERESTORE_PASSWORD=PASSPHRASE) if encrypted else dict(os.environ)
    cache = Path(tempfile.mkdtemp(dir=tmp))
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(repo), "--vm", "vm",
                             "--listen", "127.0.0.1:0", "--cache-dir", str(cache)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        assert proc.stderr is not None
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", proc.stderr.readline())
        if not m:
            raise RuntimeError("liverestore serve did not start")
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--connections=4", f"nbd://127.0.0.1:{m.group(1)}/vm/disk", "null:"], check=True)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def run(quick: bool) -> dict[str, Any]:
    data_mb, reps = (256, 2) if quick else (1024, 3)
    ingest: dict[str, list[float]] = {"plain": [], "encrypted": []}
    cold: dict[str, list[float]] = {"plain": [], "encrypted": []}
    with tempfile.TemporaryDirectory(prefix="bench-crypt-") as tmpd:
        tmp = Path(tmpd)
        allocated = _disk(tmp / "disk.raw", data_mb)
        for rep in range(reps):
            for mode in ("plain", "encrypted"):
                where = tmp / f"{mode}-{rep}"
                repo = Repository.init(where, block_size=64 * 1024, passphrase=PASSPHRASE if mode == "encrypted" else None)
                t0 = time.perf_counter()
                run_backup(repo, "vm", [tmp / "disk.raw"], [])
                ingest[mode].append(allocated / 1e6 / (time.perf_counter() - t0))
                repo.close()
                cold[mode].append(allocated / 1e6 / _cold_read(where, tmp, mode == "encrypted"))
                print(f"encryption rep {rep} {mode}: ingest {ingest[mode][-1]:.0f} MB/s, cold read "
                      f"{cold[mode][-1]:.0f} MB/s", flush=True)  # fmt: skip
    med = {k: {m: round(statistics.median(v[m]), 1) for m in v} for k, v in (("ingest", ingest), ("cold", cold))}
    r = {"allocated_bytes": allocated, "ingest_mb_s": med["ingest"], "cold_read_mb_s": med["cold"],
         "ingest_encrypted_over_plain": round(med["ingest"]["encrypted"] / med["ingest"]["plain"], 2),
         "cold_encrypted_over_plain": round(med["cold"]["encrypted"] / med["cold"]["plain"], 2),
         "runs": {"ingest": ingest, "cold": cold}}  # fmt: skip
    bar_chart("encryption", "Encryption cost (MB/s, median)", ["backup ingest", "cold relocation read"],
              {m: [med["ingest"][m], med["cold"][m]] for m in ("plain", "encrypted")}, "MB/s")  # fmt: skip
    notes = (
        f"A disk with {allocated // MiB} MiB allocated (half random, half compressible) backed up into a plain and an "
        "encrypted repository (64 KiB blocks; AES-256-GCM per chunk after zstd, keyed BLAKE3 ids), then read whole "
        "from a cold `liverestore serve` by `nbdcopy --connections=4` (fetch, authenticate, decompress, verify, "
        f"serve). Median of {reps} alternating runs; MB/s of allocated bytes."
    )
    write_results("encryption", r, [["backup ingest", med["ingest"]["plain"], med["ingest"]["encrypted"],
                                     r["ingest_encrypted_over_plain"]],
                                    ["cold relocation read", med["cold"]["plain"], med["cold"]["encrypted"],
                                     r["cold_encrypted_over_plain"]]],
                  ["", "plain MB/s", "encrypted MB/s", "encrypted / plain"], notes)  # fmt: skip
    return r
