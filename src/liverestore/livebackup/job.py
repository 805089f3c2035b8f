"""A libvirt backup job in pull mode, and the checkpoints that make the next one incremental.

``backupBegin`` freezes a point-in-time view of each disk (QEMU keeps the old contents of what the
guest overwrites in a scratch file) and exports it over NBD on a unix socket; the checkpoint
created in the same step starts a dirty bitmap per qcow2 disk. Ending the job drops the view;
the checkpoint stays for the next backup.

One backup per domain at a time: a lock file per domain UUID says who holds the job. A job left
by a killed liverestore (its lock is free, its socket under our job directory) is ended by the
next backup; a job someone else started is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.libvirt_driver import libvirt_message, libvirt_module

JOB_BASE = Path("/var/tmp/liverestore-backup")  # socket paths must stay short (108 bytes)


def run_dir() -> Path:
    """Where per-domain backup locks live: host-local, like the domains they guard."""
    env = os.environ.get("LIVERESTORE_RUN_DIR")
    if env:
        return Path(env)
    return Path("/run/liverestore") if os.geteuid() == 0 else Path(f"/tmp/liverestore-{os.geteuid()}")


@dataclass(frozen=True)
class LiveDisk:
    """A disk of the running domain as libvirt runs it."""

    target: str
    fmt: str  # the driver type: qcow2 can carry a dirty bitmap, raw cannot
    source: str


@dataclass
class DomainLock:
    """An flock on ``backup-<uuid>.lock``; its JSON body names the holder and its job directory."""

    path: Path
    fd: int = -1
    previous: dict[str, Any] = field(default_factory=dict)

    def acquire(self, domain: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read().get("pid", "?")
            os.close(self.fd)
            self.fd = -1
            raise LiverestoreError(f"a backup of domain {domain} is already running (pid {holder}); "
                                   "wait for it to finish") from None  # fmt: skip
        self.previous = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            return dict(json.loads(os.pread(self.fd, 65536, 0) or b"{}"))
        except ValueError:
            return {}

    def record(self, **fields: Any) -> None:
        body = json.dumps({"pid": os.getpid(), **fields}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, body, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def running_disks(live_xml: str, device: str = "disk") -> list[LiveDisk]:
    """The domain's disks of kind ``device`` (``disk``, or ``cdrom``: read-only media, which the
    backup job leaves out and are read as files) that have a source."""
    root = ET.fromstring(live_xml)
    out = []
    for d in root.findall("devices/disk"):
        target, src, drv = d.find("target"), d.find("source"), d.find("driver")
        if d.get("device", "disk") != device or target is None or src is None:
            continue
        out.append(LiveDisk(target.get("dev", ""), drv.get("type", "raw") if drv is not None else "raw",
                            src.get("file") or src.get("dev") or src.get("name") or ""))  # fmt: skip
    return out


def qemu_owner(live_xml: str) -> tuple[int, int] | None:
    """The uid:gid QEMU runs as (libvirt's DAC label), so its NBD socket can be created for it."""
    label = ET.fromstring(live_xml).findtext("seclabel[@model='dac']/label") or ""
    try:
        uid, gid = (int(x.lstrip("+")) for x in label.split(":"))
    except ValueError:
        return None
    return uid, gid


def new_checkpoint_name(tag: str) -> str:
    return f"lr-{tag}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def backup_xml(socket_path: Path, jobdir: Path, disks: list[LiveDisk], incremental_disks: set[str],
               base_checkpoint: str | None) -> str:  # fmt: skip
    parts = ["<domainbackup mode='pull'>"]
    if base_checkpoint and incremental_disks:
        parts.append(f"<incremental>{base_checkpoint}</incremental>")
    parts.append(f"<server transport='unix' socket={quoteattr(str(socket_path))}/>")
    parts.append("<disks>")
    for d in disks:
        mode = "incremental" if d.target in incremental_disks else "full"
        scratch = quoteattr(str(jobdir / f"scratch-{d.target}.qcow2"))
        parts.append(f"<disk name={quoteattr(d.target)} backup='yes' type='file' backupmode='{mode}'>"
                     f"<scratch file={scratch}/></disk>")  # fmt: skip
    parts.append("</disks></domainbackup>")
    return "".join(parts)


