"""Live backups of running libvirt domains: crash-consistent (or quiesced), forever incremental.

Each backup is a libvirt pull-mode backup job: QEMU exports a frozen view of every disk over NBD
and a new checkpoint starts tracking the guest's writes. The next backup asks for the blocks
dirtied since the checkpoint the previous point recorded and takes every other block from that
point's manifest, so every point is complete on its own and restores like any other.

Whenever the previous point cannot vouch for a disk (no checkpoint recorded, checkpoint gone or
not the recorded one, a raw disk with no bitmap, a disk that changed size, a bitmap QEMU cannot
use) that disk is read in full with a one-line warning: a slower backup, never a wrong point.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import blake3

from liverestore.backup import BackupStats, ProgressFn, backup_disk, commit_backup, store_disk
from liverestore.backup_libvirt import find_domain
from liverestore.errors import LiverestoreError
from liverestore.hypervisor.libvirt_driver import libvirt_message, libvirt_module, open_connection
from liverestore.hypervisor.vmspec import DOMAIN_CONFIG_NAME, NVRAM_CONFIG_NAME, parse_domain
from liverestore.livebackup import job as lj
from liverestore.livebackup.extents import dirty_context, map_blocks, read_blocks
from liverestore.nbdclient import NbdClientError, NbdReader
from liverestore.repository import DiskManifest, Repository, RestorePoint
from liverestore.repository.catalog import DiskRecord
from liverestore.repository.leases import BACKUP, Lease

BACKUP_INFO_NAME = "liverestore-backup.json"  # in every live point: how it was made, its checkpoint

WarnFn = Callable[[str], None]


@dataclass
class DiskSummary:
    name: str
    mode: str  # full | incremental | copied (a CD-ROM image, read as a file)
    virtual_size: int
    bytes_read: int = 0
    why_full: str = ""


@dataclass
class LiveBackupSummary:
    point_id: str
    vm: str
    mode: str  # incremental when every disk was; full otherwise
    checkpoint: str  # the checkpoint this point made: the next backup's base
    base_checkpoint: str | None  # the one it read changes since, if any
    quiesced: bool
    bytes_read: int
    bytes_virtual: int
    bytes_new: int
    seconds: float
    disks: list[DiskSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_running(uri: str, domain: str) -> bool:
    lv = libvirt_module()
    conn = open_connection(uri)
    try:
        return bool(conn.lookupByName(domain).isActive())
    except lv.libvirtError:
        return False  # the offline path names the missing domain
    finally:
        conn.close()


def repository_tag(repo: Repository) -> str:
    """A short tag naming the repository in checkpoint names, so each repository keeps its own."""
    return str(blake3.blake3(repo.location.encode()).hexdigest())[:8]


@dataclass
class _Base:
    """What the previous point of this VM can vouch for."""

    checkpoint: str | None = None
    manifests: dict[str, DiskManifest] = field(default_factory=dict)
    bitmap_disks: set[str] = field(default_factory=set)
    why_not: str = "first backup of this VM in this repository"


def _previous(repo: Repository, vm: str, dom: Any, uuid: str) -> _Base:
    if not repo.catalog.points(vm):
        return _Base()
    prev = repo.get_point(vm)
    base = _Base(manifests={r.name: repo.load_manifest(r) for r in prev.record.disks})
    info_cfg = next((c for c in prev.record.configs if c.filename == BACKUP_INFO_NAME), None)
    if info_cfg is None:
        base.why_not = f"the previous point {prev.id} was not a live backup (it has no checkpoint)"
        return base
    info = json.loads(repo.read_config(info_cfg))
    name = info.get("checkpoint")
    if info.get("domain_uuid") != uuid:
        base.why_not = f"the previous point {prev.id} was taken from another domain (UUID {info.get('domain_uuid')})"
        return base
    facts = lj.checkpoint_facts(dom, name) if name else None
    if facts is None:
        base.why_not = f"checkpoint {name} of the previous point {prev.id} is gone (domain redefined?)"
        return base
    if facts[0] != info.get("checkpoint_created"):
        base.why_not = f"checkpoint {name} is not the one the previous point {prev.id} made"
        return base
    base.checkpoint, base.bitmap_disks, base.why_not = name, facts[1], ""
    return base


def _why_full(d: lj.LiveDisk, base: _Base, size: int | None, bs: int, forced: bool) -> str:
    if forced:
        return "--full"
    if d.fmt != "qcow2":
        return f"{d.target} is a {d.fmt} disk and cannot carry a dirty bitmap"
    if base.checkpoint is None:
        return base.why_not
    prev = base.manifests.get(d.target)
    if prev is None or d.target not in base.bitmap_disks:
        return f"{d.target} is not in the previous point's checkpoint {base.checkpoint}"
    if size is not None and (prev.virtual_size != size or prev.block_size != bs):
        return f"{d.target} changed size since the previous point"
    return ""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A ``kill`` (SIGTERM) cleans up like Ctrl-C: job ended, checkpoint deleted, nothing committed."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_live_backup(repo: Repository, uri: str, domain: str, *, vm: str | None = None, quiesce: bool = False,
                    full: bool = False, progress: ProgressFn | None = None,
                    warn: WarnFn = lambda _m: None) -> tuple[RestorePoint, LiveBackupSummary]:  # fmt: skip
    """Back up the running ``domain`` through a libvirt backup job and commit one restore point."""
    if urlparse(uri).hostname:
        raise LiverestoreError(f"live backups read QEMU's NBD socket on this host: run liverestore on the "
                               f"host of {uri} (with qemu:///system)")  # fmt: skip
    conn = open_connection(uri)
    try:
        dom = find_domain(conn, uri, domain)
        with _sigterm_as_interrupt(), Lease(repo, BACKUP):
            return _backup_domain(repo, dom, domain, vm, quiesce, full, progress, warn)
    finally:
        conn.close()


def _backup_domain(repo: Repository, dom: Any, domain: str, vm: str | None, quiesce: bool, full: bool,
                   progress: ProgressFn | None, warn: WarnFn) -> tuple[RestorePoint, LiveBackupSummary]:  # fmt: skip
    lv = libvirt_module()
    started = time.monotonic()
    uuid = dom.UUIDString()
    lock = lj.DomainLock(lj.run_dir() / f"backup-{uuid}.lock")
    lock.acquire(domain)
    try:
        lj.clear_stale_job(dom, domain, lock, warn)
        try:
            live_xml, inactive_xml = dom.XMLDesc(0), dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        except lv.libvirtError as e:
            raise LiverestoreError(f"cannot read the definition of {domain}: {libvirt_message(e)}") from None
        if not dom.isActive():
            raise LiverestoreError(f"domain {domain} stopped before its backup began: back it up offline instead")
        spec = parse_domain(inactive_xml)
        vm = vm or spec.name
        disks = lj.running_disks(live_xml)
        if not disks:
            raise LiverestoreError(f"domain {domain} has no disks to back up")
        configs = {DOMAIN_CONFIG_NAME: inactive_xml.encode()}
        if spec.nvram:
            try:
                configs[NVRAM_CONFIG_NAME] = Path(spec.nvram).read_bytes()
            except OSError as e:
                raise LiverestoreError(f"cannot read the NVRAM of {domain} ({spec.nvram}): {e.strerror}") from None
        base = _previous(repo, vm, dom, uuid)
        reasons = {d.target: _why_full(d, base, None, repo.block_size, full) for d in disks}
        inc = {t for t, why in reasons.items() if not why}
        tag = repository_tag(repo)
        jobdir = lj.make_jobdir(uuid, lj.qemu_owner(live_xml))
        lock.record(jobdir=str(jobdir), domain=domain)
        checkpoint = lj.new_checkpoint_name(tag)
        try:
            begun = _begin(dom, domain, jobdir, disks, inc, base.checkpoint, checkpoint, quiesce, warn)
            if inc and not begun.incremental:
                reasons.update({t: f"libvirt refused an incremental backup from {base.checkpoint}" for t in inc})
                inc = set()
            point, summary = _read_and_commit(repo, dom, vm, jobdir, disks, base, inc, reasons, configs,
                                              checkpoint, uuid, begun.quiesced, progress, warn)  # fmt: skip
        except BaseException:
            lj.end_job(dom, jobdir)
            why = lj.delete_checkpoint(dom, checkpoint)
            if why:
                warn(f"checkpoint {checkpoint} of the failed backup stays until the next backup: {why}")
            raise
        finally:
            lj.end_job(dom, jobdir)
            shutil.rmtree(jobdir, ignore_errors=True)
        for failure in lj.sweep_checkpoints(dom, tag, keep=checkpoint):
            warn(f"could not delete an older checkpoint ({failure})")
        summary.seconds = time.monotonic() - started
        return point, summary
    finally:
        lock.release()


@dataclass(frozen=True)
class _Begun:
    quiesced: bool  # the guest agent froze the filesystems for the instant of the checkpoint
    incremental: bool  # libvirt accepted the incremental request (else every disk is read whole)


def _begin(dom: Any, domain: str, jobdir: Path, disks: list[lj.LiveDisk], inc: set[str], base_cp: str | None,
           checkpoint: str, quiesce: bool, warn: WarnFn) -> _Begun:  # fmt: skip
    """Start the backup job and its checkpoint in one step; fall back to a full job when libvirt
    cannot use the base checkpoint's bitmaps (lost, inconsistent after a QEMU crash)."""
    lv = libvirt_module()
    sock = jobdir / "nbd.sock"
    frozen = False
    if quiesce:
        try:
            dom.fsFreeze(None, 0)
            frozen = True
        except lv.libvirtError as e:
            warn(f"no guest agent answered ({libvirt_message(e)}): the backup is crash-consistent, not quiesced")
    try:
        try:
            dom.backupBegin(lj.backup_xml(sock, jobdir, disks, inc, base_cp), lj.checkpoint_xml(checkpoint, disks), 0)
            return _Begun(frozen, bool(inc))
        except lv.libvirtError as e:
            if not inc:
                raise _begin_error(dom, domain, e) from None
            warn(f"libvirt cannot back up {domain} incrementally from {base_cp} ({libvirt_message(e)}): "
                 "reading every disk in full")  # fmt: skip
        try:
            dom.backupBegin(lj.backup_xml(sock, jobdir, disks, set(), None), lj.checkpoint_xml(checkpoint, disks), 0)
        except lv.libvirtError as e:
            raise _begin_error(dom, domain, e) from None
        return _Begun(frozen, False)
    finally:
        if frozen:
            with contextlib.suppress(lv.libvirtError):
                dom.fsThaw(None, 0)


