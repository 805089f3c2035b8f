"""Shared, expensive fixtures for the end-to-end tests: one test VM image and repository per session;
and the scenarios both hypervisor drivers are put through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.hypervisor.base import Hypervisor
from liverestore.hypervisor.qemu import QemuVM
from liverestore.repository import Repository, RestorePoint
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport, state_path
from liverestore.testvm import BuiltImage, build_test_vm
from liverestore.testvm.localboot import boot_local_copy
from tests.helpers import MiB, make_disk
from tests.libvirtfixtures import virsh
from tests.packs import stored_bytes


@dataclass
class VmBackup:
    image: BuiltImage
    data_disk: Path
    repo_path: Path
    point_id: str

    def open_repo(self) -> Repository:
        return Repository.open(self.repo_path)


@pytest.fixture(scope="session")
def vm_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmBackup]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: run ./setup.sh")
    base = tmp_path_factory.mktemp("vmbackup")
    image = build_test_vm(base / "testvm.raw", size=512 * MiB, payload_mb=90, cold_mb=32)
    data = base / "data.raw"
    make_disk(data, 64 * MiB, seed=9)
    repo = Repository.init(base / "repo", block_size=64 * 1024)
    point, _ = run_backup(repo, "testvm", [image.path, data], [])
    repo.close()
    yield VmBackup(image, data, base / "repo", point.id)


def backup_digest(repo: Repository, point: RestorePoint) -> dict[str, bytes]:
    """Every byte of the backup itself: manifests and the chunks they name."""
    out = {}
    for rec in point.record.disks:
        out[f"manifest/{rec.manifest_id}"] = (repo.manifest_dir / rec.manifest_id).read_bytes()
        for cid in repo.load_manifest(rec).blocks:
            if cid:
                out[cid] = stored_bytes(repo, cid)
    return out


def boot_local(image: Path, workdir: Path) -> float:
    return asyncio.run(boot_local_copy(image, workdir))


def extract(path: Path, offset: int, size: int, out: Path) -> Path:
    with open(path, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 8 * MiB))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    return out


def fill_destination_mid_relocation(repo: Repository, vm: str, name: str, base: Path, driver: str) -> RestoreReport:
    """Restore ``vm`` as ``name`` onto a tmpfs in ``base`` just big enough for its disks; fill
    it once the copies have started, and again once they failed and the VM runs on (its guest's
    next write is refused and the hypervisor pauses it); free it. Returns the report of the
    restore, which must have relocated after exactly one failure, the guest alive throughout."""
    point = repo.get_point(vm)
    need = sum(d.allocated for d in point.record.disks)
    mnt = base / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need + 48 * MiB},mode=0755", "tmpfs", str(mnt)], check=True)
    dest, filler = mnt / "primary", mnt / "filler"
    opts = RestoreOptions(vm=vm, dest=dest, cache_dir=base / "cache", repo_mbps=200, use_profile=False,
                          record_profile=False, boot_marker="BOOT-OK", hypervisor=driver, name=name)  # fmt: skip

    def fill() -> None:
        with open(filler, "wb") as f, contextlib.suppress(OSError):  # until the file system is full
            while True:
                f.write(b"\xff" * MiB)
                f.flush()

    async def paused_on_io_error(vm: Hypervisor) -> bool:
        if isinstance(vm, QemuVM):  # QEMU's werror=enospc
            return bool((await vm.execute("query-status"))["status"] == "io-error")
        return "I/O error" in virsh("domstate", name, "--reason")

    async def go() -> tuple[RestoreReport, str]:
        job = InstantRestore(repo, opts)
        run = asyncio.create_task(job.run())
        try:
            while not list(dest.glob(f"{name}-*")):  # the copies have started
                assert not run.done(), run
                await asyncio.sleep(0.1)
            await asyncio.to_thread(fill)
            while json.loads(state_path(dest, name).read_text())["state"] != "running-from-backup":
                assert not run.done(), run  # the copies failed, were removed, and the VM runs on
                await asyncio.sleep(0.2)
            vm = job.vm
            assert vm is not None and vm.running and job.report.relocation_failures
            assert not list(dest.glob(f"{name}-*"))
            await asyncio.to_thread(fill)  # full again, and now the guest's own write is refused
            mark = len(vm.serial_output())
            await vm.send_console("write")
            deadline = time.monotonic() + 90
            while not await paused_on_io_error(vm):
                assert time.monotonic() < deadline, "the guest's write never met the full disk"
                await asyncio.sleep(0.2)
            filler.unlink()
            report = await asyncio.wait_for(run, 300)
            await vm.wait_for_console("WRITE-OK", 120, start=mark)  # its write went through after all
            assert vm.running
            mark = len(vm.serial_output())
            await vm.send_console("verify")  # every payload file re-read, from the relocated disk
            await vm.wait_for_console("VERIFY-OK", 120, start=mark)
            return report, vm.serial_output()
        finally:
            if not run.done():
                run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await job.close()

    try:
        report, serial = asyncio.run(go())
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert report.relocated and len(report.relocation_failures) == 1, report.relocation_failures
    assert "BOOT-FAIL" not in serial and "VERIFY-FAIL" not in serial
    return report
