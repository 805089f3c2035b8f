"""Retention and garbage collection: forget by policy (dry run first), prune what nothing
references, never beside a backup, never under a serving agent; and a chaos loop of backups,
serves and prunes killed at random that leaves a repository that verifies and restores."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from liverestore.repository.catalog import PointRecord
from liverestore.repository.leases import BACKUP, MAINTENANCE, Lease
from liverestore.retention import plan_forget
from tests.conftest import AgentFactory
from tests.helpers import MiB
from tests.nbdclient import NbdClient

DAY = 86400.0
BS = 64 * 1024


def lr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _point(pid: str, created: float) -> RestorePoint:
    return RestorePoint(PointRecord(pid, "vm", created, 0, (), ()))


def test_policy_keeps_last_daily_weekly_and_what_is_in_use() -> None:
    monday = 1_763_942_400.0  # 2025-11-24 00:00 UTC, a Monday
    # two points a day for 15 days, at 01:00 and 13:00
    points = [_point(f"p{d:02d}{h:02d}", monday + d * DAY + h * 3600) for d in range(15) for h in (1, 13)]
    plan = plan_forget(points, keep_last=2, keep_daily=3, keep_weekly=2, in_use={"p0001": "serve by test"})
    kept = {p.id: why for p, why in plan.keep}
    # the last two; the newest of each of the last 3 days; of each of the last 2 ISO weeks (day 14
    # is a Monday, day 13 the Sunday before); the one in use
    assert set(kept) == {"p1413", "p1401", "p1313", "p1213", "p0001"}
    assert kept["p1413"] == "last, daily, weekly" and kept["p1313"] == "daily, weekly"
    assert kept["p1401"] == "last" and "in use" in kept["p0001"]
    assert len(plan.forget) == len(points) - len(kept)
    assert plan_forget(points, 0, 0, 0, {}).forget == sorted(points, key=lambda p: -p.record.created)


def _write_disk(path: Path, rnd: random.Random, base: bytes | None) -> bytes:
    data = bytearray(base if base is not None else rnd.randbytes(8 * MiB))
    for _ in range(3):
        at = rnd.randrange(0, len(data) // BS) * BS
        data[at : at + BS] = rnd.randbytes(BS)
    path.write_bytes(bytes(data))
    return bytes(data)


def _unreferenced_bytes(repo_path: Path) -> int:
    repo = Repository.open(repo_path)
    try:
        repo.sync_catalog()
        referenced: set[str] = set()
        for p in repo.points():
            referenced.update(c.chunk_id for c in p.record.configs)
            for d in p.record.disks:
                referenced.update(c for c in repo.load_manifest(d).blocks if c)
        return sum(repo.chunks.stored_size(c) for c in repo.chunks.iter_ids() if c not in referenced)
    finally:
        repo.close()


def test_forget_dry_run_apply_and_prune(tmp_path: Path) -> None:
    repo_path, disk = tmp_path / "repo", tmp_path / "disk.raw"
    assert lr("init", str(repo_path), "--block-size", "64K").returncode == 0
    rnd, content, ids = random.Random(1), None, []
    for _ in range(5):
        content = _write_disk(disk, rnd, content)
        ids.append(lr("backup", "--repo", str(repo_path), "--vm", "vm1", str(disk)).stdout.strip())
    r = lr("forget", "--repo", str(repo_path), "--vm", "vm1", "--keep-last", "2")
    assert r.returncode == 0 and "dry run: 3 point(s) would be forgotten" in r.stderr
    assert sorted(re.findall(r"forget  (\w+)", r.stdout)) == sorted(ids[:3])
    r = lr("forget", "--repo", str(repo_path), "--vm", "vm1")
    assert r.returncode == 1 and "give at least one of --keep-last" in r.stderr
    before = _unreferenced_bytes(repo_path)
    assert before == 0
    r = lr("forget", "--repo", str(repo_path), "--vm", "vm1", "--keep-last", "2", "--apply")
    assert r.returncode == 0 and len(re.findall(r"forgot  ", r.stdout)) == 3
    assert _unreferenced_bytes(repo_path) > 0  # forgotten points' own blocks
    r = lr("prune", "--repo", str(repo_path))
    assert r.returncode == 0 and re.search(r"deleted [1-9]\d* chunk", r.stdout), r.stdout + r.stderr
    assert _unreferenced_bytes(repo_path) == 0
    assert lr("verify", "--repo", str(repo_path)).returncode == 0


def test_a_served_point_is_kept_and_its_data_survives_prune(repo: Repository, tmp_path: Path,
                                                           start_agent: AgentFactory) -> None:  # fmt: skip
    disk = tmp_path / "d.raw"
    rnd = random.Random(2)
    first = _write_disk(disk, rnd, None)
    p1, _ = run_backup(repo, "vm1", [disk], [])
    for _ in range(2):
        _write_disk(disk, rnd, first)
        run_backup(repo, "vm1", [disk], [])
    agent = start_agent(repo, p1)
    r = lr("forget", "--repo", str(repo.root), "--vm", "vm1", "--keep-last", "1", "--apply")
    assert r.returncode == 0 and f"keep    {p1.id}" in r.stdout and "in use" in r.stdout, r.stdout
    assert lr("prune", "--repo", str(repo.root)).returncode == 0
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    assert c.read(0, len(first)) == first
    c.close()


def test_backup_and_maintenance_exclude_each_other(repo: Repository, disk: tuple[Path, bytes]) -> None:
    with Lease(repo, BACKUP):
        r = lr("prune", "--repo", str(repo.root))
        assert r.returncode == 1 and "the repository is busy (backup by pid" in r.stderr, r.stderr
    with Lease(repo, MAINTENANCE):
        r = lr("backup", "--repo", str(repo.root), "--vm", "vm1", str(disk[0]))
        assert r.returncode == 1 and "busy (maintenance by pid" in r.stderr, r.stderr
    assert lr("backup", "--repo", str(repo.root), "--vm", "vm1", str(disk[0])).returncode == 0


def _serve_and_read(repo_path: Path, point: str, versions: list[bytes], env: dict[str, str]) -> str:
    """Serve ``point`` and read it whole: it must equal one of the disk's versions exactly."""
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(repo_path), "--vm", "vm1",
                             "--point", point, "--listen", "127.0.0.1:0", "--cache-dir", str(repo_path.parent / "c"
                             / point / str(time.monotonic_ns()))], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, **env})  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not m:
            return "not served: " + (line + proc.stderr.read()).strip()  # forgotten meanwhile
        c = NbdClient("127.0.0.1", int(m.group(1)), "vm1/disk")
        data = c.read(0, 8 * MiB)
        c.close()
        assert data in versions, f"point {point} served bytes that were never a state of the disk"
        return "read"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_chaos_backup_serve_forget_prune_with_kills(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rounds = 20
    env = {"LIVERESTORE_LEASE_TTL": "2"}
    repo_path, disk = tmp_path / "repo", tmp_path / "disk.raw"
    assert lr("init", str(repo_path), "--block-size", "64K").returncode == 0
    rnd = random.Random(request.config.getoption("--fuzz-seed") or 7)
    versions: list[bytes] = []
    outcomes: dict[str, int] = {}
    lifetimes = {"backup": [0.6], "maintenance": [1.2]}  # seconds each ran when not killed, to aim kills
    for _ in range(rounds):
        versions.append(_write_disk(disk, rnd, versions[-1] if versions else None))
        base = [sys.executable, "-m", "liverestore"]
        started = {"backup": time.monotonic()}
        backup = subprocess.Popen([*base, "backup", "--repo", str(repo_path), "--vm", "vm1", str(disk)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})  # fmt: skip
        time.sleep(rnd.uniform(0, 0.4))
        started["maintenance"] = time.monotonic()
        maint = subprocess.Popen(["sh", "-c", " ".join([*base, "forget", "--repo", str(repo_path), "--vm", "vm1",
                                                        "--keep-last", "3", "--apply", "&&", *base, "prune",
                                                        "--repo", str(repo_path)])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env},
                                 start_new_session=True)  # fmt: skip
        # a kill at a random moment of one of them (startup, lease, chunk writes, commit, deletions),
        # while an agent serves a point and it is read back whole
        victim = rnd.choice(["backup", "maintenance", "none"])
        target = {"backup": backup, "maintenance": maint}.get(victim)

        def kill(p: subprocess.Popen[bytes] | None = target, group: bool = victim == "maintenance") -> None:
            with contextlib.suppress(ProcessLookupError):  # it may have finished first
                if p is not None and group:
                    os.killpg(p.pid, signal.SIGKILL)  # the shell and the liverestore it runs
                elif p is not None:
                    p.kill()

        lifetime = statistics.median(lifetimes.get(victim, [0.1]))
        timer = threading.Timer(rnd.uniform(0.05, 0.95 * lifetime), kill)
        timer.start()
        ended: dict[str, float] = {}
        watchers = [threading.Thread(target=lambda p=p, n=n, e=ended: (p.wait(), e.__setitem__(n, time.monotonic())))
                    for p, n in ((backup, "backup"), (maint, "maintenance"))]  # fmt: skip
        for w in watchers:
            w.start()
        doc = lr("list", "--repo", str(repo_path), "--json", env=env)
        ids = re.findall(r'"id": "(\w+)"', doc.stdout)
        if ids:
            outcome = _serve_and_read(repo_path, rnd.choice(ids), versions, env)
            outcomes[outcome.split(":")[0]] = outcomes.get(outcome.split(":")[0], 0) + 1
        timer.join()
        for w in watchers:
            w.join(120)
        for proc, name in ((backup, "backup"), (maint, "maintenance")):
            _, err = proc.communicate(timeout=120)
            if proc.returncode == 0:
                lifetimes[name].append(ended[name] - started[name])
            refused = proc.returncode == 1 and (b"the repository is busy" in err or b"has no backups" in err)
            assert proc.returncode in (0, -9) or refused, f"{name} failed: {err.decode()}"
            key = f"{name} {'killed' if proc.returncode in (-9, 137) else 'refused' if proc.returncode == 1 else 'ok'}"
            outcomes[key] = outcomes.get(key, 0) + 1
    print("chaos outcomes:", outcomes)
    assert outcomes.get("backup ok", 0) >= 3 and outcomes.get("maintenance ok", 0) >= 1, outcomes
    assert outcomes.get("backup killed", 0) + outcomes.get("maintenance killed", 0) >= 3, outcomes

    time.sleep(3)  # the killed holders' leases lapse
    r = lr("prune", "--repo", str(repo_path), env=env)
    assert r.returncode == 0, r.stderr
    v = lr("verify", "--repo", str(repo_path), env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    assert _unreferenced_bytes(repo_path) == 0
    ids = re.findall(r'"id": "(\w+)"', lr("list", "--repo", str(repo_path), "--json", env=env).stdout)
    assert ids
    for pid in ids:
        assert _serve_and_read(repo_path, pid, versions, env) == "read"
