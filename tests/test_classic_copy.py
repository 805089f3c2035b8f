"""A classic restore's copy (every block to the destination before launch) through the real
repository and the real link emulation: the bytes arrive whole, the copy starts its fetches in
batches so neighbouring blocks share ranged reads, and behind a long link the number in flight
follows the link instead of a fixed 32."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from liverestore.backup import run_backup
from liverestore.repository import Repository
from liverestore.restore import RestoreOptions, RestoreReport, copy_disk
from tests.helpers import MiB

KiB = 1024
BLOCKS = 1024  # 64 MiB of 64 KiB blocks


def _copy(tmp_path: Path, latency_ms: float, fetch_slots: int | None = None) -> tuple[RestoreReport, float]:
    """(report, seconds) of one copy of a disk of random bytes, checked byte for byte."""
    repo = Repository.init(tmp_path / "repo", block_size=64 * KiB)
    src = tmp_path / "disk0.raw"
    data = os.urandom(BLOCKS * 64 * KiB)
    src.write_bytes(data)
    point = run_backup(repo, "vm1", [src], [])[0]
    opts = RestoreOptions(vm="vm1", dest=tmp_path / "dest", cache_dir=tmp_path / "cc", repo_latency_ms=latency_ms,
                          repo_mbps=1000.0 if latency_ms else 0.0, fetch_slots=fetch_slots)  # fmt: skip
    report = RestoreReport(vm="vm1", point=point.id, mode="classic")
    dest = tmp_path / "disk0.copy"
    t0 = time.monotonic()
    asyncio.run(copy_disk(repo, repo.load_manifest(point.record.disks[0]), dest, opts, report))
    took = time.monotonic() - t0
    assert dest.read_bytes() == data and report.blocks_fetched == BLOCKS
    assert not dest.with_name(dest.name + ".partial").exists()
    repo.close()
    return report, took


def test_a_copy_behind_a_link_shares_ranged_reads(tmp_path: Path) -> None:
    """10 ms per fetch: started one by one as single fetches completed (each block's transfer on
    the link ends at its own time), more than half the blocks were requests of their own (9,414
    for the 16,384 blocks of a 1 GiB disk); started in batches of tasks, about one in eight
    (129-140 requests here); a batch as one ``fetch_many``, whose blocks reach the repository in
    one turn, about one in fourteen (70-78)."""
    report, took = _copy(tmp_path, 10.0)
    print(f"10 ms link: {report.repository_requests} requests for {BLOCKS} blocks in {took:.2f} s")
    assert report.repository_requests <= BLOCKS // 10


def test_a_copy_behind_a_long_link_keeps_more_than_32_in_flight(tmp_path: Path) -> None:
    """50 ms per fetch, 1 Gbit/s: 32 fetches in flight move 40 MB/s of the link's 125; the
    adaptive limit fills it. A 1 GiB copy took 28.5 s with 32, 7.4 s adaptive (link time 4.3 s)."""
    _, fixed_s = _copy(tmp_path / "fixed", 50.0, fetch_slots=32)
    _, adaptive_s = _copy(tmp_path / "adaptive", 50.0)
    print(f"50 ms link, {BLOCKS * 64 * KiB // MiB} MiB: 32 in flight {fixed_s:.2f} s, adaptive {adaptive_s:.2f} s")
    assert adaptive_s < 0.75 * fixed_s
