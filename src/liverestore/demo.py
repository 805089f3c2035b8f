"""``liverestore demo``: a VM is backed up, lost, and instantly restored twice.

Where libvirt answers (``qemu:///system``, as root), the demo does what an operator would: it
defines a libvirt domain from the test VM (2 vCPUs, 768 MiB, a NIC), backs it up with its
definition, undefines it and deletes its disk, then instant-restores it — run 1 with no boot
profile (every boot read goes to the deliberately slow, emulated repository), run 2 with the
profile run 1 recorded — and leaves run 2's domain running from local disks, managed by libvirt.
Elsewhere it does the same with the plain QEMU driver and a bare-disk backup. Both runs relocate
live, pivot, and have the guest re-verify all of its files from the relocated disk.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from liverestore.backup import run_backup
from liverestore.cli_options import ACCELERATORS, NOT_NEGATIVE
from liverestore.commands_restore import render_report, run_cancellable
from liverestore.errors import LiverestoreError
from liverestore.progress import restore_display
from liverestore.repository import Repository
from liverestore.repository.manifest import check_block_size
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport
from liverestore.testvm import build_test_vm
from liverestore.testvm.domain import make_domain_xml

MiB = 1 << 20
DEMO_VM = "liverestore-demo"
DEMO_NETWORK = "liverestore-demo"


def echo(msg: str) -> None:
    click.echo(msg, err=True)


async def restore_and_check(repo: Repository, opts: RestoreOptions, live: bool, keep_running: bool) -> RestoreReport:
    with restore_display(live) as show:
        job = InstantRestore(repo, opts, show)
        stop = True
        try:
            report = await job.run()
            assert job.vm is not None
            mark = len(job.vm.serial_output())
            await job.vm.send_console("verify")  # the guest re-reads every file from the relocated disk
            await job.vm.wait_for_console("VERIFY-OK", 120, start=mark)
            stop = not keep_running
        finally:
            await job.close(stop_vm=stop)
    return report


def _libvirt_usable() -> bool:
    from liverestore.hypervisor.libvirt_driver import libvirt_reachable

    return os.geteuid() == 0 and libvirt_reachable()


def _forget_demo_domain() -> None:
    """A previous demo's domain goes: destroyed and undefined (it is the demo's own, by name)."""
    from liverestore.hypervisor.libvirt_driver import libvirt_module, open_connection

    lv = libvirt_module()
    conn = open_connection()
    try:
        try:
            dom = conn.lookupByName(DEMO_VM)
        except lv.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    finally:
        conn.close()


def _ensure_demo_network() -> None:
    """An isolated network (a bridge; no DHCP, so no dnsmasq needed) for the demo VM's NIC."""
    from liverestore.hypervisor.libvirt_driver import libvirt_module, open_connection

    lv = libvirt_module()
    conn = open_connection()
    try:
        try:
            net = conn.networkLookupByName(DEMO_NETWORK)
        except lv.libvirtError:
            net = conn.networkDefineXML(f"<network><name>{DEMO_NETWORK}</name><bridge name='lrdemo0' stp='off'/>"
                                        "</network>")  # fmt: skip
        if not net.isActive():
            net.create()
    finally:
        conn.close()


def _define_and_back_up(repo: Repository, image: Path) -> tuple[str, Any]:
    from liverestore.backup_libvirt import plan_domain_backup
    from liverestore.hypervisor.libvirt_driver import open_connection

    _ensure_demo_network()
    conn = open_connection()
    try:
        conn.defineXML(make_domain_xml(DEMO_VM, image, network=DEMO_NETWORK))
        plan = plan_domain_backup("qemu:///system", DEMO_VM)
        point, stats = run_backup(repo, plan.vm, plan.disk_paths, [], disk_names=plan.disk_names,
                                  extra_configs=plan.configs)  # fmt: skip
        conn.lookupByName(DEMO_VM).undefine()  # the disaster: the domain and its disk are gone
    finally:
        conn.close()
    image.unlink()
    return point.id, stats


