"""Live, incremental backups of a running libvirt domain (qcow2 disks, a real libvirtd, the test
guest writing its heartbeat throughout): each point holds exactly the guest's files of its moment
and restores like any other; an incremental backup reads little more than what the guest wrote;
a killed backup, a second backup at once and a domain that stops mid-backup commit nothing."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from liverestore.livebackup.job import JOB_BASE
from liverestore.repository import Repository
from liverestore.testvm.domain import make_domain_xml
from tests.helpers import MiB, make_disk
from tests.libvirtfixtures import type_into_console, unique_name, virsh, wait_for_log
from tests.vmfixtures import VmBackup

MARK_BYTES = 8 * MiB  # what one "mark NAME" makes the guest write (guest_init.sh)
METADATA_ALLOWANCE = 2 * MiB  # heartbeats, ext4 journal and inode updates between two backups


def lr(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def beats(log: Path) -> int:
    """The last heartbeat the guest printed: written and synced before it printed it."""
    found = re.findall(r"HEARTBEAT (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


@dataclass
class LiveDomain:
    name: str
    base: Path
    log: Path
    repo: Path

    def backup(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return lr("backup", "--repo", str(self.repo), "--libvirt", "--domain", self.name, *extra)

    def point_ids(self) -> list[str]:
        doc = json.loads(lr("list", "--repo", str(self.repo), "--json").stdout)
        return [p["id"] for p in doc["vms"].get(self.name, [])]

    def manifests(self, point_id: str) -> dict[str, str]:
        repo = Repository.open(self.repo)
        try:
            return {d.name: d.manifest_id for d in repo.get_point(self.name, point_id).record.disks}
        finally:
            repo.close()

    def checkpoints(self) -> list[str]:
        return virsh("checkpoint-list", self.name, "--name").split()

    def has_backup_job(self) -> bool:
        return subprocess.run(["virsh", "-c", "qemu:///system", "backup-dumpxml", self.name],
                              capture_output=True).returncode == 0  # fmt: skip

    def wait_for_job_socket(self, proc: subprocess.Popen[Any]) -> None:
        deadline = time.monotonic() + 60
        while not glob.glob(str(JOB_BASE / f"*-{proc.pid}" / "nbd.sock")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup job never exported its disks"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def live(vm_backup: VmBackup, libvirtd: str) -> Iterator[LiveDomain]:
    """The test guest running under libvirt on qcow2 disks (boot disk and 200 MiB of data), plus
    a small raw disk, which cannot carry a dirty bitmap."""
    base = Path("/var/tmp/liverestore-tests") / unique_name("live")
    base.mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    name = unique_name("live")
    vda, sda, sdb = base / "vda.qcow2", base / "sda.qcow2", base / "sdb.raw"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(vm_backup.image.path), str(vda)], check=True)
    with open(base / "sda.raw", "wb") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(base / "sda.raw"), str(sda)], check=True)
    (base / "sda.raw").unlink()
    make_disk(sdb, 16 * MiB, seed=4)
    (base / "seed.iso").write_bytes(os.urandom(2 * MiB))  # stands in for a cloud-init or installer ISO
    log = base / "serial.log"
    (base / "domain.xml").write_text(make_domain_xml(name, vda, sda, more_disks=[sdb], serial_log=log,
                                                     cdrom=base / "seed.iso"))  # fmt: skip
    virsh("define", str(base / "domain.xml"))
    try:
        virsh("start", name)
        wait_for_log(log, "HEARTBEAT 1", 300)
        assert lr("init", str(base / "repo"), "--block-size", "64K").returncode == 0
        yield LiveDomain(name, base, log, base / "repo")
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, "--checkpoints-metadata", check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_live_incremental_points_hold_their_moment_and_restore(live: LiveDomain, vmdir: Path,
                                                              domains: list[str]) -> None:  # fmt: skip
    taken = []
    for k, mark in enumerate(["m1", "m2", "m3"]):
        type_into_console(live.name, f"mark {mark}")
        wait_for_log(live.log, f"MARK-OK {mark}", 120)
        before = beats(live.log)
        r = live.backup("--json", *(["--quiesce"] if k == 1 else []))
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        taken.append((json.loads(r.stdout), r.stderr, before, beats(live.log)))

    first, second, third = (t[0] for t in taken)
    assert first["mode"] == "full" and first["base_checkpoint"] is None
    # the CD-ROM is left out of the backup job (read-only media) and copied as a file instead
    assert {d["name"]: d["mode"] for d in first["disks"]}["hdc"] == "copied"
    assert first["bytes_read"] >= 200 * MiB  # the data disk and the boot disk's files, read whole
    for prev, (doc, err, _, _) in zip([first, second], taken[1:], strict=True):
        assert doc["base_checkpoint"] == prev["checkpoint"], doc
        by_disk = {d["name"]: d for d in doc["disks"]}
        assert by_disk["vda"]["mode"] == by_disk["sda"]["mode"] == "incremental"
        qcow2_read = by_disk["vda"]["bytes_read"] + by_disk["sda"]["bytes_read"]
        print(f"incremental backup read {qcow2_read / MiB:.2f} MiB from the qcow2 disks after {MARK_BYTES / MiB:.0f} MiB "
              f"written (+ {by_disk['sdb']['bytes_read'] / MiB:.0f} MiB raw sdb read whole)")  # fmt: skip
        assert qcow2_read <= 1.1 * MARK_BYTES + METADATA_ALLOWANCE, (qcow2_read, doc)
        assert by_disk["sda"]["bytes_read"] == 0  # the guest never wrote its data disk
        # the raw disk cannot carry a bitmap: read in full every time, and said so
        assert by_disk["sdb"]["mode"] == "full" and by_disk["sdb"]["bytes_read"] > 0
        assert "sdb is a raw disk and cannot carry a dirty bitmap" in err
    assert "crash-consistent, not quiesced" in taken[1][1]  # --quiesce without a guest agent says so
    # one checkpoint remains (the next backup's base), no job is left, every point verifies
    assert live.checkpoints() == [third["checkpoint"]]
    assert not live.has_backup_job() and not list(JOB_BASE.glob("*-*"))
    v = lr("verify", "--repo", str(live.repo))
    assert v.returncode == 0, v.stdout + v.stderr

    # with the guest paused nothing changes between two backups: the incremental point (previous
    # manifest + dirty blocks) must be block for block the point a full read makes
    virsh("suspend", live.name)
    try:
        inc, full = live.backup("--json"), live.backup("--json", "--full")
    finally:
        virsh("resume", live.name)
    assert inc.returncode == 0 and full.returncode == 0, inc.stderr + full.stderr
    inc_doc, full_doc = json.loads(inc.stdout), json.loads(full.stdout)
    assert {d["name"]: d["mode"] for d in inc_doc["disks"]}["vda"] == "incremental"
    assert live.manifests(inc_doc["point_id"]) == live.manifests(full_doc["point_id"])

    # every point, instant-restored, boots, passes the guest's file check, and holds the marks
    # written before its backup and none after; its last heartbeat falls within the backup. The
    # first one runs in plain QEMU (which must not try to relocate the copied CD-ROM), the others
    # under libvirt.
    for k, (doc, _, before, after) in enumerate(taken):
        new = f"{live.name}-p{k}"
        domains.append(new)
        r = lr("restore", "--repo", str(live.repo), "--vm", live.name, "--point", doc["point_id"], "--name", new,
               "--dest", str(vmdir / f"p{k}"), "--cache-dir", str(vmdir / "cache"), "--boot-marker", "BOOT-OK",
               "--stop-after", "--json", "--hypervisor", "qemu" if k == 0 else "libvirt")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (vmdir / f"p{k}" / f"{new}-hdc.iso").read_bytes() == (live.base / "seed.iso").read_bytes()
        serial = Path(json.loads(r.stdout)["serial_log"]).read_text(errors="replace")
        assert "BOOT-OK" in serial and "BOOT-FAIL" not in serial
        assert serial.split("MARKS ", 1)[1].splitlines()[0].split() == ["m1", "m2", "m3"][: k + 1]
        last = int(serial.split("LASTBEAT beat ", 1)[1].split()[0])
        assert before <= last <= after, (before, last, after)


def test_lost_checkpoint_or_bitmap_means_a_full_read_never_a_wrong_point(live: LiveDomain) -> None:
    assert live.backup().returncode == 0  # a fresh checkpoint to lose
    # libvirt forgets the checkpoint (as when a shut-off domain is redefined): nothing vouches
    # for the previous point
    [cp] = live.checkpoints()
    virsh("checkpoint-delete", live.name, cp, "--metadata")
    r = live.backup("--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {d["name"]: d["mode"] for d in doc["disks"]} == {"vda": "full", "sda": "full", "sdb": "full",
                                                            "hdc": "copied"}  # fmt: skip
    assert "is gone (domain redefined?)" in r.stderr

    # bitmap lost under a checkpoint libvirt still lists: libvirt refuses the incremental job and
    # the backup reads in full instead
    [cp] = live.checkpoints()
    nodes = json.loads(virsh("qemu-monitor-command", live.name, '{"execute":"query-named-block-nodes"}'))
    holders = [n["node-name"] for n in nodes["return"] if any(b["name"] == cp for b in n.get("dirty-bitmaps", []))]
    assert holders, "the checkpoint's bitmaps are not where QEMU keeps them"
    for node in holders:
        cmd = {"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": cp}}
        virsh("qemu-monitor-command", live.name, json.dumps(cmd))
    r = live.backup("--json")
    assert r.returncode == 0, r.stderr
    assert "incrementally from" in r.stderr and "reading every disk in full" in r.stderr
    doc = json.loads(r.stdout)
    assert {d["mode"] for d in doc["disks"]} == {"full", "copied"}
    assert live.checkpoints() == [doc["checkpoint"]], r.stderr  # the broken one is gone too
    # and the chain heals: the next backup is incremental again
    r = live.backup("--json")
    assert r.returncode == 0, r.stderr
    assert {d["name"]: d["mode"] for d in json.loads(r.stdout)["disks"]}["vda"] == "incremental"
    v = lr("verify", "--repo", str(live.repo))
    assert v.returncode == 0, v.stdout + v.stderr


def test_second_backup_at_once_is_refused(live: LiveDomain) -> None:
    first = subprocess.Popen([sys.executable, "-m", "liverestore", "backup", "--repo", str(live.repo), "--libvirt",
                              "--domain", live.name, "--full"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    live.wait_for_job_socket(first)
    second = live.backup()
    _, err = first.communicate(timeout=300)
    assert second.returncode == 1 and f"a backup of domain {live.name} is already running" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err


def test_killed_backup_commits_nothing_and_the_next_one_works(live: LiveDomain) -> None:
    points = live.point_ids()
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "backup", "--repo", str(live.repo), "--libvirt",
                             "--domain", live.name, "--full"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    live.wait_for_job_socket(proc)
    time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert live.point_ids() == points, "a killed backup must not leave a restore point"
    assert live.has_backup_job()  # killed mid-job: its libvirt job outlived it

    r = live.backup("--json")
    assert r.returncode == 0, r.stderr
    assert "killed liverestore backup left behind" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "full"  # the raw disk makes any point "full"; the qcow2 disks are not
    assert {d["name"]: d["mode"] for d in doc["disks"]} == {"vda": "incremental", "sda": "incremental",
                                                            "sdb": "full", "hdc": "copied"}  # fmt: skip
    assert live.point_ids() == [*points, doc["point_id"]]
    assert live.checkpoints() == [doc["checkpoint"]] and not live.has_backup_job(), r.stderr
    v = lr("verify", "--repo", str(live.repo))
    assert v.returncode == 0, v.stdout + v.stderr


def test_domain_stopping_mid_backup_commits_nothing(live: LiveDomain) -> None:
    points = live.point_ids()
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "backup", "--repo", str(live.repo), "--libvirt",
                             "--domain", live.name, "--full"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    live.wait_for_job_socket(proc)
    virsh("destroy", live.name)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "stopped during the backup; no restore point was committed" in err, err
    assert "Traceback" not in err
    assert live.point_ids() == points

    # it comes back; the next backup works (full where the bitmaps did not survive the crash)
    live.log.unlink()
    virsh("start", live.name)
    wait_for_log(live.log, "HEARTBEAT 1", 300)
    r = live.backup("--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert live.point_ids() == [*points, doc["point_id"]]
    assert live.checkpoints() == [doc["checkpoint"]] and not live.has_backup_job()
