"""Every refusal of a restore: one line on stderr, a non-zero exit, nothing defined or started,
no disk written. And a running domain is not backed up behind libvirt's back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment
from liverestore.hypervisor.qemu import QemuVM
from liverestore.hypervisor.vmspec import DOMAIN_CONFIG_NAME, default_spec
from liverestore.repository import Repository
from liverestore.testvm.domain import make_domain_xml
from tests.helpers import MiB, make_disk
from tests.libvirtfixtures import domain_state, unique_name, virsh


def _point_with_definition(vmdir: Path, xml: str, name: str) -> Path:
    disk = vmdir / "vda.raw"
    make_disk(disk, 8 * MiB)
    repo = Repository.init(vmdir / "repo", 64 * 1024)
    run_backup(repo, name, [disk], [], disk_names=["vda"], extra_configs={DOMAIN_CONFIG_NAME: xml.encode()})
    repo.close()
    return vmdir / "repo"


def _define(vmdir: Path, xml: str) -> None:
    path = vmdir / f"def-{uuid.uuid4().hex[:6]}.xml"
    path.write_text(xml)
    virsh("define", str(path))


CASES = ["name-exists", "uuid-exists", "dest-exists", "unknown-network", "machine-type", "map-unknown",
         "qemu-machine-type", "bad-map"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_restore_refuses_before_starting_anything(
    case: str, vmdir: Path, lrnet: str, domains: list[str]
) -> None:
    name = unique_name("ref")
    domains += [name, f"{name}-other"]
    the_uuid = str(uuid.uuid4())
    network = "nosuchnet" if case == "unknown-network" else lrnet
    xml = make_domain_xml(name, vmdir / "gone.raw", network=network).replace(
        f"<name>{name}</name>", f"<name>{name}</name><uuid>{the_uuid}</uuid>")  # fmt: skip
    if case in ("machine-type", "qemu-machine-type"):
        xml = xml.replace("machine='pc'", "machine='pc-q35-99.9'")
    repo = _point_with_definition(vmdir, xml, name)
    dest = vmdir / "primary"
    extra: list[str] = []
    expect = {
        "name-exists": f"a domain named '{name}' already exists",
        "uuid-exists": f"already has UUID {the_uuid}",
        "dest-exists": "already exists; refusing to overwrite a disk",
        "unknown-network": "network 'nosuchnet' of",
        "machine-type": "this host cannot run qemu x86_64 guests of machine type pc-q35-99.9",
        "map-unknown": "--network-map names 'elsewhere', which no NIC",
        "qemu-machine-type": "this host's QEMU has no machine type 'pc-q35-99.9'",
        "bad-map": "expected OLD=NEW",
    }[case]
    if case == "name-exists":
        _define(vmdir, xml.replace(the_uuid, str(uuid.uuid4())))
    elif case == "uuid-exists":
        _define(vmdir, xml.replace(f"<name>{name}</name>", f"<name>{name}-other</name>"))
    elif case == "dest-exists":
        dest.mkdir()
        (dest / f"{name}-vda.raw").write_bytes(b"precious")
    elif case == "map-unknown":
        extra = ["--network-map", "elsewhere=lrtest"]
    elif case == "bad-map":
        extra = ["--network-map", "lrtest"]
    elif case == "qemu-machine-type":
        extra = ["--hypervisor", "qemu"]
    r = subprocess.run([sys.executable, "-m", "liverestore", "restore", "--repo", str(repo), "--vm", name,
                        "--dest", str(dest), "--cache-dir", str(vmdir / "cache"), "--boot-marker", "BOOT-OK",
                        *extra], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liverestore: error: "), r.stderr
    assert expect in lines[0], lines[0]
    # nothing started, nothing defined, nothing written
    assert domain_state(name) == ("shut off" if case == "name-exists" else "absent")
    if case == "dest-exists":
        assert (dest / f"{name}-vda.raw").read_bytes() == b"precious"
    else:
        assert not dest.exists() or not any(dest.iterdir())
    ps = subprocess.run(["pgrep", "-f", str(dest)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_running_domain_is_backed_up_live_and_bad_input_is_one_line(vmdir: Path, domains: list[str]) -> None:
    name = unique_name("run")
    domains.append(name)
    data = make_disk(vmdir / "vda.raw", 8 * MiB)
    _define(vmdir, make_domain_xml(name, vmdir / "vda.raw", memory_mib=64, vcpus=1))
    virsh("start", name)
    repo = vmdir / "repo"
    Repository.init(repo).close()

    def backup(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "liverestore", "backup", "--repo", str(repo), *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    for args, why in ((["--format", "raw"], "give no --config or --format"),
                      (["--config", str(vmdir / "domain.xml")], "give no --config or --format")):  # fmt: skip
        r = backup("--libvirt", "--domain", name, *args)
        assert r.returncode == 1 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = backup("--vm", "x", "--quiesce", str(vmdir / "vda.raw"))
    assert r.returncode == 1 and "--quiesce needs a running libvirt domain" in r.stderr
    # the running domain is read live, twice; its raw disk cannot carry a bitmap and is read whole
    for k in range(2):
        r = backup("--libvirt", "--domain", name, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["disks"][0]["mode"] == "full" and doc["bytes_read"] > 0
        assert ("vda is a raw disk and cannot carry a dirty bitmap" in r.stderr) == (k == 1), r.stderr
    assert domain_state(name) == "running"
    opened = Repository.open(repo)
    try:
        manifest = opened.load_manifest(opened.get_point(name).record.disks[0])
        assert b"".join(opened.chunks.get(c, manifest.block_length(i)) if c else bytes(manifest.block_length(i))
                        for i, c in enumerate(manifest.blocks)) == data  # fmt: skip
    finally:
        opened.close()
    r = backup("--libvirt", "--domain", "no-such-domain-x")
    assert r.returncode == 1 and "no domain 'no-such-domain-x'" in r.stderr


def test_qemu_refusing_an_option_is_named_in_the_error(tmp_path: Path) -> None:
    """QEMU opens its QMP socket before it checks ``-accel``, then exits: the error is QEMU's own
    first line, not a reset QMP connection, nor the last line of a message that wraps."""
    disk = tmp_path / "vda.raw"
    make_disk(disk, 8 * MiB)
    vm = QemuVM(tmp_path / "vm", accel="nosuchaccel")
    with pytest.raises(LiverestoreError) as e:
        asyncio.run(vm.launch(default_spec("refused", ["vda"]),
                              [DiskAttachment(name="vda", size=disk.stat().st_size, local_path=disk)]))  # fmt: skip
    assert str(e.value).startswith("QEMU failed to start: qemu-system-x86_64: -accel nosuchaccel"), str(e.value)
    assert not vm.running