def _show_domain() -> str:
    """What ``virsh dominfo`` / ``domblklist`` / ``domiflist`` would show, read through the API."""
    from xml.etree import ElementTree as ET

    from liverestore.hypervisor.libvirt_driver import open_connection

    conn = open_connection()
    try:
        dom = conn.lookupByName(DEMO_VM)
        _state, max_kib, _mem, vcpus, _cpu = dom.info()
        root = ET.fromstring(dom.XMLDesc(0))
        lines = [f"libvirt domain {DEMO_VM}: {'running' if dom.isActive() else 'not running'}, "
                 f"persistent {'yes' if dom.isPersistent() else 'no'}, {vcpus} vCPUs, {max_kib // 1024} MiB"]  # fmt: skip
        for d in root.iterfind("devices/disk"):
            src, tgt = d.find("source"), d.find("target")
            lines.append(f"  disk {tgt.get('dev') if tgt is not None else '?'}: "
                         f"{src.get('file') if src is not None else '-'}")  # fmt: skip
        for i in root.iterfind("devices/interface"):
            mac, src = i.find("mac"), i.find("source")
            lines.append(f"  nic {mac.get('address') if mac is not None else '?'} on "
                         f"{src.get('network') if src is not None else '?'}")  # fmt: skip
        return "\n".join(lines)
    finally:
        conn.close()


@click.command()
@click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Where the demo keeps its files."
)
@click.option("--repo-latency-ms", type=NOT_NEGATIVE, default=10.0, show_default=True,
              help="Emulated repository latency per fetch.")  # fmt: skip
@click.option("--repo-mbps", type=NOT_NEGATIVE, default=0.0, help="Emulated repository bandwidth (Mbit/s).")
@click.option("--block-size", default="64K", show_default=True, help="Repository block size.")
@click.option("--disk-size", default="1G", show_default=True, help="Virtual size of the test VM's disk.")
@click.option("--hypervisor", type=click.Choice(["auto", "libvirt", "qemu"]), default="auto", show_default=True,
              help="auto: libvirt where it answers (as root), else plain QEMU.")  # fmt: skip
@click.option("--accel", type=ACCELERATORS, default="tcg", show_default=True)
def demo(
    data_dir: Path | None,
    repo_latency_ms: float,
    repo_mbps: float,
    block_size: str,
    disk_size: str,
    hypervisor: str,
    accel: str,
) -> None:
    """Back up a VM, lose it, and instantly restore it twice (without, then with its boot profile)."""
    from liverestore.cli import default_data_dir, parse_size

    use_libvirt = hypervisor == "libvirt" or (hypervisor == "auto" and _libvirt_usable())
    if hypervisor == "libvirt" and not _libvirt_usable():
        raise LiverestoreError("libvirt is not reachable at qemu:///system as root (run ./setup.sh as root)")
    # libvirt's QEMU runs as libvirt-qemu: keep the demo's disks where it can reach them
    base = data_dir or (Path("/var/lib/liverestore/demo") if use_libvirt else default_data_dir() / "demo")
    bs, size = parse_size(block_size), parse_size(disk_size)
    try:  # before the test VM is built: a bad size should not cost its build first
        check_block_size(bs)
    except ValueError as e:
        raise LiverestoreError(str(e)) from None
    if use_libvirt:
        _forget_demo_domain()
    for stale in ("repo", "cache", "dest-1", "dest-2", "images"):
        shutil.rmtree(base / stale, ignore_errors=True)
    (base / "images").mkdir(parents=True, exist_ok=True)
    for p in [base, *base.parents] if use_libvirt else []:
        if p.exists() and not p.stat().st_mode & 0o001:
            p.chmod(p.stat().st_mode | 0o001)  # searchable, so libvirt's QEMU reaches the disks

    driver = ("libvirt (qemu:///system)" if use_libvirt else
              "plain QEMU" + (" (libvirt not reachable as root)" if hypervisor == "auto" else ""))  # fmt: skip
    echo(f"hypervisor: {driver}")
    t = time.monotonic()
    image = build_test_vm(base / "images" / f"{DEMO_VM}-vda.raw", size=size, payload_mb=90, cold_mb=100)
    echo(f"[1/5] built test VM {image.path} ({size // MiB} MiB virtual, {image.payload_files} files / "
         f"{image.payload_bytes / 1e6:.0f} MB checked at boot, 100 MB cold data) in {time.monotonic() - t:.1f} s")  # fmt: skip
    repo = Repository.init(base / "repo", bs)
    t = time.monotonic()
    if use_libvirt:
        point_id, stats = _define_and_back_up(repo, image.path)
        what = (f"defined libvirt domain {DEMO_VM} (2 vCPUs, 768 MiB, NIC on {DEMO_NETWORK}), backed it up with "
                f"its definition, then undefined it and deleted its disk")  # fmt: skip
    else:
        point, stats = run_backup(repo, DEMO_VM, [image.path], [], disk_names=["vda"])
        point_id, what = point.id, "backed up its disk"
    echo(f"[2/5] {what}: point {point_id}, {stats.bytes_read / MiB:.0f} MiB read, "
         f"{stats.bytes_new_stored / MiB:.0f} MiB stored in {time.monotonic() - t:.1f} s")  # fmt: skip

    def opts(run: int) -> RestoreOptions:
        return RestoreOptions(
            vm=DEMO_VM, dest=base / f"dest-{run}", cache_dir=base / "cache" / f"run-{run}",
            repo_latency_ms=repo_latency_ms, repo_mbps=repo_mbps, accel=accel,
            hypervisor="libvirt" if use_libvirt else "qemu",
        )  # fmt: skip

    reports: list[RestoreReport] = []
    for run, label in ((1, "no profile yet: every boot read goes to the repository"),
                       (2, "with the boot profile recorded by run 1")):  # fmt: skip
        echo(
            f"[{run + 2}/5] instant restore #{run} ({label}), repository latency {repo_latency_ms:g} ms/fetch"
        )
        report = run_cancellable(restore_and_check(repo, opts(run), live=True, keep_running=run == 2 and use_libvirt))
        echo(render_report(report))
        echo("  guest re-verified all files from the relocated disk: VERIFY-OK")
        reports.append(report)
        if run == 1 and use_libvirt:
            _forget_demo_domain()  # run 2 restores the same domain again
    click.echo(comparison(reports))
    if use_libvirt:
        echo(f"[5/5] after this command, libvirt manages the restored VM (virsh dominfo {DEMO_VM}):")
        echo(_show_domain())
        echo(f"  stop it with: virsh shutdown {DEMO_VM}; remove it with: virsh undefine {DEMO_VM}")
    else:
        echo("[5/5] the VM was stopped (plain QEMU keeps no definition to leave behind)")


