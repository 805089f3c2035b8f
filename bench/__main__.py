"""``python -m bench all --quick``: every benchmark, side by side, results under bench/results/."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from bench import (
    boot,
    encryption,
    ingest,
    latency,
    libvirt_boot,
    live_backup,
    mass_restore,
    memory,
    nbd,
    relocation,
    rto,
    s3,
)
from bench.common import RESULTS

BENCHMARKS = {"ingest": ingest.run, "nbd": nbd.run, "latency": latency.run, "relocation": relocation.run,
              "boot": boot.run, "libvirt_boot": libvirt_boot.run, "s3": s3.run,
              "live_backup": live_backup.run, "encryption": encryption.run, "memory": memory.run,
              "mass_restore": mass_restore.run, "rto": rto.run}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("which", choices=["all", *BENCHMARKS], help="benchmark to run")
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer settings (about 10 minutes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    for name in names:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        BENCHMARKS[name](args.quick)
        print(f"== {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    # the summary covers every benchmark that has results, not only the ones run this time
    RESULTS.mkdir(parents=True, exist_ok=True)
    everything = {
        n: json.loads((RESULTS / f"{n}.json").read_text())
        for n in BENCHMARKS
        if (RESULTS / f"{n}.json").exists()
    }
    (RESULTS / "summary.json").write_text(json.dumps(everything, indent=2, default=str))
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
