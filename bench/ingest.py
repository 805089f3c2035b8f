"""Backup ingest: MB/s and dedup ratio for a first and a second (unchanged) backup of the test VM."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.testvm import build_test_vm


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmpd:
        tmp = Path(tmpd)
        image = build_test_vm(tmp / "vm.raw", size=1024 * MiB, payload_mb=90, cold_mb=100 if quick else 300)
        rows, data = [], {}
        for bs in (64 * 1024, 1024 * 1024):
            repo = Repository.init(tmp / f"repo-{bs}", block_size=bs)
            for label in ("first", "second (unchanged)"):
                t0 = time.perf_counter()
                _, st = run_backup(repo, "vm", [image.path], [])
                took = time.perf_counter() - t0
                stored = sum(repo.chunks.stored_size(c) for c in repo.chunks.iter_ids())
                logical = sum(d.allocated for p in repo.points() for d in p.record.disks)
                row = {
                    "block_size_kib": bs // 1024, "backup": label, "seconds": round(took, 3),
                    "read_mb_s": round(st.bytes_read / 1e6 / took, 1),
                    "new_bytes": st.bytes_new_stored, "dedup_ratio": round(logical / stored, 2),
                }  # fmt: skip
                data[f"{bs // 1024}k-{label.split()[0]}"] = row
                rows.append(list(row.values()))
            repo.close()
        notes = (
            "Backup of the 1 GiB test VM (sparse; ~90 MB payload + cold random data). `read_mb_s` counts the "
            "bytes actually read (holes are skipped with SEEK_DATA); the second backup of an unchanged disk "
            "stores nothing new, so the repository's dedup+compression ratio doubles."
        )
        write_results("ingest", {"rows": data}, rows,
                      ["block KiB", "backup", "s", "read MB/s", "new bytes", "dedup ratio"], notes)  # fmt: skip
        return data
