"""The repository on a local directory vs on SeaweedFS (S3 on loopback), side by side.

For each: time to boot with the profile, the relocation (set 2 and set 3 with the mirror: from
the end of boot to the pivot), and repository requests per GiB relocated. For S3, the
relocation's throughput is set against the link's own limit, measured the plain way: a
concurrent boto3 download of the same objects (32 threads). Target (issue "Repository on object
storage"): relocation >= 0.8x of that download.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, children_cpu_s, host_busy_s, process_cpu_s, write_results
from bench.nbd import served
from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport, copy_disk
from liverestore.testvm import build_test_vm
from tests.s3fixtures import BUCKET, SeaweedFS

COLD_MB = 250
PART = 8 * MiB


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
    return {"time_to_boot_s": r.time_to_boot_s, "relocation_s": round(reloc_s, 3), "requests": r.repository_requests,
            "bytes_transferred": r.bytes_fetched_stored, "bytes": r.bytes_fetched}  # fmt: skip


def _plain_download(s3: SeaweedFS, prefix: str) -> tuple[float, int]:
    """Seconds and bytes for boto3 to fetch every pack object under ``prefix`` the way boto3's
    own transfer manager downloads large objects: 8 MiB ranged GETs, here 32 at a time."""
    client = s3.client(pool=32)
    parts = [(o["Key"], off, min(PART, o["Size"] - off))
             for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/packs/")
             for o in page.get("Contents", []) for off in range(0, o["Size"], PART)]  # fmt: skip

    def get(part: tuple[str, int, int]) -> int:
        key, off, n = part
        return len(client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"].read())

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        total = sum(pool.map(get, parts))
    return time.monotonic() - t0, total


def _data_disk(path: Path, size: int) -> None:
    """A fully allocated disk of half-compressible blocks (random 32 KiB, twice)."""
    with open(path, "wb") as f:
        for _ in range(size // (64 * 1024)):
            f.write(os.urandom(32 * 1024) * 2)


def _cold_copy(kind: str, disk: Path, location: str, work: Path, tag: str, agent_args: Sequence[str] = (),
               cpu: list[dict[str, float]] | None = None) -> float:  # fmt: skip
    """Seconds for nbdcopy to read the whole export (the agent's from a cold cache), as QEMU's
    mirror does: 1 MiB requests, 16 in flight. With ``cpu``, what the copy cost in CPU is
    appended to it: the server's and nbdcopy's CPU seconds, and how many of the host's cores
    were busy on average (everything on the host, the kernel's write-back included)."""
    tmp = work / f"serve-{tag}"
    tmp.mkdir()
    try:
        with served(kind, disk, location, tmp, unix=False, agent_args=agent_args) as (uri, pid):
            server0, client0, (busy0, total0) = process_cpu_s(pid), children_cpu_s(), host_busy_s()
            t0 = time.monotonic()
            subprocess.run(["nbdcopy", "--request-size=1048576", "--requests=16", "--connections=1",
                            uri, "null:"], check=True)  # fmt: skip
            secs = time.monotonic() - t0
            (busy1, total1), client1, server1 = host_busy_s(), children_cpu_s(), process_cpu_s(pid)
            if cpu is not None:
                cores = os.cpu_count() or 1
                cpu.append({"server_cpu_s": server1 - server0, "client_cpu_s": client1 - client0,
                            "busy_cores": cores * (busy1 - busy0) / max(total1 - total0, 1e-9)})  # fmt: skip
            return secs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_summary(samples: list[dict[str, float]]) -> dict[str, float]:
    """The median of each measure over a copy's rounds, and the seconds its CPU alone takes on
    this host's cores: (server + client CPU) / cores, what the copy would take with every core
    busy all the time on nothing else."""
    cores = os.cpu_count() or 1
    out = {key: round(statistics.median(s[key] for s in samples), 2) for key in samples[0]}
    out["cpu_bound_s"] = round(statistics.median((s["server_cpu_s"] + s["client_cpu_s"]) / cores for s in samples), 2)
    return out


def _local_convert(disk: Path, work: Path) -> float:
    """Seconds for ``qemu-img convert`` to copy the raw disk to a file: what a local disk copy costs."""
    out = work / "convert.raw"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(disk), str(out)], check=True)
    secs = time.monotonic() - t0
    out.unlink()
    return secs


