"""Several real VMs instant-restored at once from one agent: each boots, relocates, pivots and
re-verifies its payload; one VM's failure leaves the others alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.mass_restore import MassRestore
from liverestore.repository import Repository
from liverestore.restore import RestoreOptions, RestoreReport, state_path
from tests.vmfixtures import VmBackup, backup_digest

NAMES = ["web", "db", "cache"]


@pytest.fixture(scope="module")
def three_vms(vm_backup: VmBackup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test VM backed up as three VMs (the repository dedups them; their caches do not)."""
    root = tmp_path_factory.mktemp("three") / "repo"
    repo = Repository.init(root, block_size=64 * 1024)
    for name in NAMES:
        run_backup(repo, name, [vm_backup.image.path, vm_backup.data_disk], [])
    repo.close()
    return root


def _options(names: list[str], tmp_path: Path, latency_ms: float = 3) -> list[RestoreOptions]:
    return [RestoreOptions(vm=n, dest=tmp_path / "primary", cache_dir=tmp_path / "cache", hypervisor="qemu",
                           repo_latency_ms=latency_ms, use_profile=False, record_profile=False)
            for n in names]  # fmt: skip


def test_three_vms_boot_relocate_and_verify_together(three_vms: Path, tmp_path: Path) -> None:
    repo = Repository.open(three_vms)
    before = {n: backup_digest(repo, repo.get_point(n)) for n in NAMES}
    job = MassRestore(repo, _options(NAMES, tmp_path))

    async def go() -> tuple[list[RestoreReport | BaseException], list[str], int]:
        try:
            results = await job.run()
            assert job.agent is not None and not job.agent.exports  # every point released at its pivot
            assert job.agent.sharing is not None
            shared = job.agent.sharing.shared_blocks
            serials = []
            for r in job.restores:  # every guest re-reads its whole payload from its relocated disk
                vm = r.vm
                assert vm is not None and vm.running
                mark = len(vm.serial_output())
                await vm.send_console("verify")
                await vm.wait_for_console("VERIFY-OK", 180, start=mark)
                serials.append(vm.serial_output())
            return results, serials, shared
        finally:
            await job.close(stop_vm=True)

    results, serials, shared = asyncio.run(go())
    for name, r, serial in zip(NAMES, results, serials, strict=True):
        assert isinstance(r, RestoreReport), r
        assert r.vm == name and r.relocated and "VERIFY-FAIL" not in serial
        assert set(r.destinations) == {"testvm", "data"}
        assert all(Path(p).exists() for p in r.destinations.values())
        assert r.blocks_fetched > 0 and r.repository_requests > 0 and r.reads > 0  # its own counters
        assert json.loads(state_path(tmp_path / "primary", name).read_text())["state"] == "complete"
        assert not (tmp_path / "cache" / f"{name}-{r.point}").exists()  # its read-cache went at its pivot
        # its own counters, not the agent's totals: relocation fetched each of its blocks once at most
        point = repo.get_point(name)
        allocated = sum(repo.load_manifest(rec).allocated_count for rec in point.record.disks)
        assert allocated // 2 < r.blocks_fetched <= allocated, (name, r.blocks_fetched, allocated)
    # the three are one image: each chunk crossed the link once and was copied for the other two
    # (2 x allocated; 4,476 of 6,714 here), unless a clone pivoted before another copied from it
    assert shared >= allocated, (shared, allocated)
    assert {n: backup_digest(repo, repo.get_point(n)) for n in NAMES} == before  # backups untouched
    assert not list((tmp_path / "primary").glob("*.partial"))


