"""Reliability: damage is named, crashes lose nothing, outages are ridden out, load stays correct."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from liverestore.agent.nbd import protocol as p
from liverestore.agent.source import Fetched, RepositorySource, RetryingSource
from liverestore.backup import run_backup
from liverestore.errors import RepositoryUnavailable
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import MiB, make_disk
from tests.nbdclient import NbdClient, NbdError
from tests.packs import chunk_file, flip_chunk_byte

LR = [sys.executable, "-m", "liverestore"]


def lr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LR, *args], capture_output=True, text=True, timeout=300)


def test_verify_names_every_kind_of_damage(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    make_disk(a, 16 * MiB, seed=1)
    make_disk(b, 16 * MiB, seed=2)
    c = tmp_path / "c.raw"
    make_disk(c, 1 * MiB, seed=3)
    pa, _ = run_backup(repo, "vma", [a], [])
    pb, _ = run_backup(repo, "vmb", [b], [])
    pc, _ = run_backup(repo, "vmc", [c], [])  # a backup of one chunk: its pack holds nothing else
    ok = lr("verify", "--repo", str(repo.root))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr

    ma = repo.load_manifest(pa.record.disks[0])
    flipped = next(c for c in ma.blocks if c)
    flip_chunk_byte(repo, flipped, at=1 / 3, mask=0x40)
    missing = next(c for c in repo.load_manifest(pc.record.disks[0]).blocks if c)
    chunk_file(repo, missing)[0].unlink()
    mb = repo.root / "manifests" / pb.record.disks[0].manifest_id
    mb.write_bytes(mb.read_bytes()[: mb.stat().st_size // 2])

    r = lr("verify", "--repo", str(repo.root))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"chunk {flipped} is corrupt" in r.stderr
    assert f"chunk {missing} is missing" in r.stderr
    assert f"manifest {pb.record.disks[0].manifest_id[:16]}" in r.stderr and "vmb" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("liverestore: error: 3 problem(s) found")
    only_b = lr("verify", "--repo", str(repo.root), "--vm", "vmb")
    assert only_b.returncode == 1 and flipped not in only_b.stderr


def test_kill9_during_backup_leaves_no_partial_point(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert lr("init", str(repo), "--block-size", "64K").returncode == 0
    disk = tmp_path / "big.raw"
    with open(disk, "wb") as f:
        for _ in range(24):
            f.write(os.urandom(16 * MiB))
    proc = subprocess.Popen([*LR, "backup", "--repo", str(repo), "--vm", "big", str(disk)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while sum(f.is_file() for f in (repo / "packs").rglob("*")) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the backup finished before it could be killed"
    listing = json.loads(lr("list", "--repo", str(repo), "--json").stdout)
    assert "big" not in listing["vms"]
    again = lr("backup", "--repo", str(repo), "--vm", "big", str(disk))
    assert again.returncode == 0, again.stderr
    assert lr("verify", "--repo", str(repo)).returncode == 0


def test_repository_outage_waits_warns_and_resumes(
    repo: Repository, point: RestorePoint, disk: tuple[Path, bytes], start_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    agent = start_agent(repo, point, repo_latency_ms=1)
    chunks, away = repo.root / "packs", repo.root / "packs.away"
    chunks.rename(away)  # the repository's storage disappears (unmount, NFS outage)
    got: dict[str, bytes] = {}
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    reader = threading.Thread(target=lambda: got.setdefault("data", c.read(2 * MiB, 64 * 1024)))
    reader.start()
    time.sleep(1.5)
    assert reader.is_alive(), "the read must wait for the repository, not fail"
    status = agent.run(agent.agent.status)
    assert status["repository"]["available"] is False
    away.rename(chunks)
    reader.join(30)
    assert got["data"] == disk[1][2 * MiB : 2 * MiB + 64 * 1024]
    assert any("repository unavailable" in r.getMessage() for r in caplog.records)
    assert any("repository is back" in r.getMessage() for r in caplog.records)
    c.close()


def test_repository_outage_retries_are_bounded(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory
) -> None:
    agent = start_agent(repo, point, repo_retry_s=1.0)
    (repo.root / "packs").rename(repo.root / "gone")
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    t0 = time.monotonic()
    with pytest.raises(NbdError) as e:
        c.read(2 * MiB, 4096)
    assert e.value.errno == p.EIO and 0.9 < time.monotonic() - t0 < 10
    assert c.read(40 * MiB, 4096) == bytes(4096)  # holes still served, connection alive
    c.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_many_clients_random_reads(tmp_path: Path, start_agent: AgentFactory) -> None:
    seconds = float(os.environ.get("LIVERESTORE_LOAD_SECONDS", "60"))
    repo = Repository.init(tmp_path / "repo", block_size=64 * 1024)
    disks = {}
    for i in range(3):
        path = tmp_path / f"d{i}.raw"
        disks[f"d{i}"] = make_disk(path, 48 * MiB, seed=10 + i)
    point, _ = run_backup(repo, "load", [tmp_path / f"d{i}.raw" for i in range(3)], [])
    agent = start_agent(repo, point, repo_latency_ms=2, fetch_slots=8)
    rss0 = _rss()
    errors: list[str] = []
    counts = [0] * 8
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        rnd = random.Random(n)
        conns = {name: NbdClient("127.0.0.1", agent.port, f"load/{name}") for name in disks}
        try:
            while time.monotonic() < stop:
                name = rnd.choice(list(disks))
                length = rnd.choice([512, 4096, 65536, 300_000])
                offset = rnd.randrange(0, len(disks[name]) - length)
                if conns[name].read(offset, length) != disks[name][offset : offset + length]:
                    errors.append(f"wrong bytes: {name} {offset}+{length}")
                counts[n] += 1
        except Exception as e:
            errors.append(f"client {n}: {type(e).__name__}: {e}")
        finally:
            for conn in conns.values():
                conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    growth = _rss() - rss0
    print(f"load: {sum(counts)} reads by 8 clients in {seconds:.0f} s, rss growth {growth / MiB:.1f} MiB")
    assert not errors, errors[:5]
    assert all(n > 10 for n in counts)
    assert growth < 200 * MiB
    assert agent.agent.metrics.read_errors == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_full_destination_and_small_cache_are_refused(tmp_path: Path) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "8M"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        repo = tmp_path / "repo"
        disk = tmp_path / "vm1.raw"
        disk.write_bytes(os.urandom(16 * MiB))  # 16 MiB of data cannot fit 8 MiB of space
        lr("init", str(repo))
        lr("backup", "--repo", str(repo), "--vm", "vm1", str(disk))
        r = lr("restore", "--repo", str(repo), "--vm", "vm1", "--dest", str(small / "dest"),
               "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
        assert r.returncode == 1 and "MiB free" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
            r.stderr
        )
        r = lr(
            "serve", "--repo", str(repo), "--vm", "vm1", "--listen", "127.0.0.1:0", "--cache-dir", str(small)
        )
        assert r.returncode == 1 and "cache directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not list(small.rglob("*.raw"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_an_outage_under_a_batch_of_fetches_retries_each_block_until_it_lands(tmp_path: Path) -> None:
    """Blocks started together are fetched by one call (``fetch_many``); an outage under it is
    ridden out for every one of them, each answered once, with its own bytes, when the
    repository is back; and past the deadline each is told the repository is unavailable."""
    repo = Repository.init(tmp_path / "repo", 64 * 1024)
    path = tmp_path / "disk.raw"
    content = make_disk(path, 8 * MiB)
    point, _ = run_backup(repo, "vm1", [path], [])
    manifest = repo.load_manifest(point.record.disks[0])
    blocks = [i for i in range(manifest.block_count) if manifest.is_allocated(i)][:24]
    assert len(blocks) == 24

    async def fetch_all(source: RetryingSource, heal_after: float | None) -> dict[int, list[Fetched | Exception]]:
        answers: dict[int, list[Fetched | Exception]] = {}
        (repo.root / "packs").rename(repo.root / "packs.away")
        if heal_after is not None:
            asyncio.get_running_loop().call_later(heal_after, (repo.root / "packs.away").rename, repo.root / "packs")
        await source.fetch_many(manifest, [(i, None) for i in blocks], lambda n, got: answers.setdefault(n, []).append(got))
        return answers

    source = RetryingSource(RepositorySource(repo), deadline_s=30)
    t0 = time.monotonic()
    answers = asyncio.run(fetch_all(source, heal_after=0.6))
    assert time.monotonic() - t0 >= 0.6 and source.outages == 1 and source.retries >= len(blocks)
    assert sorted(answers) == list(range(len(blocks)))
    for n, got in answers.items():
        assert len(got) == 1 and isinstance(got[0], Fetched), got
        start = blocks[n] * manifest.block_size
        assert got[0].data == content[start : start + manifest.block_size]
    assert source.available

    bounded = RetryingSource(RepositorySource(repo), deadline_s=0.5)
    answers = asyncio.run(fetch_all(bounded, heal_after=None))
    assert sorted(answers) == list(range(len(blocks)))
    assert all(len(got) == 1 and isinstance(got[0], RepositoryUnavailable) for got in answers.values())
    (repo.root / "packs.away").rename(repo.root / "packs")
    repo.close()
