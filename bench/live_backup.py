"""Backing up a running VM: live incremental (dirty bitmap) vs live full vs re-reading the files.

The test guest runs under libvirt on qcow2 disks: its boot disk and a data disk (8 GiB, 4 GiB
allocated in 64 MiB extents of random data). After a first live backup the guest writes 64 MiB
spread over the data disk; then, side by side on the same state:
- live incremental: `backup --libvirt --domain` reading only the blocks dirtied since the checkpoint;
- live full: the same with `--full`, every allocated block through QEMU's NBD export;
- file re-read: the domain shut off, `backup` of its disk files as before live backups existed
  (every allocated block read and hashed again; known chunks are not written twice).
Target (issue "Back up running VMs"): incremental bytes read close to the bytes changed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, write_results, write_spread
from liverestore.backup import run_backup
from liverestore.hypervisor.console import type_into_pty
from liverestore.hypervisor.libvirt_driver import libvirt_module, open_connection
from liverestore.livebackup import LiveBackupSummary, run_live_backup
from liverestore.repository import Repository
from liverestore.testvm import build_test_vm
from liverestore.testvm.domain import make_domain_xml

EXTENT = 64 * MiB


def _data_disk(path: Path, virtual: int, allocated: int) -> None:
    """A qcow2 disk with ``allocated`` bytes of random data in extents spread over ``virtual``."""
    raw = path.with_suffix(".raw")
    write_spread(raw, virtual, allocated, EXTENT, lambda: os.urandom(EXTENT))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def _wait_log(log: Path, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker} did not appear on the guest's console")
        time.sleep(0.2)


def _live(repo: Repository, name: str, full: bool) -> LiveBackupSummary:
    return run_live_backup(repo, "qemu:///system", name, full=full)[1]


def run(quick: bool) -> dict[str, Any]:
    virtual, allocated, changed_mb = (2048 * MiB, 1024 * MiB, 16) if quick else (8192 * MiB, 4096 * MiB, 64)
    with tempfile.TemporaryDirectory(prefix="bench-live-", dir="/var/tmp") as tmpd:
        work = Path(tmpd)
        work.chmod(0o755)
        name = f"lrbench-{uuid.uuid4().hex[:6]}"
        image = build_test_vm(work / "boot.raw", size=512 * MiB, payload_mb=90, cold_mb=32)
        vda, vdb = work / "vda.qcow2", work / "vdb.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image.path), str(vda)], check=True)
        image.path.unlink()
        _data_disk(vdb, virtual, allocated)
        log = work / "serial.log"
        conn = open_connection()
        dom = conn.defineXML(make_domain_xml(name, vda, vdb, serial_log=log, data_bus="virtio"))
        try:
            dom.create()
            _wait_log(log, "HEARTBEAT 1", 300)
            repo = Repository.init(work / "repo", block_size=64 * 1024)
            first = _live(repo, name, full=False)
            pty = dom.XMLDesc(0).split("<source path='", 1)[1].split("'", 1)[0]
            type_into_pty(pty, f"scribble {changed_mb}")
            _wait_log(log, f"SCRIBBLE-OK {changed_mb}", 600)
            inc = _live(repo, name, full=False)
            full = _live(repo, name, full=True)
            dom.shutdown()
            deadline = time.monotonic() + 120
            while dom.isActive() and time.monotonic() < deadline:
                time.sleep(0.5)
            if dom.isActive():
                dom.destroy()
            t0 = time.monotonic()
            _, stats = run_backup(repo, name, [vda, vdb], [], disk_names=["vda", "vdb"])
            file_s = time.monotonic() - t0
            repo.close()
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt_module().VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            conn.close()
    rows = {
        "live incremental": (inc.seconds, inc.bytes_read),
        "live full": (full.seconds, full.bytes_read),
        "file re-read": (file_s, stats.bytes_read),
    }
    changed = changed_mb * MiB
    r = {
        "virtual_bytes": virtual + 512 * MiB, "allocated_data_disk": allocated, "changed_bytes": changed,
        "first_full_s": round(first.seconds, 2), "first_full_read": first.bytes_read,
        **{k.replace(" ", "_") + "_s": round(v[0], 2) for k, v in rows.items()},
        **{k.replace(" ", "_") + "_read": v[1] for k, v in rows.items()},
        "incremental_read_over_changed": round(inc.bytes_read / changed, 3),
        "full_over_incremental_time": round(full.seconds / inc.seconds, 1),
        "file_over_incremental_time": round(file_s / inc.seconds, 1),
        "incremental_mode": inc.mode, "incremental_base": inc.base_checkpoint,
    }  # fmt: skip
    print(f"live backup: incremental {inc.seconds:.2f} s / {inc.bytes_read / MiB:.1f} MiB read; full "
          f"{full.seconds:.2f} s / {full.bytes_read / MiB:.0f} MiB; file re-read {file_s:.2f} s / "
          f"{stats.bytes_read / MiB:.0f} MiB ({changed_mb} MiB changed)", flush=True)  # fmt: skip
    bar_chart("live_backup", f"Backup of a running VM after {changed_mb} MiB of writes", ["seconds", "GiB read"],
              {k: [v[0], v[1] / 2**30] for k, v in rows.items()}, "seconds / GiB", log=True)  # fmt: skip
    notes = (
        f"The test guest under libvirt (TCG) on qcow2 disks: a 512 MiB boot disk and a {virtual // 2**30} GiB data "
        f"disk with {allocated // 2**30} GiB of random data. After a first live backup "
        f"({first.seconds:.1f} s, {first.bytes_read / 2**30:.2f} GiB read) the guest wrote {changed_mb} MiB in "
        "1 MiB pieces spread over the data disk; then the three backups below ran one after the other on that "
        "state, into the same repository (64 KiB blocks). Bytes read: what was requested from QEMU's NBD export "
        "(live) or read from the files (file re-read). The incremental read includes the guest's own "
        "heartbeat and filesystem metadata writes on the boot disk."
    )
    write_results("live_backup", r, [[k, round(v[0], 2), round(v[1] / MiB, 1), round(v[1] / changed, 2)]
                                     for k, v in rows.items()],
                  ["backup", "seconds", "MiB read", "read / changed"], notes)  # fmt: skip
    return r