def _classic_copy(location: str, work: Path) -> float:
    """Seconds for a classic restore's copy of the disk: every block fetched, checked, written to a
    new raw file and fsync'd, as ``restore --classic`` does before it boots."""
    repo = Repository.open(location)
    try:
        point = repo.points("vm")[-1]
        dest = work / "classic.raw"
        opts = RestoreOptions(vm="vm", dest=work, cache_dir=work / "classic-cache")
        t0 = time.monotonic()
        asyncio.run(copy_disk(repo, repo.load_manifest(point.record.disks[0]), dest, opts,
                              RestoreReport(vm="vm", point=point.id, mode="classic")))  # fmt: skip
        secs = time.monotonic() - t0
        dest.unlink()
        return secs
    finally:
        repo.close()


def _flushed_first(copy: Callable[[str], float], tag: str) -> float:
    """``copy(tag)`` once everything written before is on disk: a copy that came right after a
    2 GiB backup shared the disk with its write-back (7.33 s where the same copy a minute later
    took 6.04 s), and each copy here follows one that wrote (a backup, a cache, a convert's or a
    classic restore's new file)."""
    os.sync()
    return copy(tag)


ROUNDS = 3  # every copy that is part of a target's ratio, round by round: the median of each


def _agent_vs_download(s3: SeaweedFS, work: Path, bs: int, size: int) -> dict[str, Any]:
    """The agent's cold read of a data disk from SeaweedFS and from a local directory, against a
    plain boto3 download of the same packs, ``nbdkit file`` and ``qemu-img convert``, and a
    classic restore's copy: in turn, ``ROUNDS`` times, each the median of its rounds. On this
    host one copy of 2 GiB at 64 KiB read 6.04 s and 7.33 s a minute apart, and nbdkit's 2.17 s
    and 3.62 s in two runs: one round each made the ratios swing by a factor of two."""
    prefix = f"copy-{uuid.uuid4().hex[:6]}"
    disk = work / "copy" / "disk.raw"  # served as vm/disk
    disk.parent.mkdir(exist_ok=True)
    if not disk.exists():
        _data_disk(disk, size)
    out: dict[str, Any] = {"block_kib": bs, "disk_mib": size // MiB, "rounds": ROUNDS}
    locations = {"local": str(work / f"copy-{bs}"), "s3": f"s3://{BUCKET}/{prefix}"}
    stored = {}
    for where, location in locations.items():
        repo = Repository.init(location, bs * 1024)
        _, stats = run_backup(repo, "vm", [disk], [])
        repo.close()
        stored[where] = stats.bytes_new_stored
    downloaded: list[int] = []

    def download(_tag: str) -> float:
        secs, total = _plain_download(s3, prefix)
        downloaded.append(total)
        return secs

    cpu: dict[str, list[dict[str, float]]] = {"agent": [], "nbdkit": []}
    copies: dict[str, Callable[[str], float]] = {
        "local_copy_s": lambda tag: _cold_copy("liverestore", disk, locations["local"], work, f"local-{tag}", cpu=cpu["agent"]),
        "nbdkit_file_s": lambda tag: _cold_copy("nbdkit", disk, "", work, f"nbdkit-{tag}", cpu=cpu["nbdkit"]),
        "s3_copy_s": lambda tag: _cold_copy("liverestore", disk, locations["s3"], work, f"s3-{tag}"),
        "download_s": download,
        "qemu_img_convert_s": lambda _tag: _local_convert(disk, work),
        "classic_restore_s": lambda _tag: _classic_copy(locations["local"], work),
    }
    runs: dict[str, list[float]] = {key: [] for key in copies}
    for n in range(ROUNDS):
        for key, copy in copies.items():
            runs[key].append(_flushed_first(copy, f"{bs}-{n}"))
    for key, secs in runs.items():
        out[key] = round(statistics.median(secs), 2)
        out[key.removesuffix("_s") + "_runs"] = [round(x, 2) for x in secs]
    for where, location in locations.items():
        out[f"{where}_mb_s"] = round(stored[where] / 1e6 / out[f"{where}_copy_s"], 1)
        no_readahead = functools.partial(_cold_copy, "liverestore", disk, location, work, agent_args=["--readahead-mib", "0"])
        plain = _flushed_first(no_readahead, f"{where}-{bs}-nora")
        out[f"{where}_copy_no_readahead_s"] = round(plain, 2)
        out[f"{where}_readahead_gain"] = round(plain / out[f"{where}_copy_s"], 2)
    out["classic_over_convert"] = round(out["qemu_img_convert_s"] / out["classic_restore_s"], 2)
    out["local_agent_over_nbdkit"] = round(out["nbdkit_file_s"] / out["local_copy_s"], 2)
    out["local_agent_over_convert"] = round(out["qemu_img_convert_s"] / out["local_copy_s"], 2)
    # What the agent's cold read costs in CPU against nbdkit's, and the ratio its CPU alone allows:
    # a copy cannot finish before its CPU seconds are spread over every core.
    out["cpu"] = {who: _cpu_summary(samples) for who, samples in cpu.items()}
    out["local_cpu_ceiling_over_nbdkit"] = round(out["nbdkit_file_s"] / out["cpu"]["agent"]["cpu_bound_s"], 2)
    out["download_mb_s"] = round(downloaded[0] / 1e6 / out["download_s"], 1)
    out["s3_agent_over_download"] = round(out["s3_mb_s"] / out["download_mb_s"], 2)
    return out


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    copies: dict[str, Any] = {}
    rows = []
    copy_mib = 512 if quick else 2048
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmpd:
        work = Path(tmpd)
        s3 = SeaweedFS(work / "weed")
        s3.start()
        os.environ.update(s3.env())
        try:
            s3.client().create_bucket(Bucket=BUCKET)
            for bs in (64, 1024):
                copies[f"{bs}K"] = c = _agent_vs_download(s3, work, bs, copy_mib * MiB)
                print(f"s3 bench cold copy {bs}K: {c}", flush=True)
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
                         "blocks_per_gib": round(2**30 / (bs * 1024)),
                         "relocation_mb_s": round(reloc["bytes_transferred"] / 1e6 / reloc["relocation_s"], 1)}  # fmt: skip
                    repo.close()
                    results[f"{bs}K-{where}"] = r
                    rows.append([bs, where, r["time_to_boot_s"], r["relocation_s"], r["blocks_per_gib"],
                                 r["requests_per_gib"], r["relocation_mb_s"]])  # fmt: skip
                    print(f"s3 bench {bs}K {where}: {r}", flush=True)
        finally:
            s3.kill()
    labels = list(copies)
    bar_chart("s3", f"cold read of a {copy_mib} MiB disk through the agent vs plain boto3: MB/s stored, higher is "
              "better", labels, {
        "agent, local directory": [c["local_mb_s"] for c in copies.values()],
        "agent, SeaweedFS": [c["s3_mb_s"] for c in copies.values()],
        "boto3 8 MiB ranged GETs x32, SeaweedFS": [c["download_mb_s"] for c in copies.values()],
    }, "MB/s (compressed bytes)")  # fmt: skip
    copy_table = ["| block KiB | agent, local dir s | same, readahead off s | nbdkit file s | local qemu-img convert s "
                  "| agent / nbdkit | agent / convert | classic restore s | classic / convert | agent, S3 s | agent, S3 MB/s "
                  "| same, readahead off s | boto3 download s | boto3 MB/s | agent S3 / boto3 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    copy_table += [f"| {c['block_kib']} | {c['local_copy_s']} | {c['local_copy_no_readahead_s']} | {c['nbdkit_file_s']} "
                   f"| {c['qemu_img_convert_s']} | {c['local_agent_over_nbdkit']} | {c['local_agent_over_convert']} | {c['classic_restore_s']} "
                   f"| {c['classic_over_convert']} | {c['s3_copy_s']} "
                   f"| {c['s3_mb_s']} | {c['s3_copy_no_readahead_s']} | {c['download_s']} | {c['download_mb_s']} | {c['s3_agent_over_download']} |"
                   for c in copies.values()]  # fmt: skip
    cpu_table = ["| block KiB | agent s | agent CPU s | its nbdcopy CPU s | cores busy | CPU-bound s | nbdkit s "
                 "| nbdkit CPU s | its nbdcopy CPU s | cores busy | agent / nbdkit | ceiling from CPU |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cpu_table += [f"| {c['block_kib']} | {c['local_copy_s']} | {a['server_cpu_s']} | {a['client_cpu_s']} | {a['busy_cores']} "
                  f"| {a['cpu_bound_s']} | {c['nbdkit_file_s']} | {k['server_cpu_s']} | {k['client_cpu_s']} | {k['busy_cores']} "
                  f"| {c['local_agent_over_nbdkit']} | {c['local_cpu_ceiling_over_nbdkit']} |"
                  for c in copies.values() for a, k in [(c["cpu"]["agent"], c["cpu"]["nbdkit"])]]  # fmt: skip
    notes = (
        f"**Agent cold read vs the link's own limit.** A fully allocated {copy_mib} MiB data disk (half-compressible "
        "blocks) backed up to a local directory and to SeaweedFS on loopback, then read whole through `liverestore "
        "serve` from a cold cache by `nbdcopy` as QEMU's mirror reads (1 MiB requests, 16 in flight); against a "
        "plain boto3 download of the same pack objects (8 MiB ranged GETs, 32 threads), the agent again with "
        "readahead off (`--readahead-mib 0`, one round), and (issue "
        "'Performance at real sizes') against `nbdkit file` serving the raw disk to the same nbdcopy and a "
        "local `qemu-img convert` of it to a file; and a classic restore's copy of it from the local directory "
        "(every block fetched, checked, written to a new raw file, fsync'd) against that convert. Each copy ran "
        f"{ROUNDS} times, in turn with the others and each after `sync`, and each column is its median (the runs are in "
        "the JSON). Ratios are "
        "speed ratios (time of the peer / time of the agent). MB/s of stored (compressed) bytes. Targets: agent on "
        "S3 >= 0.8x the download; agent >= 0.8x nbdkit; classic restore >= 0.8x convert.\n\n" + "\n".join(copy_table) + "\n\n"
        f"**What the local cold read costs in CPU**, in the same rounds (medians): the server's CPU seconds and "
        f"nbdcopy's, and how many of the host's {os.cpu_count()} cores were busy on average (everything on the host, "
        "the kernel's write-back of the cache included). CPU-bound s: (server + nbdcopy CPU) / cores, the "
        "least the copy could take with every core busy all the time; ceiling from CPU: nbdkit's time over it, "
        "the best agent / nbdkit ratio the agent's CPU allows on this host. nbdkit copies bytes from the page "
        "cache; the agent decompresses, checks the hash of and writes each block to its read-cache before "
        "sending it.\n\n" + "\n".join(cpu_table) + "\n\n"
        "**Instant restore of the test VM.** The test VM (2 GiB disk: 90 MB read at boot, 250 MB cold) backed up "
        "to each repository, then instant-restored with the QEMU driver, no emulated latency: time to boot with "
        "the profile (after a run that records it); relocation from the end of boot to the pivot (mirror start "
        "and pivot included); repository requests per GiB relocated (ranged reads; neighbouring chunks of a pack "
        "share one) against blocks per GiB (what one object per chunk would cost). Side by side in one run."
    )
    write_results("s3", {"rows": results, "cold_copy": copies}, rows,
                  ["block KiB", "repository", "boot (profile) s", "relocation s", "blocks/GiB", "requests/GiB",
                   "relocation MB/s"], notes)  # fmt: skip
    return {**results, **{f"copy-{k}": v for k, v in copies.items()}}