def checkpoint_xml(name: str, disks: list[LiveDisk]) -> str:
    items = "".join(f"<disk name={quoteattr(d.target)} checkpoint='{'bitmap' if d.fmt == 'qcow2' else 'no'}'/>"
                    for d in disks)  # fmt: skip
    return f"<domaincheckpoint><name>{name}</name><disks>{items}</disks></domaincheckpoint>"


def checkpoint_facts(dom: Any, name: str) -> tuple[int, set[str]] | None:
    """(creation time, disks with a bitmap) of checkpoint ``name``, or None when it is gone."""
    lv = libvirt_module()
    try:
        cp = dom.checkpointLookupByName(name)
        root = ET.fromstring(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    except lv.libvirtError:
        return None
    created = int(root.findtext("creationTime") or 0)
    return created, {d.get("name", "") for d in root.findall("disks/disk") if d.get("checkpoint") == "bitmap"}


def active_job_socket(dom: Any) -> str | None:
    """The NBD socket of the domain's running backup job; '' for one without; None when idle."""
    lv = libvirt_module()
    try:
        xml = dom.backupGetXMLDesc(0)
    except lv.libvirtError:
        return None
    server = ET.fromstring(xml).find("server")
    return server.get("socket", "") if server is not None else ""


def end_job(dom: Any, jobdir: Path) -> None:
    """End our pull-mode job (its NBD export and scratch go away); quiet when none is running,
    and never touching a job whose socket is not in ``jobdir`` (somebody else's)."""
    lv = libvirt_module()
    with contextlib.suppress(lv.libvirtError):
        sock = active_job_socket(dom) if dom.isActive() else None
        if sock and sock.startswith(str(jobdir) + "/"):
            dom.abortJob()


def clear_stale_job(dom: Any, domain: str, lock: DomainLock, warn: Any) -> None:
    """With the lock held: end a job a killed liverestore left behind, refuse anybody else's."""
    sock = active_job_socket(dom)
    prev_dir = lock.previous.get("jobdir")
    if sock is not None:
        if not (prev_dir and sock.startswith(str(prev_dir) + "/")):
            raise LiverestoreError(f"domain {domain} has a backup job liverestore did not start "
                                   f"(NBD socket {sock or 'none'}); end it first: virsh domjobabort {domain}")  # fmt: skip
        warn(f"ending the backup job a killed liverestore backup left behind (pid {lock.previous.get('pid', '?')})")
        try:
            dom.abortJob()
        except libvirt_module().libvirtError as e:
            raise LiverestoreError(f"cannot end the stale backup job of {domain}: {libvirt_message(e)}") from None
    if prev_dir and Path(prev_dir).parent == JOB_BASE:
        shutil.rmtree(prev_dir, ignore_errors=True)


def make_jobdir(uuid: str, owner: tuple[int, int] | None) -> Path:
    """A private directory for the NBD socket and scratch files, owned by QEMU's user."""
    JOB_BASE.mkdir(mode=0o755, exist_ok=True)
    jobdir = JOB_BASE / f"{uuid[:8]}-{os.getpid()}"
    shutil.rmtree(jobdir, ignore_errors=True)
    jobdir.mkdir(mode=0o700)
    if owner is not None:
        os.chown(jobdir, *owner)
    return jobdir


def delete_checkpoint(dom: Any, name: str) -> str | None:
    """Delete a checkpoint; the reason it could not be, or None."""
    lv = libvirt_module()
    try:
        cp = dom.checkpointLookupByName(name)
        try:
            cp.delete(0)
        except lv.libvirtError as e:
            # its bitmap is already gone (lost, or the disk was replaced): only the record is left
            if "not found" not in libvirt_message(e):
                raise
            cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        return libvirt_message(e)
    return None


def sweep_checkpoints(dom: Any, tag: str, keep: str) -> list[str]:
    """Delete this repository's older checkpoints (each costs the guest a bitmap update per
    write); those of other repositories and tools stay. Returns what could not be deleted."""
    lv = libvirt_module()
    failed = []
    try:
        names = [c.getName() for c in dom.listAllCheckpoints(0)]
    except lv.libvirtError:
        return []
    for name in names:
        if name.startswith(f"lr-{tag}-") and name != keep:
            why = delete_checkpoint(dom, name)
            if why:
                failed.append(f"{name}: {why}")
    return failed