def test_one_failed_vm_leaves_the_others_running(three_vms: Path, tmp_path: Path) -> None:
    """db's QEMU dies while it boots: db's restore fails and cleans up after itself alone;
    web is restored to the end from the same agent."""
    repo = Repository.open(three_vms)
    job = MassRestore(repo, _options(["web", "db"], tmp_path, latency_ms=10))

    async def go() -> list[RestoreReport | BaseException]:
        task = asyncio.create_task(job.run())
        db = job.restores[1]
        while db.vm is None or db.vm.pid is None:  # db launched: kill its QEMU mid-boot
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        os.kill(db.vm.pid, signal.SIGKILL)
        try:
            results = await task
            web = job.restores[0].vm
            assert web is not None and web.running  # still running, from its relocated disks
            return results
        finally:
            await job.close(stop_vm=True)

    web_result, db_result = asyncio.run(go())
    assert isinstance(web_result, RestoreReport) and web_result.relocated, web_result
    assert isinstance(db_result, Exception) and not isinstance(db_result, AssertionError), db_result
    dest = tmp_path / "primary"
    assert json.loads(state_path(dest, "db").read_text())["state"] == "aborted"
    assert not list(dest.glob("db-*")), list(dest.glob("db-*"))  # none of db's disk files remain
    assert all(Path(p).exists() for p in web_result.destinations.values())


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _lr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_cli_restores_several_vms_with_a_report_each(three_vms: Path, tmp_path: Path) -> None:
    r = _lr("restore", "--repo", str(three_vms), "--vm", "web", "--vm", "db", "--dest", str(tmp_path / "p"),
            "--cache-dir", str(tmp_path / "c"), "--hypervisor", "qemu", "--boot-marker", "BOOT-OK",
            "--stop-after", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    assert [d["vm"] for d in docs] == ["web", "db"]
    for d in docs:
        assert d["relocated"] and d["boot_detected_by"] == "console marker" and d["time_to_boot_s"] > 0
        assert set(d["phases"]) >= {"plan", "prefetch", "launch", "run", "relocate", "pivot"}
        assert all(Path(p).exists() for p in d["destinations"].values())


def test_cli_refuses_before_anything_starts(three_vms: Path, tmp_path: Path) -> None:
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "db-testvm.raw").write_bytes(b"someone's disk")
    base = ["restore", "--repo", str(three_vms), "--dest", str(dest), "--cache-dir", str(tmp_path / "c"),
            "--hypervisor", "qemu"]  # fmt: skip
    for extra, needle in (
        (["--vm", "web", "--vm", "db"], "already exists"),  # db's destination: web does not start either
        (["--vm", "web", "--vm", "web"], "named twice"),
        (["--vm", "web", "--vm", "db", "--name", "x"], "--name goes with one --vm"),
        (["--vm", "web", "--vm", "db", "--resume"], "nothing to resume"),
        (["--vm", "web", "--vm", "nosuch"], "'nosuch'"),
    ):
        r = _lr(*base, *extra)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], (extra, r.stderr)
    assert sorted(p.name for p in dest.iterdir()) == ["db-testvm.raw"]  # nothing started, nothing written
    assert (dest / "db-testvm.raw").read_bytes() == b"someone's disk"


def test_killed_mass_restore_is_resumed_together(three_vms: Path, vm_backup: VmBackup, tmp_path: Path) -> None:
    """The orchestrator of two VMs dies mid-relocation: both keep running, reading from nothing.
    Resuming one alone would serve the other no export on the port they share, so it is refused;
    resuming both brings one agent back on that port and finishes both."""
    dest = tmp_path / "primary"
    base = [sys.executable, "-m", "liverestore", "restore", "--repo", str(three_vms), "--vm", "web", "--vm", "db",
            "--dest", str(dest), "--cache-dir", str(tmp_path / "c"), "--hypervisor", "qemu",
            "--boot-marker", "BOOT-OK"]  # fmt: skip
    proc = subprocess.Popen([*base, "--no-profile", "--repo-mbps", "80"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    states = [state_path(dest, n) for n in ("web", "db")]

    def state(p: Path) -> str:
        return str(json.loads(p.read_text())["state"]) if p.exists() else "none"

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(state(p) == "relocating" for p in states):
        assert proc.poll() is None, "the restore ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.5)  # the mirrors are copying
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sts = [json.loads(p.read_text()) for p in states]
    assert [st["state"] for st in sts] == ["relocating", "relocating"]
    assert sts[0]["nbd_port"] == sts[1]["nbd_port"] and sts[0]["agent_shared_with"] == ["db"]
    pids = [st["driver"]["pid"] for st in sts]
    try:
        alone = subprocess.run([*base[:8], "--dest", str(dest), "--resume"], capture_output=True, text=True,
                               timeout=60)  # fmt: skip
        assert alone.returncode == 1 and "resume them together" in alone.stderr, alone.stderr
        assert all(_running(pid) for pid in pids)  # refused: both VMs untouched, still running

        r = subprocess.run([*base, "--resume", "--json"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        docs = json.loads(r.stdout)
        assert [d["vm"] for d in docs] == ["web", "db"]
        for d, p in zip(docs, states, strict=True):
            assert d["relocated"] and d["mode"] == "instant-resumed" and state(p) == "complete"
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(vm_backup.data_disk),
                                  d["destinations"]["data"]], capture_output=True, text=True)  # fmt: skip
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert all(_running(pid) for pid in pids)  # the same guests, on primary storage now
    finally:
        for pid in pids:
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)