def comparison(reports: list[RestoreReport]) -> str:
    a, b = reports
    rows: list[tuple[str, Any, Any]] = [
        ("time to boot (s)", a.time_to_boot_s, b.time_to_boot_s),
        ("  of which profile prefetch (s)", a.phases.get("prefetch", 0), b.phases.get("prefetch", 0)),
        ("boot reads served from cache", f"{a.boot_reads_from_cache}/{a.boot_reads}",
         f"{b.boot_reads_from_cache}/{b.boot_reads}"),
        ("read-cache at start", a.cache_start, b.cache_start),
        ("relocation (s)", a.phases.get("relocate", 0), b.phases.get("relocate", 0)),
        ("launch to pivot (s)", round(sum(a.phases.get(p, 0) for p in ("launch", "run", "relocate", "pivot")), 2),
         round(sum(b.phases.get(p, 0) for p in ("launch", "run", "relocate", "pivot")), 2)),
        ("repository fetches (blocks)", a.blocks_fetched, b.blocks_fetched),
        ("guest read latency p50 / p99 (ms)", f"{a.read_latency_p50_ms:g} / {a.read_latency_p99_ms:g}",
         f"{b.read_latency_p50_ms:g} / {b.read_latency_p99_ms:g}"),
        ("mirror read latency p99 (ms)", a.bulk_read_latency_p99_ms, b.bulk_read_latency_p99_ms),
    ]  # fmt: skip
    if b.time_to_boot_s <= 0:
        raise LiverestoreError("run 2 reported no boot time")
    out = ["", f"{'':34}{'run 1 (no profile)':>20}{'run 2 (profile)':>18}"]
    out += [f"{name:34}{x!s:>20}{y!s:>18}" for name, x, y in rows]
    out.append(f"\ntime-to-boot speed-up from the profile: {a.time_to_boot_s / b.time_to_boot_s:.2f}x")
    return "\n".join(out)
