"""The repository on a local directory vs on SeaweedFS (S3 on loopback), side by side.

For each: time to boot with the profile, the relocation (set 2 and set 3 with the mirror: from
the end of boot to the pivot), and repository requests per GiB relocated. For S3, the
relocation's throughput is set against the link's own limit, measured the plain way: a
concurrent boto3 download of the same objects (32 threads). Target (issue "Repository on object
storage"): relocation >= 0.8x of that download.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, write_results
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions
from liverestore.testvm import build_test_vm
from tests.s3fixtures import BUCKET, SeaweedFS

COLD_MB = 250


async def _restore(repo: Repository, work: Path, tag: str, relocate: bool, profile: bool) -> dict[str, Any]:
    opts = RestoreOptions(vm="vm", dest=work / f"d-{tag}", cache_dir=work / f"c-{tag}", relocate=relocate,
                          use_profile=profile, record_profile=not profile, hypervisor="qemu")  # fmt: skip
    job = InstantRestore(repo, opts)
    try:
        r = await job.run()
    finally:
        await job.close()
        shutil.rmtree(work / f"c-{tag}", ignore_errors=True)
        shutil.rmtree(work / f"d-{tag}", ignore_errors=True)
    reloc_s = sum(r.phases.get(p, 0.0) for p in ("run", "relocate", "pivot"))
    return {"time_to_boot_s": r.time_to_boot_s, "relocation_s": round(reloc_s, 3), "requests": r.blocks_fetched,
            "bytes_transferred": r.bytes_fetched_stored, "bytes": r.bytes_fetched}  # fmt: skip


def _plain_download(s3: SeaweedFS, prefix: str) -> tuple[float, int]:
    """Seconds and bytes for boto3 to fetch every chunk object under ``prefix``, 32 at a time."""
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/chunks/")
            for o in page.get("Contents", [])]  # fmt: skip

    def get(key: str) -> int:
        return len(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        total = sum(pool.map(get, keys))
    return time.monotonic() - t0, total


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmpd:
        work = Path(tmpd)
        s3 = SeaweedFS(work / "weed")
        s3.start()
        os.environ.update(s3.env())
        try:
            s3.client().create_bucket(Bucket=BUCKET)
            image = build_test_vm(work / "vm.raw", size=2048 * MiB, payload_mb=90, cold_mb=COLD_MB)
            for bs in ([1024] if quick else [64, 1024]):
                prefix = f"bench-{uuid.uuid4().hex[:6]}"
                for where, location in (("local", str(work / f"repo-{bs}")), ("s3", f"s3://{BUCKET}/{prefix}")):
                    repo = Repository.init(location, bs * 1024)
                    run_backup(repo, "vm", [image.path], [])
                    asyncio.run(_restore(repo, work, f"{where}-rec", relocate=False, profile=False))  # profile
                    boot = asyncio.run(_restore(repo, work, f"{where}-boot", relocate=False, profile=True))
                    reloc = asyncio.run(_restore(repo, work, f"{where}-reloc", relocate=True, profile=True))
                    gib = reloc["bytes"] / 2**30
                    r = {"block_kib": bs, "repository": where, "time_to_boot_s": boot["time_to_boot_s"],
                         "relocation_s": reloc["relocation_s"], "requests_per_gib": round(reloc["requests"] / gib),
                         "relocation_mb_s": round(reloc["bytes_transferred"] / 1e6 / reloc["relocation_s"], 1)}  # fmt: skip
                    if where == "s3":
                        secs, total = _plain_download(s3, prefix)
                        r["plain_download_mb_s"] = round(total / 1e6 / secs, 1)
                        r["relocation_over_download"] = round(r["relocation_mb_s"] / r["plain_download_mb_s"], 2)
                    repo.close()
                    results[f"{bs}K-{where}"] = r
                    rows.append([bs, where, r["time_to_boot_s"], r["relocation_s"], r["requests_per_gib"],
                                 r["relocation_mb_s"], r.get("plain_download_mb_s", ""),
                                 r.get("relocation_over_download", "")])  # fmt: skip
                    print(f"s3 bench {bs}K {where}: {r}", flush=True)
        finally:
            s3.kill()
    labels = list(results)
    bar_chart("s3", "local directory vs SeaweedFS (S3): seconds, lower is better", labels, {
        "time to boot (profile)": [r["time_to_boot_s"] for r in results.values()],
        "relocation": [r["relocation_s"] for r in results.values()],
    }, "seconds")  # fmt: skip
    notes = (
        "The test VM (2 GiB disk: 90 MB read at boot, 250 MB cold) backed up to a local directory and to "
        "SeaweedFS on loopback (one object per chunk), then instant-restored with the QEMU driver, no emulated "
        "latency: time to boot with the profile (after a run that records it); relocation from the end of boot "
        "to the pivot; repository requests per GiB relocated (one GET per block); relocation throughput in "
        "stored (compressed) MB/s against a plain concurrent boto3 download of the same chunk objects with 32 "
        "threads. Side by side in one run."
    )
    write_results("s3", {"rows": results}, rows,
                  ["block KiB", "repository", "boot (profile) s", "relocation s", "requests/GiB",
                   "relocation MB/s", "plain download MB/s", "relocation / download"], notes)  # fmt: skip
    return results