def _begin_error(dom: Any, domain: str, e: Exception) -> LiverestoreError:
    """A domain destroyed while libvirt starts the job fails ``backupBegin`` too, and may still
    show the half-made job: ask whether it stopped before blaming another backup."""
    if _stopped(dom, within_s=3):
        return LiverestoreError(f"the domain {domain} stopped during the backup; no restore point was committed")
    if lj.active_job_socket(dom) is not None:
        return LiverestoreError(f"a backup of domain {domain} is already running; wait for it to finish")
    return LiverestoreError(f"libvirt cannot start a backup of {domain}: {libvirt_message(e)}")


def _read_and_commit(repo: Repository, dom: Any, vm: str, jobdir: Path, disks: list[lj.LiveDisk], base: _Base,
                     inc: set[str], reasons: dict[str, str], configs: dict[str, bytes], checkpoint: str,
                     uuid: str, quiesced: bool, progress: ProgressFn | None,
                     warn: WarnFn) -> tuple[RestorePoint, LiveBackupSummary]:  # fmt: skip
    stats = BackupStats()
    records: list[DiskRecord] = []
    summaries: list[DiskSummary] = []
    for d in disks:
        ctx = dirty_context(d.target) if d.target in inc else None
        try:
            reader = NbdReader.connect_unix(jobdir / "nbd.sock", d.target, ["base:allocation", *([ctx] if ctx else [])])
        except NbdClientError as e:
            raise _read_error(dom, vm, e) from None
        try:
            resized = ctx is not None and _why_full(d, base, reader.size, repo.block_size, False)
            if resized:
                reasons[d.target], ctx = resized, None
            bmap = map_blocks(reader, repo.block_size, ctx)
            prev = base.manifests.get(d.target)
            if ctx is not None and prev is not None:
                blocks = list(prev.blocks)
                for i in range(bmap.count):
                    if bmap.zeroed(i):
                        blocks[i] = None
                known = prev.chunk_ids()
            else:
                blocks = [None] * bmap.count
                known = prev.chunk_ids() if prev is not None else set()
            manifest = store_disk(repo, d.target, reader.size, read_blocks(reader, bmap), blocks, known, stats,
                                  progress, d.fmt)  # fmt: skip
        except (NbdClientError, OSError) as e:
            raise _read_error(dom, vm, e) from None
        finally:
            reader.close()
        records.append(repo.store_manifest(manifest))
        mode = "incremental" if ctx is not None else "full"
        summaries.append(DiskSummary(d.target, mode, reader.size, reader.bytes_read, reasons[d.target]))
        if mode == "full" and base.manifests and reasons[d.target]:
            warn(f"{d.target}: read in full: {reasons[d.target]}")
    lj.end_job(dom, jobdir)  # the frozen view is no longer needed: free the scratch before committing
    for cd in lj.running_disks(dom.XMLDesc(0), "cdrom"):  # installer/cloud-init media: as the offline backup does
        if cd.source and Path(cd.source).is_file():
            before = stats.bytes_read
            manifest = backup_disk(repo, Path(cd.source), cd.target, base.manifests.get(cd.target), stats, progress,
                                   "raw")  # fmt: skip
            records.append(repo.store_manifest(manifest))
            summaries.append(DiskSummary(cd.target, "copied", manifest.virtual_size, stats.bytes_read - before,
                                         "read-only media, read as a file"))  # fmt: skip
    facts = lj.checkpoint_facts(dom, checkpoint)
    if facts is None:
        raise LiverestoreError(f"checkpoint {checkpoint} vanished during the backup; no restore point committed")
    all_inc = all(s.mode in ("incremental", "copied") for s in summaries)
    info = {"made": "live", "mode": "incremental" if all_inc else "full", "checkpoint": checkpoint,
            "checkpoint_created": facts[0], "base_checkpoint": base.checkpoint if inc else None,
            "domain_uuid": uuid, "quiesced": quiesced,
            "disks": {s.name: {"mode": s.mode, "bytes_read": s.bytes_read} for s in summaries}}  # fmt: skip
    configs[BACKUP_INFO_NAME] = json.dumps(info, indent=1).encode()
    point = commit_backup(repo, vm, records, sorted(configs.items()), stats)
    summary = LiveBackupSummary(
        point_id=point.id, vm=vm, mode=str(info["mode"]), checkpoint=checkpoint,
        base_checkpoint=base.checkpoint if any(s.mode == "incremental" for s in summaries) else None,
        quiesced=quiesced, bytes_read=sum(s.bytes_read for s in summaries), bytes_virtual=stats.bytes_virtual,
        bytes_new=stats.bytes_new_stored, seconds=0.0, disks=summaries,
    )  # fmt: skip
    return point, summary


def _read_error(dom: Any, vm: str, e: Exception) -> LiverestoreError:
    """Name the likely cause. A stopping domain closes its NBD export before libvirt reports it
    stopped (libvirt gives QEMU up to 10 s to exit on SIGTERM), so keep asking for a while."""
    if _stopped(dom, within_s=20):
        return LiverestoreError(f"the domain of {vm} stopped during the backup; no restore point was committed")
    return LiverestoreError(f"reading the disks of {vm} failed ({e}); no restore point was committed")


def _stopped(dom: Any, within_s: float) -> bool:
    """Whether libvirt reports the domain inactive within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(Exception):
            if not dom.isActive():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
