"""Restore orchestration: the phases of an instant restore, timed and reported.

plan → prefetch (set 1: the boot profile) → launch (QEMU reading from the agent) → run (set 2:
background copy in relocation order, below guest reads) → relocate (blockdev-mirror; set 3 ahead
of the mirror; guest reads and set 3 share the repository fairly) → pivot (the VM runs from
primary storage; the agent is released; the profile learns this boot).

Destinations are written as ``<disk>.raw.partial`` and renamed only after the pivot, so an
interrupted restore never leaves a file that looks like a complete disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from liverestore import profile as profiles
from liverestore.agent.agent import AgentConfig, MediaAgent
from liverestore.agent.prefetch import RelocationPrefetcher, start_background
from liverestore.agent.scheduler import FetchClass, Mode
from liverestore.agent.source import repository_source
from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment, Hypervisor
from liverestore.hypervisor.qemu import QemuVM
from liverestore.repository import Repository, RestorePoint

log = logging.getLogger("liverestore.restore")


@dataclass
class RestoreOptions:
    vm: str
    dest: Path
    cache_dir: Path
    point: str | None = None
    relocate: bool = True
    use_profile: bool = True
    record_profile: bool = True
    background_prefetch: bool = True  # set 2 (benchmarks switch it off to measure its effect)
    relocation_prefetch: bool = True  # set 3
    repo_latency_ms: float = 0.0
    repo_mbps: float = 0.0
    fetch_slots: int = 32
    prefetch_budget_s: float = 120.0
    boot_marker: str | None = "BOOT-OK"
    boot_window_s: float = 20.0
    boot_timeout_s: float = 600.0
    run_seconds: float = 0.0
    memory_mb: int = 512
    accel: str = "tcg"


@dataclass
class Status:
    """What the progress display shows; refreshed twice a second."""

    phase: str
    elapsed_s: float
    relocated_fraction: float
    hit_rate: float
    fetched_bytes: int
    fetch_mbps: float
    cached_blocks: int
    allocated_blocks: int


@dataclass
class RestoreReport:
    vm: str
    point: str
    mode: str
    phases: dict[str, float] = field(default_factory=dict)
    time_to_boot_s: float = 0.0
    boot_after_launch_s: float = 0.0
    profile_blocks: int = 0
    profile_prefetched: int = 0
    background_queued: int = 0
    relocation_prefetched: int = 0
    bytes_fetched: int = 0
    bytes_fetched_stored: int = 0
    blocks_fetched: int = 0
    reads: int = 0
    reads_from_cache: int = 0
    reads_from_repository: int = 0
    hit_rate: float = 0.0
    read_latency_p50_ms: float = 0.0
    read_latency_p99_ms: float = 0.0
    boot_reads: int = 0
    boot_reads_from_cache: int = 0
    fetched_by_class: dict[str, int] = field(default_factory=dict)
    destinations: dict[str, str] = field(default_factory=dict)
    relocated: bool = False
    serial_log: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_path(dest: Path, vm: str) -> Path:
    return dest / f"{vm}.restore.json"


def _write_state(dest: Path, vm: str, state: str, **extra: Any) -> None:
    doc = {"vm": vm, "state": state, "time": time.time(), **extra}
    tmp = state_path(dest, vm).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, state_path(dest, vm))


def _prepare_dest(dest: Path, point: RestorePoint) -> dict[str, Path]:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LiverestoreError(f"cannot create destination directory {dest}: {e.strerror}") from None
    finals = {d.name: dest / f"{d.name}.raw" for d in point.record.disks}
    for path in finals.values():
        if path.exists():
            raise LiverestoreError(
                f"{path} already exists; refusing to overwrite a disk (move it away first)"
            )
    need = sum(d.allocated for d in point.record.disks)
    free = os.statvfs(dest).f_bavail * os.statvfs(dest).f_frsize
    if free < need:
        raise LiverestoreError(
            f"destination {dest} has {free / 2**20:.0f} MiB free; the disks need {need / 2**20:.0f} MiB"
        )
    return finals


class InstantRestore:
    """One instant restore. ``run()`` drives the phases; the VM and agent stay reachable after it."""

    def __init__(
        self, repo: Repository, opts: RestoreOptions, on_status: Callable[[Status], None] | None = None
    ) -> None:
        self.repo = repo
        self.opts = opts
        self.on_status = on_status
        self.point = repo.get_point(opts.vm, opts.point)
        self.report = RestoreReport(vm=self.point.vm, point=self.point.id, mode="instant")
        self.agent: MediaAgent | None = None
        self.vm: Hypervisor | None = None
        self.phase = "plan"
        self._t0 = time.monotonic()
        self._phase_t0 = self._t0
        self._partials: dict[str, Path] = {}
        self._finals: dict[str, Path] = {}
        self._relocation_fraction = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.nbd_port = 0

    # -- phase bookkeeping ---------------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        now = time.monotonic()
        self.report.phases[self.phase] = round(now - self._phase_t0, 3)
        log.info("phase %s done in %.2f s; entering %s", self.phase, now - self._phase_t0, phase)
        self.phase, self._phase_t0 = phase, now
        self._emit()

    def _finish_phase(self) -> None:
        self.report.phases[self.phase] = round(time.monotonic() - self._phase_t0, 3)

    def _emit(self) -> None:
        if self.on_status is None or self.agent is None:
            return
        m = self.agent.metrics
        elapsed = time.monotonic() - self._t0
        cached = sum(e.read_cache.present for e in self.agent.exports.values())
        alloc = sum(e.manifest.allocated_count for e in self.agent.exports.values())
        self.on_status(Status(
            phase=self.phase, elapsed_s=elapsed, relocated_fraction=self._relocation_fraction,
            hit_rate=m.hit_rate, fetched_bytes=m.bytes_fetched,
            fetch_mbps=m.bytes_fetched / 1e6 / max(elapsed, 1e-3), cached_blocks=cached, allocated_blocks=alloc,
        ))  # fmt: skip

    async def _ticker(self) -> None:
        while True:
            self._emit()
            await asyncio.sleep(0.5)

    # -- the phases ----------------------------------------------------------------------------
    async def run(self) -> RestoreReport:
        try:
            await self._run()
        except BaseException:
            await self.abort()
            raise
        return self.report

    async def _run(self) -> None:
        opts = self.opts
        # plan
        if opts.relocate:
            self._finals = _prepare_dest(opts.dest, self.point)
            self._partials = {n: p.with_name(p.name + ".partial") for n, p in self._finals.items()}
            for p in self._partials.values():
                p.unlink(missing_ok=True)
        self.agent = MediaAgent(self.repo, self.point, AgentConfig(
            cache_dir=opts.cache_dir, repo_latency_ms=opts.repo_latency_ms, repo_mbps=opts.repo_mbps,
            fetch_slots=opts.fetch_slots, mode=Mode.DEMAND_FIRST,
        ))  # fmt: skip
        port = self.nbd_port = await self.agent.listen("127.0.0.1", 0)
        self._tasks.append(asyncio.create_task(self._ticker()))
        block_size = self.repo.block_size
        stored_profile = self.repo.catalog.get_profile(self.point.vm) if opts.use_profile else None
        plan = profiles.profile_blocks(stored_profile, block_size)
        self.report.profile_blocks = sum(len(b) for b in plan.values())

        # prefetch: set 1
        self._enter("prefetch")
        futs = []
        for disk, blocks in plan.items():
            name = f"{self.point.vm}/{disk}"
            if name in self.agent.exports:
                futs += self.agent.prefetch(name, [b for b in blocks if b < self.agent.exports[name].manifest.block_count],
                                            FetchClass.PREFETCH)  # fmt: skip
        if futs:
            _done, pending = await asyncio.wait(futs, timeout=opts.prefetch_budget_s)
            if pending:
                log.warning("profile prefetch budget of %.0f s used up; %d blocks left to fetch on demand",
                            opts.prefetch_budget_s, len(pending))  # fmt: skip
            self.report.profile_prefetched = sum(
                1
                for disk, blocks in plan.items()
                if (e := self.agent.exports.get(f"{self.point.vm}/{disk}")) is not None
                for b in blocks
                if b < e.manifest.block_count and e.present(b)
            )

        # launch
        self._enter("launch")
        launched = time.monotonic()
        self.vm = QemuVM(opts.dest / f".{self.point.vm}.vm", memory_mb=opts.memory_mb, accel=opts.accel)
        attachments = [
            DiskAttachment(
                name=e.manifest.name, size=e.size, nbd_host="127.0.0.1", nbd_port=port, export=name,
                overlay=opts.dest / f".{self.point.vm}.vm" / f"{e.manifest.name}.overlay.qcow2",
            )
            for name, e in self.agent.exports.items()
        ]  # fmt: skip
        await self.vm.launch(attachments)
        self.report.serial_log = str(self.vm.serial_log)
        if opts.relocate:
            self._save_state("running-from-backup")
        booted = await _wait_for_boot(self.vm, opts)
        self.report.time_to_boot_s = round(booted - self._t0, 3)
        self.report.boot_after_launch_s = round(booted - launched, 3)
        boot_events = self.agent.recorder.since(launched, booted)
        self.report.boot_reads = len(boot_events)
        self.report.boot_reads_from_cache = sum(e.hit for e in boot_events)
        if opts.record_profile:
            sizes = {n: e.block_size for n, e in self.agent.exports.items()}
            trace = {n.split("/", 1)[1]: b for n, b in profiles.blocks_from_trace(boot_events, sizes).items()}
            merged = profiles.merge_run(self.repo.catalog.get_profile(self.point.vm), trace, block_size)
            self.repo.catalog.put_profile(self.point.vm, merged)
        log.info("guest up %.2f s after launch (%.2f s after start)", booted - launched, booted - self._t0)

        # run: set 2
        self._enter("run")
        if opts.background_prefetch:
            for e in self.agent.exports.values():
                self.report.background_queued += start_background(e)
        if not opts.relocate:
            self._finish_phase()
            self._collect()
            return
        if opts.run_seconds > 0:
            await asyncio.sleep(opts.run_seconds)

        await self._relocate_and_pivot(restart_mirror=True)

    def _save_state(self, state: str) -> None:
        """Everything ``--resume`` needs to pick up a VM whose orchestrator died."""
        assert self.vm is not None and self.vm.pid is not None and self.agent is not None
        _write_state(
            self.opts.dest, self.point.vm, state, point=self.point.id, qemu_pid=self.vm.pid,
            vm_dir=str(self.vm.workdir), nbd_port=self.nbd_port, cache_dir=str(self.opts.cache_dir),
            disks=[{"name": d.name, "size": d.size, "export": d.export, "overlay": str(d.overlay),
                    "partial": str(self._partials[d.name]), "final": str(self._finals[d.name])}
                   for d in self.vm.disks],
        )  # fmt: skip

    async def _relocate_and_pivot(self, restart_mirror: bool) -> None:
        assert self.agent is not None and self.vm is not None
        # relocate: set 3
        self._enter("relocate")
        self._save_state("relocating")
        self.agent.scheduler.cancel_queued(FetchClass.PREFETCH)
        self.agent.set_mode(Mode.FAIR)
        log.info("scheduler switched to fair: guest reads and relocation copies share the repository")
        for e in self.agent.exports.values() if self.opts.relocation_prefetch else ():
            self._tasks.append(asyncio.create_task(RelocationPrefetcher(e).run()))
        if restart_mirror:
            await self.vm.start_relocation(self._partials)
        while True:
            jobs = await self.vm.relocation_progress()
            total = sum(j.length for j in jobs)
            self._relocation_fraction = sum(j.offset for j in jobs) / total if total else 1.0
            if all(j.ready for j in jobs):
                break
            if not self.vm.running:
                raise LiverestoreError("the VM stopped during relocation")
            await asyncio.sleep(0.2)

        # pivot
        self._enter("pivot")
        await self.vm.pivot()
        for name, partial in self._partials.items():
            os.replace(partial, self._finals[name])
        self.report.destinations = {n: str(p) for n, p in self._finals.items()}
        self.report.relocated = True
        _write_state(self.opts.dest, self.point.vm, "complete", point=self.point.id,
                     disks=self.report.destinations)  # fmt: skip
        self._collect()
        await self.release_agent()
        self._finish_phase()

    async def resume(self) -> RestoreReport:
        """Pick up a restore whose orchestrator died: same cache, same NBD port (QEMU reconnects
        to it), the running mirror jobs if they survived, else a fresh mirror; then pivot."""
        try:
            await self._resume()
        except BaseException:
            await self.abort()
            raise
        return self.report

    async def _resume(self) -> None:
        path = state_path(self.opts.dest, self.opts.vm)
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LiverestoreError(f"nothing to resume: {path} is missing or unreadable") from None
        if st.get("state") == "complete":
            raise LiverestoreError(f"the restore of {self.opts.vm} in {self.opts.dest} is already complete")
        if st.get("state") not in ("running-from-backup", "relocating") or "qemu_pid" not in st:
            raise LiverestoreError(f"the restore in {self.opts.dest} is {st.get('state')}; start a new one")
        self.point = self.repo.get_point(self.opts.vm, st["point"])
        self.report.point, self.report.mode = self.point.id, "instant-resumed"
        self._partials = {d["name"]: Path(d["partial"]) for d in st["disks"]}
        self._finals = {d["name"]: Path(d["final"]) for d in st["disks"]}
        disks = [DiskAttachment(name=d["name"], size=d["size"], nbd_host="127.0.0.1", nbd_port=st["nbd_port"],
                                export=d["export"], overlay=Path(d["overlay"])) for d in st["disks"]]  # fmt: skip
        vm = QemuVM(Path(st["vm_dir"]))
        if not vm.attach(int(st["qemu_pid"]), disks):
            raise LiverestoreError(f"the VM of the interrupted restore (pid {st['qemu_pid']}) is gone; "
                                   "start a new restore")  # fmt: skip
        self.vm = vm
        self.report.serial_log = str(vm.serial_log)
        self.agent = MediaAgent(self.repo, self.point, AgentConfig(
            cache_dir=Path(st["cache_dir"]), repo_latency_ms=self.opts.repo_latency_ms,
            repo_mbps=self.opts.repo_mbps, fetch_slots=self.opts.fetch_slots, mode=Mode.DEMAND_FIRST,
        ))  # fmt: skip
        self.nbd_port = await self.agent.listen("127.0.0.1", int(st["nbd_port"]))
        log.info("agent back on port %d; QEMU reconnects to it", self.nbd_port)
        await vm.connect()
        self.phase = "run"
        healthy = False
        if st["state"] == "relocating":
            try:
                healthy = all(not j.failed for j in await self.vm.relocation_progress(raise_on_failure=False))
            except LiverestoreError:
                healthy = False
            if not healthy:
                log.warning("the mirror did not survive the interruption; starting it again")
                await self.vm.abort_relocation()
        await self._relocate_and_pivot(restart_mirror=not healthy)

    def _collect(self) -> None:
        assert self.agent is not None
        m = self.agent.metrics
        r = self.report
        r.bytes_fetched, r.bytes_fetched_stored, r.blocks_fetched = (
            m.bytes_fetched,
            m.bytes_fetched_stored,
            m.blocks_fetched,
        )
        r.reads, r.reads_from_cache, r.reads_from_repository = m.reads, m.read_hits, m.read_misses
        r.hit_rate = round(m.hit_rate, 4)
        r.read_latency_p50_ms = m.latency.percentile(0.5)
        r.read_latency_p99_ms = m.latency.percentile(0.99)
        r.fetched_by_class = dict(m.fetched_by_class)
        r.relocation_prefetched = m.fetched_by_class.get(str(FetchClass.RELOCATION), 0)

    async def release_agent(self) -> None:
        """After the pivot nothing reads from the agent any more: stop prefetchers and close it."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self.agent is not None:
            await self.agent.close()
            self.agent = None

    async def abort(self) -> None:
        """Stop everything; remove half-copied destinations so nothing incomplete looks done."""
        log.info("restore aborted in phase %s", self.phase)
        if self.vm is not None and self.phase in ("relocate", "pivot") and not self.report.relocated:
            with contextlib.suppress(Exception):
                await self.vm.abort_relocation()
        if self.vm is not None and not self.report.relocated:
            with contextlib.suppress(Exception):
                await self.vm.stop()
        await self.release_agent()
        for p in self._partials.values():
            p.unlink(missing_ok=True)
        if self.vm is not None and self.opts.relocate and not self.report.relocated:
            _write_state(self.opts.dest, self.point.vm, "aborted", point=self.point.id, phase=self.phase)

    async def close(self, stop_vm: bool = True) -> None:
        await self.release_agent()
        if stop_vm and self.vm is not None:
            await self.vm.stop()


