"""The real VM comes back: a libvirt domain is backed up with its definition, undefined, its disks
deleted, and instantly restored — as a managed libvirt domain, or by the plain QEMU driver — with
its vCPUs, memory, disk buses and NIC. Everything here runs against a real libvirtd and boots the
test guest for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from liverestore.hypervisor.qemu import QemuVM
from liverestore.hypervisor.vmspec import parse_domain
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, state_path
from liverestore.testvm.domain import make_domain_xml
from tests.helpers import MiB, make_disk
from tests.libvirtfixtures import domain_state, read_console_until, unique_name, virsh
from tests.vmfixtures import VmBackup, fill_destination_mid_relocation

MAC = "52:54:00:4c:52:2a"
MEMORY_KIB = 768 * 1024


def lr(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


@dataclass
class DomainBackup:
    repo: Path
    name: str
    data_disk: Path  # a copy of the original SATA disk, to compare the restored one with
    base: Path


@pytest.fixture(scope="module")
def domain_backup(vm_backup: VmBackup, lrnet: str) -> Iterator[DomainBackup]:
    """A shut-off domain (2 vCPUs, 768 MiB, virtio vda + SATA sda, a NIC) backed up with
    ``backup --libvirt``, then undefined and its disk files deleted, as after a disaster."""
    base = Path("/var/tmp/liverestore-tests") / unique_name("mod")
    base.mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    name = unique_name("web")
    vda, sda = base / "orig-vda.raw", base / "orig-sda.raw"
    subprocess.run(["cp", "--sparse=always", str(vm_backup.image.path), str(vda)], check=True)
    subprocess.run(["cp", "--sparse=always", str(vm_backup.data_disk), str(sda)], check=True)
    (base / "domain.xml").write_text(make_domain_xml(name, vda, sda, network=lrnet, mac=MAC))
    virsh("define", str(base / "domain.xml"))
    try:
        assert lr("init", str(base / "repo"), "--block-size", "64K").returncode == 0
        r = lr("backup", "--repo", str(base / "repo"), "--libvirt", "--domain", name)
        assert r.returncode == 0, r.stderr
        assert "domain definition" in r.stderr
    finally:
        virsh("undefine", name)
    vda.unlink()
    sda.unlink()
    yield DomainBackup(base / "repo", name, vm_backup.data_disk, base)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_backup_stores_definition_and_disks_by_target(domain_backup: DomainBackup) -> None:
    doc = json.loads(lr("list", "--repo", str(domain_backup.repo), "--json").stdout)
    [point] = doc["vms"][domain_backup.name]
    assert [d["name"] for d in point["disks"]] == ["vda", "sda"]
    assert point["configs"] == ["libvirt-domain.xml"]


def test_libvirt_instant_restore_is_the_users_managed_domain(
    domain_backup: DomainBackup, vmdir: Path, domains: list[str]
) -> None:
    name = domain_backup.name
    domains.append(name)
    dest = vmdir / "primary"
    r = lr("restore", "--repo", str(domain_backup.repo), "--vm", name, "--dest", str(dest),
           "--cache-dir", str(vmdir / "cache"), "--boot-marker", "BOOT-OK", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hypervisor"] == "libvirt" and doc["relocated"] and doc["boot_detected_by"] == "console marker"
    assert f"libvirt domain {name}" in doc["vm_identity"]
    serial = Path(doc["serial_log"]).read_text()
    assert "BOOT-OK" in serial
    assert "GUEST-INFO cpus=2 " in serial and MAC in serial  # the guest saw its 2 vCPUs and its NIC
    mem_kb = int(serial.split("mem_kb=")[1].split()[0])
    assert 700_000 < mem_kb <= MEMORY_KIB, mem_kb

    # our process has exited: the domain is an ordinary, persistent libvirt domain on local disks
    info = virsh("dominfo", name)
    assert "running" in info and "Persistent:     yes" in info
    assert "CPU(s):         2" in info and f"Max memory:     {MEMORY_KIB} KiB" in info
    blk = dict(line.split() for line in virsh("domblklist", name).strip().splitlines())
    assert blk == {"vda": str(dest / f"{name}-vda.raw"), "sda": str(dest / f"{name}-sda.raw")}
    assert MAC in virsh("domiflist", name)
    inactive = virsh("dumpxml", "--inactive", name)
    assert f"{name}-vda.raw" in inactive and "protocol='nbd'" not in inactive and "backingStore type='network'" \
        not in inactive and "liverestore.dev/xmlns" not in inactive and ".overlay.qcow2" not in inactive

    # the untouched SATA disk came back bit for bit; nothing of the restore is left behind
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(domain_backup.data_disk),
                          str(dest / f"{name}-sda.raw")], capture_output=True, text=True)  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert not list(dest.rglob("*.overlay.qcow2")) and not list(dest.glob("*.partial"))
    assert not list((vmdir / "cache").glob(f"{name}-*")), "the read-cache is removed after relocation"
    assert json.loads(state_path(dest, name).read_text())["state"] == "complete"

    # power-cycled by libvirt, it boots from the local disks with no agent anywhere, and passes
    # its file check again; an ACPI shutdown is obeyed
    virsh("destroy", name)
    virsh("start", name)
    console = read_console_until(name, "BOOT-OK", 300)
    assert "BOOT-FAIL" not in console
    virsh("shutdown", name)
    deadline = time.monotonic() + 60
    while domain_state(name) != "shut off":
        assert time.monotonic() < deadline, "the guest ignored the ACPI shutdown"
        time.sleep(0.5)


def test_plain_qemu_driver_runs_the_stored_definition(domain_backup: DomainBackup, vmdir: Path) -> None:
    repo = Repository.open(domain_backup.repo)
    opts = RestoreOptions(vm=domain_backup.name, dest=vmdir / "q", cache_dir=vmdir / "qc", hypervisor="qemu",
                          dest_format="qcow2")  # fmt: skip

    async def go() -> tuple[str, list[str], bool]:
        job = InstantRestore(repo, opts)
        try:
            report = await job.run()
            assert report.hypervisor == "qemu" and report.relocated
            assert isinstance(job.vm, QemuVM)
            blocks = await job.vm.execute("query-named-block-nodes", {"flat": True})
            files = [n["image"]["filename"] for n in blocks if n["drv"] == "file"]
            obeyed = await job.vm.shutdown(60)
            return job.vm.serial_output(), files, obeyed
        finally:
            await job.close()

    serial, files, obeyed = asyncio.run(go())
    assert "GUEST-INFO cpus=2 " in serial and MAC in serial
    assert 700_000 < int(serial.split("mem_kb=")[1].split()[0]) <= MEMORY_KIB
    name = domain_backup.name
    # QEMU's own nodes name the final files (renamed and reopened), and no overlay is left
    assert sorted(files) == [str(vmdir / "q" / f"{name}-sda.qcow2"), str(vmdir / "q" / f"{name}-vda.qcow2")], files
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(domain_backup.data_disk),
                          str(vmdir / "q" / f"{name}-sda.qcow2")], capture_output=True, text=True)  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert not list((vmdir / "q").rglob("*.overlay.qcow2")) and not list((vmdir / "q").glob("*.partial"))
    assert obeyed and "ACPI-POWERDOWN" in serial  # the guest unmounted and powered off on request


def test_ctrl_c_under_libvirt_leaves_no_domain_and_no_disk(
    domain_backup: DomainBackup, vmdir: Path, domains: list[str]
) -> None:
    name = domain_backup.name
    domains.append(name)
    dest = vmdir / "primary"
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverestore", "restore", "--repo", str(domain_backup.repo), "--vm", name,
         "--dest", str(dest), "--cache-dir", str(vmdir / "c"), "--no-profile", "--repo-latency-ms", "20",
         "--boot-marker", "BOOT-OK"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while domain_state(name) != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # mid-boot, reading from the agent
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert domain_state(name) == "absent", "an aborted restore must leave no domain, running or defined"
    assert not list(dest.glob("*.raw")) and not list(dest.glob("*.partial"))
    assert json.loads(state_path(dest, name).read_text())["state"] == "aborted"


def test_resume_under_libvirt_adopts_only_its_own_domain(
    domain_backup: DomainBackup, vmdir: Path, domains: list[str]
) -> None:
    """kill -9 mid-relocation: the domain runs on. A resume that cannot adopt it (a marker that
    does not match) leaves it running; a resume from another directory (the first run used a
    relative --dest) finishes the restore and defines it."""
    name = domain_backup.name
    domains.append(name)
    (vmdir / "work").mkdir()
    base = ["restore", "--repo", str(domain_backup.repo), "--vm", name, "--boot-marker", "BOOT-OK", "--format",
            "qcow2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", *base, "--dest", "primary", "--cache-dir",
                             str(vmdir / "c"), "--no-profile", "--repo-mbps", "60"], cwd=vmdir / "work",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    dest = vmdir / "work" / "primary"
    state = state_path(dest, name)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["state"] == "relocating":
            break
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = json.loads(state.read_text())
    assert st["state"] == "relocating", "the restore finished before it could be interrupted"
    assert domain_state(name) == "running"
    assert "Persistent:     no" in virsh("dominfo", name)

    # a state whose marker does not match the domain: refused, and the domain is left running
    good = state.read_text()
    forged = json.loads(good)
    forged["driver"]["restore_id"] = "someone-else"
    state.write_text(json.dumps(forged))
    r = lr(*base, "--dest", str(dest), "--resume")
    assert r.returncode == 1 and "not the one this restore started" in r.stderr and "Traceback" not in r.stderr
    assert domain_state(name) == "running", "a resume must never kill a VM it failed to adopt"
    state.write_text(good)

    r = lr(*base, "--dest", str(dest), "--resume", "--json", cwd=Path("/"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["relocated"] and doc["mode"] == "instant-resumed"

    async def reverify() -> None:  # the same guest, still alive, re-reads every file from local disks
        from liverestore.hypervisor.libvirt_driver import LibvirtVM

        vm = LibvirtVM.adopt(st["driver"], parse_domain(st["spec_xml"]), [])
        try:
            mark = len(vm.serial_output())
            await vm.send_console("verify")
            await vm.wait_for_console("VERIFY-OK", 120, start=mark)
        finally:
            await vm.close()

    asyncio.run(reverify())
    assert json.loads(state.read_text())["state"] == "complete"
    info = virsh("dominfo", name)
    assert "running" in info and "Persistent:     yes" in info
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(domain_backup.data_disk),
                          str(dest / f"{name}-sda.qcow2")], capture_output=True, text=True)  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert f"{name}-vda.qcow2" in virsh("domblklist", name) and "type='qcow2'" in virsh("dumpxml", "--inactive", name)


def test_uefi_nvram_and_cdrom_are_backed_up_and_restored(vmdir: Path, domains: list[str]) -> None:
    """A UEFI domain (OVMF) with a SATA CD-ROM: the backup keeps its NVRAM and the ISO; the
    restore copies both to primary storage before launch and the final definition uses them."""
    name = unique_name("efi")
    domains.append(name)
    vda, iso, nvram = vmdir / "vda.raw", vmdir / "install.iso", vmdir / "vars.fd"
    make_disk(vda, 16 * MiB)
    iso.write_bytes(os.urandom(3 * MiB))
    nvram.write_bytes(Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes())
    (vmdir / "efi.xml").write_text(f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>{nvram}</nvram></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{vda}'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{iso}'/>
      <target dev='sdc' bus='sata'/><readonly/></disk>
    <serial type='pty'><target port='0'/></serial>
  </devices></domain>""")
    virsh("define", str(vmdir / "efi.xml"))
    originals = {p: p.read_bytes() for p in (vda, iso, nvram)}
    assert lr("init", str(vmdir / "repo"), "--block-size", "64K").returncode == 0
    r = lr("backup", "--repo", str(vmdir / "repo"), "--libvirt", "--domain", name)
    assert r.returncode == 0, r.stderr
    virsh("undefine", name, "--nvram")
    for path in originals:
        path.unlink(missing_ok=True)

    dest = vmdir / "primary"
    r = lr("restore", "--repo", str(vmdir / "repo"), "--vm", name, "--dest", str(dest), "--cache-dir",
           str(vmdir / "cache"), "--boot-window", "15", "--boot-quiet", "3", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["destinations"] == {"vda": str(dest / f"{name}-vda.raw"), "sdc": str(dest / f"{name}-sdc.iso")}
    assert Path(doc["destinations"]["sdc"]).read_bytes() == originals[iso]
    assert Path(doc["destinations"]["vda"]).read_bytes() == originals[vda]
    restored_nvram = dest / f"{name}_VARS.fd"
    assert restored_nvram.stat().st_size == len(originals[nvram])
    inactive = virsh("dumpxml", "--inactive", name)
    assert f"<nvram>{restored_nvram}</nvram>" in inactive and f"{name}-sdc.iso" in inactive
    assert "running" in virsh("domstate", name)


def test_restore_under_a_new_name_runs_beside_the_original_identity(
    domain_backup: DomainBackup, vmdir: Path, domains: list[str]
) -> None:
    """``--name`` gives the copy a new UUID and new MACs; ``--no-network`` drops the NICs."""
    copy = f"{domain_backup.name}-copy"
    domains.append(copy)
    r = lr("restore", "--repo", str(domain_backup.repo), "--vm", domain_backup.name, "--name", copy,
           "--dest", str(vmdir / "p"), "--cache-dir", str(vmdir / "c"), "--boot-marker", "BOOT-OK", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    first_uuid = virsh("domuuid", copy).strip()
    assert MAC not in virsh("domiflist", copy) and virsh("domiflist", copy).strip()  # a NIC, a new MAC
    assert sorted(json.loads(r.stdout)["destinations"]) == ["sda", "vda"]
    virsh("destroy", copy)
    virsh("undefine", copy)
    for f in (vmdir / "p").glob(f"{copy}-*"):
        f.unlink()
    (vmdir / "p" / f"{copy}.restore.json").unlink()
    r = lr("restore", "--repo", str(domain_backup.repo), "--vm", domain_backup.name, "--name", copy,
           "--no-network", "--dest", str(vmdir / "p"), "--cache-dir", str(vmdir / "c"), "--boot-marker",
           "BOOT-OK")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert virsh("domiflist", copy).strip() == "" and virsh("domuuid", copy).strip() != first_uuid


def test_destination_filling_up_mid_relocation_keeps_the_domain_running(
    domain_backup: DomainBackup, domains: list[str]
) -> None:
    """As under plain QEMU (test_e2e_restore): a block copy that hits a full destination fails,
    the domain runs on from the backup (resumed from its I/O-error pause), and the copy starts
    over once there is room, then pivots; the domain is left defined on its local disks (the
    helper stops it at the end)."""
    name = unique_name("enospc")
    domains.append(name)
    base = domain_backup.base / name
    base.mkdir(mode=0o755)
    fill_destination_mid_relocation(Repository.open(domain_backup.repo), domain_backup.name, name, base, "libvirt")
    xml = virsh("dumpxml", name)
    assert domain_state(name) == "shut off" and "nbd" not in xml and str(base / "small" / "primary") in xml


def test_a_copy_node_qemu_left_behind_moves_the_guest_to_a_fresh_qemu_and_relocation_completes(
    domain_backup: DomainBackup, domains: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU 7.2 (Debian 12) sometimes leaves a failed block copy's filter node on the disk's top
    node (seen after a copy met a full destination); every later copy of that disk is then refused
    ("Need a root block node") and the restore retried forever. Here such a parent is put on vda's
    top node before the first copy; the guest is moved to a fresh QEMU process and the relocation
    completes, with the guest's own writes kept and every payload file right."""
    from liverestore.hypervisor.libvirt_driver import LibvirtVM

    name = unique_name("stale")
    domains.append(name)
    base = domain_backup.base / name
    base.mkdir(mode=0o755)
    arm = LibvirtVM._arm_nbd_reconnect
    pids: list[int | None] = []

    async def arm_then_leave_a_stale_parent(vm: LibvirtVM) -> None:
        await arm(vm)
        pids.append(vm.pid)
        if len(pids) == 1:  # at launch: what a failed copy leaves, a node above vda's top one
            top = next(b["inserted"]["node-name"] for b in await vm._qmp("query-block")
                       if "virtio-disk0" in b.get("qdev", ""))  # fmt: skip
            await vm._qmp("blockdev-add", {"driver": "raw", "node-name": "stale-vda", "file": top, "read-only": True})

    monkeypatch.setattr(LibvirtVM, "_arm_nbd_reconnect", arm_then_leave_a_stale_parent)
    opts = RestoreOptions(vm=domain_backup.name, dest=base / "primary", cache_dir=base / "cache", use_profile=False,
                          record_profile=False, boot_marker="BOOT-OK", hypervisor="libvirt", name=name)  # fmt: skip

    async def go() -> str:
        job = InstantRestore(Repository.open(domain_backup.repo), opts)
        try:
            report = await asyncio.wait_for(job.run(), 300)
            vm = job.vm
            assert vm is not None and vm.running and report.relocated and not report.relocation_failures
            mark = len(vm.serial_output())
            await vm.send_console("verify")  # every payload file re-read, from the relocated disk
            await vm.wait_for_console("VERIFY-OK", 120, start=mark)
            return vm.serial_output()
        finally:
            await job.close()

    serial = asyncio.run(go())
    assert len(pids) == 2 and pids[0] != pids[1]  # a new QEMU process, armed again
    assert "moving the guest to a fresh QEMU process" in caplog.text and f"{name} runs again" in caplog.text
    assert "VERIFY-FAIL" not in serial
    xml = virsh("dumpxml", name)
    assert domain_state(name) == "shut off" and "nbd" not in xml and str(base / "primary") in xml  # close() stops it
    assert not list(Path("/var/lib/libvirt/qemu/save").glob(f"liverestore-{name}-*"))  # the saved state removed