async def _wait_for_boot(vm: Hypervisor, opts: RestoreOptions) -> float:
    """When the guest counts as up: its marker on the console, or the end of the boot window."""
    if opts.boot_marker:
        return await vm.wait_for_console(opts.boot_marker, opts.boot_timeout_s)
    await asyncio.sleep(opts.boot_window_s)
    return time.monotonic()


async def classic_restore(repo: Repository, opts: RestoreOptions) -> tuple[RestoreReport, QemuVM]:
    """The baseline: copy every block to the destination first, then boot from the local copy."""
    point = repo.get_point(opts.vm, opts.point)
    report = RestoreReport(vm=point.vm, point=point.id, mode="classic")
    t0 = time.monotonic()
    finals = _prepare_dest(opts.dest, point)
    source = repository_source(repo, opts.repo_latency_ms, opts.repo_mbps)
    sem = asyncio.Semaphore(opts.fetch_slots)
    attachments = []
    try:
        for rec in point.record.disks:
            manifest = repo.load_manifest(rec)
            partial = finals[rec.name].with_name(finals[rec.name].name + ".partial")
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, manifest.virtual_size)

                async def copy(idx: int, fd: int = fd, manifest: Any = manifest) -> None:
                    async with sem:
                        got = await source.fetch(manifest, idx)
                    os.pwrite(fd, got.data, idx * manifest.block_size)
                    report.blocks_fetched += 1
                    report.bytes_fetched += len(got.data)
                    report.bytes_fetched_stored += got.stored_bytes

                await asyncio.gather(*(copy(i) for i in manifest.allocated_blocks()))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, finals[rec.name])
            attachments.append(
                DiskAttachment(name=rec.name, size=manifest.virtual_size, local_path=finals[rec.name])
            )
    except BaseException:
        for f in finals.values():
            f.with_name(f.name + ".partial").unlink(missing_ok=True)
        raise
    report.phases["restore"] = round(time.monotonic() - t0, 3)
    vm = QemuVM(opts.dest / f".{point.vm}.vm", memory_mb=opts.memory_mb, accel=opts.accel)
    launched = time.monotonic()
    await vm.launch(attachments)
    booted = await _wait_for_boot(vm, opts)
    report.phases["launch"] = round(booted - launched, 3)
    report.time_to_boot_s = round(booted - t0, 3)
    report.boot_after_launch_s = round(booted - launched, 3)
    report.destinations = {n: str(p) for n, p in finals.items()}
    report.relocated = True
    report.serial_log = str(vm.serial_log)
    return report, vm
