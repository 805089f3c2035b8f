"""Restore orchestration: the phases of an instant restore, timed and reported.

plan → prefetch (set 1: the boot profile) → launch (QEMU reading from the agent) → run (set 2:
background copy in relocation order, below guest reads) → relocate (blockdev-mirror; set 3 ahead
of the mirror; guest reads and set 3 share the repository fairly) → pivot (the VM runs from
primary storage; the agent is released; the profile learns this boot).

What runs is the VM of the restore point: its stored libvirt definition when it has one (vCPUs,
memory, firmware, buses, NICs), else a default for bare disks. Which hypervisor runs it is the
``Hypervisor`` driver's business; this module never names one. Destination disks are
``DEST/<name>-<disk>.<fmt>``; the restore state (``DEST/<name>.restore.json``) says ``complete``
only after the pivot, and holds absolute paths only, so ``--resume`` works from any directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from liverestore import profile as profiles
from liverestore.agent.agent import BACKGROUND_BATCH, AgentConfig, MediaAgent, ServedPoint
from liverestore.agent.concurrency import AdaptiveLimit
from liverestore.agent.export import DiskExport
from liverestore.agent.metrics import Metrics
from liverestore.agent.nbd.tls import TlsPolicy, server_context
from liverestore.agent.prefetch import RelocationPrefetcher, start_background
from liverestore.agent.recorder import stalled_seconds
from liverestore.agent.scheduler import FetchClass, Mode
from liverestore.agent.source import Fetched, RepositorySource, emulate_link
from liverestore.errors import LiverestoreError
from liverestore.hypervisor import adopt_hypervisor, open_hypervisor, resolve_choice
from liverestore.hypervisor.base import DiskAttachment, Hypervisor
from liverestore.hypervisor.vmspec import (
    DOMAIN_CONFIG_NAME,
    NVRAM_CONFIG_NAME,
    VmSpec,
    bare_domain_xml,
    default_spec,
    parse_domain,
    retarget,
)
from liverestore.repository import DiskManifest, Repository, RestorePoint
from liverestore.writeback import start_writeback

log = logging.getLogger("liverestore.restore")

RELOCATION_RETRY_S = 5.0  # after a failed relocation: first look at the destination's free space
RELOCATION_RETRY_MAX_S = 60.0  # then doubling up to this, while it stays full or the copies keep failing
ROOM_TO_RESUME = 64 * 2**20  # free bytes under its overlay before a guest paused on a full disk runs again


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
    fetch_slots: int | None = None  # repository fetches in flight: None adapts to the link
    prefetch_budget_s: float = 120.0
    boot_marker: str | None = "BOOT-OK"
    boot_window_s: float = 20.0
    boot_timeout_s: float = 600.0
    boot_quiet_s: float = 8.0  # without a marker or guest agent: guest reads quiet this long = up
    run_seconds: float = 0.0
    memory_mb: int = 512  # bare-disk backups only: a stored definition brings its own
    accel: str = "tcg"
    hypervisor: str = "auto"  # auto | qemu | libvirt[:URI]
    name: str | None = None  # restore under another name (new UUID and MACs)
    network_map: dict[str, str] = field(default_factory=dict)
    no_network: bool = False
    dest_format: str = "raw"
    keep_cache: bool = False  # else the read-cache is removed once the disks are relocated
    agent_tls_creds: Path | None = None  # x509 for the VM's NBD connections (QEMU's layout, both ends)


@dataclass
class Status:
    """What the progress display shows; refreshed twice a second."""

    name: str
    phase: str
    elapsed_s: float
    relocated_fraction: float
    hit_rate: float
    fetched_bytes: int
    fetched_stored_bytes: int  # what crossed the repository link (compressed, sealed)
    fetch_mbps: float
    cached_blocks: int
    allocated_blocks: int


@dataclass
class RestoreReport:
    vm: str
    point: str
    mode: str
    name: str = ""
    hypervisor: str = ""
    vm_identity: str = ""
    boot_detected_by: str = ""
    cache_start: str = "cold"  # "warm" when blocks were already cached before this restore
    cache_blocks_at_start: int = 0
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
    repository_requests: int = 0  # ranged reads: neighbouring blocks of a pack share one
    reads: int = 0
    reads_from_cache: int = 0
    reads_from_repository: int = 0
    hit_rate: float = 0.0
    read_latency_p50_ms: float = 0.0  # the guest's reads (under 512 KiB), not the mirror's
    read_latency_p99_ms: float = 0.0
    bulk_read_latency_p99_ms: float = 0.0  # the mirror's reads during relocation (512 KiB and up)
    boot_reads: int = 0
    boot_reads_from_cache: int = 0
    boot_io_stall_s: float = 0.0  # time during boot with a guest read waiting for the repository
    fetched_by_class: dict[str, int] = field(default_factory=dict)
    destinations: dict[str, str] = field(default_factory=dict)
    relocated: bool = False
    relocation_failures: list[str] = field(default_factory=list)  # each ended a try; the VM ran on
    serial_log: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_path(dest: Path, name: str) -> Path:
    return dest.absolute() / f"{name}.restore.json"


def needs_agent(dest: Path, name: str) -> bool:
    """A restore in ``dest`` that still needs its agent (running from backup or relocating)."""
    try:
        return json.loads(state_path(dest, name).read_text()).get("state") in ("running-from-backup", "relocating")
    except (OSError, ValueError):
        return False


def _write_state(dest: Path, name: str, state: str, **extra: Any) -> None:
    doc = {"vm": name, "state": state, "time": time.time(), **extra}
    path = state_path(dest, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def load_spec(repo: Repository, point: RestorePoint, opts: RestoreOptions) -> VmSpec:
    """The VM to run: the point's stored libvirt definition, or a default for bare disks; then
    renamed / re-networked as asked. Every disk of the point must be a disk of the VM."""
    xml_cfg = next((c for c in point.record.configs if c.filename == DOMAIN_CONFIG_NAME), None)
    names = [d.name for d in point.record.disks]
    if xml_cfg is None:
        if opts.network_map or opts.no_network:
            raise LiverestoreError(f"point {point.id} holds no VM definition, so it has no NICs to map")
        spec = default_spec(point.vm, names, memory_mib=opts.memory_mb)
        return retarget(spec, name=opts.name)
    spec = parse_domain(repo.read_config(xml_cfg).decode())
    missing = [n for n in names if spec.disk(n) is None]
    if missing:
        raise LiverestoreError(f"disk {missing[0]} of point {point.id} is not a disk of the stored definition")
    return retarget(spec, name=opts.name, network_map=opts.network_map, no_network=opts.no_network)


@dataclass(frozen=True)
class Placement:
    """Where each disk ends up: relocated disks (instant) or copied ones (CD-ROMs, classic)."""

    relocated: dict[str, Path]
    copied: dict[str, Path]
    nvram: Path | None

    @property
    def all_files(self) -> list[Path]:
        return [*self.relocated.values(), *self.copied.values(), *([self.nvram] if self.nvram else [])]


def plan_placement(
    dest: Path, spec: VmSpec, point: RestorePoint, fmt: str, copy_all: bool, relocate: bool = True
) -> Placement:
    """Disks to relocate (none with ``relocate`` off: they stay on the agent), disks to copy
    before launch (CD-ROMs always, everything for a classic restore), and the NVRAM file."""
    relocated, copied = {}, {}
    for d in point.record.disks:
        ds = spec.disk(d.name)
        if (ds is not None and ds.device == "cdrom") or copy_all:
            ext = "iso" if ds is not None and ds.device == "cdrom" else "raw"
            copied[d.name] = dest / f"{spec.name}-{d.name}.{ext}"
        elif relocate:
            relocated[d.name] = dest / f"{spec.name}-{d.name}.{fmt}"
    has_nvram = any(c.filename == NVRAM_CONFIG_NAME for c in point.record.configs) and spec.nvram
    return Placement(relocated, copied, dest / f"{spec.name}_VARS.fd" if has_nvram else None)


def _prepare_dest(dest: Path, point: RestorePoint, placement: Placement) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LiverestoreError(f"cannot create destination directory {dest}: {e.strerror}") from None
    for path in placement.all_files:
        if path.exists():
            raise LiverestoreError(
                f"{path} already exists; refusing to overwrite a disk (move it away first)"
            )
    free, need = _room(dest, point)
    if free < need:
        raise LiverestoreError(
            f"destination {dest} has {free / 2**20:.0f} MiB free; the disks need {need / 2**20:.0f} MiB"
        )


def _room(dest: Path, point: RestorePoint) -> tuple[int, int]:
    """Bytes free on the destination, and bytes the point's disks hold."""
    st = os.statvfs(dest)
    return st.f_bavail * st.f_frsize, sum(d.allocated for d in point.record.disks)


def _pwrite_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def copy_disk(repo: Repository, manifest: DiskManifest, path: Path, opts: RestoreOptions,
                    report: RestoreReport) -> None:
    """Copy every allocated block of a disk to ``path`` (written as ``.partial``, renamed when
    complete), a bounded number of blocks in flight: memory does not grow with the disk.

    How many follows the link as the agent's fetches do (``AdaptiveLimit``) unless
    ``fetch_slots`` fixes it. They start in batches, once a quarter of the limit is free: blocks
    started in one turn of the event loop share ranged reads, and one started as each fetch
    completed was a request of its own. Behind a 10 ms link at 64 KiB blocks the copy took
    9,414 requests per GiB and 2.3x the link's time; batched, 1.4-1.5x with a sixth of them.
    A batch is one ``fetch_many``, as the agent's are: a task, a coroutine chain and a future
    per 64 KiB block cost more than the block's decoding."""
    fetcher = RepositorySource(repo)
    source = emulate_link(fetcher, opts.repo_latency_ms, opts.repo_mbps)
    limit = AdaptiveLimit.for_source(manifest.block_size, source is fetcher)
    adaptive = limit if opts.fetch_slots is None else None
    slots = opts.fetch_slots or int(limit.limit)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, manifest.virtual_size)

        async def copy(blocks: list[int], started_with: int) -> None:
            t0 = time.monotonic()
            failed: list[Exception] = []

            def landed(_n: int, got: Fetched | Exception) -> None:
                nonlocal slots
                if isinstance(got, Exception):
                    failed.append(got)
                    return
                if adaptive is not None:
                    slots = max(2, adaptive.sample(time.monotonic() - t0, started_with))
                report.blocks_fetched += 1
                report.bytes_fetched += got.size
                report.bytes_fetched_stored += got.stored_bytes

            asks = [(idx, functools.partial(_pwrite_at, fd, idx * manifest.block_size)) for idx in blocks]
            await source.fetch_many(manifest, asks, landed)
            if failed:
                raise failed[0]

        inflight: dict[asyncio.Task[None], int] = {}  # each batch's task: its number of blocks
        batch: list[int] = []

        async def start(blocks: list[int]) -> None:
            """Wait until the blocks fit under the limit, then start them as one batch."""
            while inflight and sum(inflight.values()) + len(blocks) > slots:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    del inflight[t]
                    t.result()
            inflight[asyncio.create_task(copy(blocks, sum(inflight.values()) + len(blocks)))] = len(blocks)

        try:
            for idx in manifest.allocated_blocks():
                batch.append(idx)
                if len(batch) >= max(1, int(slots * BACKGROUND_BATCH)):
                    await start(batch)
                    batch = []
            if batch:
                await start(batch)
            await asyncio.gather(*inflight)
        except BaseException:
            for t in inflight:
                t.cancel()
            raise
        os.fsync(fd)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        fetcher.close()
        report.repository_requests += fetcher.requests
    os.replace(partial, path)


async def restore_side_files(repo: Repository, point: RestorePoint, placement: Placement, opts: RestoreOptions,
                             report: RestoreReport) -> None:
    """What is copied before launch rather than served: CD-ROM images (read-only, small) and the
    firmware's NVRAM (a UEFI guest cannot boot without its variables)."""
    for rec in point.record.disks:
        if rec.name in placement.copied:
            await copy_disk(repo, repo.load_manifest(rec), placement.copied[rec.name], opts, report)
    if placement.nvram is not None:
        cfg = next(c for c in point.record.configs if c.filename == NVRAM_CONFIG_NAME)
        placement.nvram.write_bytes(repo.read_config(cfg))


def agent_config(opts: RestoreOptions, cache_dir: Path) -> AgentConfig:
    """The agent a restore starts: loopback, the emulated link if asked, TLS if asked."""
    tls = TlsPolicy(server_context(opts.agent_tls_creds)) if opts.agent_tls_creds else None
    return AgentConfig(cache_dir=cache_dir, repo_latency_ms=opts.repo_latency_ms, repo_mbps=opts.repo_mbps,
                       fetch_slots=opts.fetch_slots, mode=Mode.DEMAND_FIRST, tls=tls)  # fmt: skip


class InstantRestore:
    """One instant restore. ``run()`` drives the phases; the VM and agent stay reachable after it."""

    def __init__(
        self, repo: Repository, opts: RestoreOptions, on_status: Callable[[Status], None] | None = None
    ) -> None:
        # absolute paths: the state file must work for a --resume run from any directory
        opts = replace(opts, dest=opts.dest.absolute(), cache_dir=opts.cache_dir.absolute())
        self.repo = repo
        self.opts = opts
        self.on_status = on_status
        self.point = repo.get_point(opts.vm, opts.point)
        self.name = opts.name or self.point.vm
        self.report = RestoreReport(vm=self.point.vm, point=self.point.id, mode="instant", name=self.name)
        self.agent: MediaAgent | None = None
        self.served: ServedPoint | None = None  # this restore's point on the agent (which may serve others)
        self._shared_agent = False
        self._driver: Hypervisor | None = None  # opened by plan(); self.vm once launched
        self.vm: Hypervisor | None = None
        self.phase = "plan"
        self._t0 = time.monotonic()
        self._phase_t0 = self._t0
        self._placement: Placement | None = None
        self._created: list[Path] = []  # files this restore made; removed if it is aborted
        self._adopted = False
        self._spec: VmSpec | None = None
        self._relocation_fraction = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.nbd_port = 0
        self.agent_shared_with: list[str] = []  # the other VMs of a mass restore (their state files say)
        self._resume_state: dict[str, Any] | None = None

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
        if self.on_status is None or self.served is None:
            return
        m = self.served.metrics
        elapsed = time.monotonic() - self._t0
        cached = sum(e.read_cache.present for e in self.served.exports.values())
        alloc = sum(e.manifest.allocated_count for e in self.served.exports.values())
        self.on_status(Status(
            name=self.name, phase=self.phase, elapsed_s=elapsed, relocated_fraction=self._relocation_fraction,
            hit_rate=m.hit_rate, fetched_bytes=m.bytes_fetched, fetched_stored_bytes=m.bytes_fetched_stored,
            fetch_mbps=m.bytes_fetched / 1e6 / max(elapsed, 1e-3), cached_blocks=cached, allocated_blocks=alloc,
        ))  # fmt: skip

    async def _ticker(self) -> None:
        while True:
            self._emit()
            await asyncio.sleep(0.5)

    def _start_agent(self, cache_dir: Path, disks: set[str]) -> MediaAgent:
        """The agent serves only the disks that run from backup (CD-ROMs were copied first)."""
        return MediaAgent(self.repo, self.point, agent_config(self.opts, cache_dir), disks=disks)

    def _use_agent(self, agent: MediaAgent, shared: bool) -> None:
        self.agent, self._shared_agent = agent, shared
        self.served = agent.served_point(self.point)

    # -- the phases ----------------------------------------------------------------------------
    async def run(self) -> RestoreReport:
        """The whole restore, on an agent of its own."""
        try:
            served = await self.plan()
            await self.copy_side_files()
            self._use_agent(self._start_agent(self.opts.cache_dir, served), shared=False)
            assert self.agent is not None
            await self.agent.listen("127.0.0.1", 0)
            await self._boot_and_relocate()
        except BaseException:
            await self.abort()
            raise
        return self.report

    async def run_on(self, agent: MediaAgent) -> RestoreReport:
        """The phases after planning, on an agent that serves other VMs' points too (``MassRestore``)."""
        try:
            self._use_agent(agent, shared=True)
            await self._boot_and_relocate()
        except BaseException:
            await self.abort()
            raise
        return self.report

    async def plan(self) -> set[str]:
        """What to run, where its disks go, and every refusal before anything starts; returns the
        disks the agent must serve (CD-ROMs are copied instead)."""
        opts = self.opts
        # plan: what to run, where its disks go, and every refusal before anything starts
        spec = self._spec = load_spec(self.repo, self.point, opts)
        kind, uri = resolve_choice(opts.hypervisor, spec)
        placement = self._placement = plan_placement(opts.dest, spec, self.point, opts.dest_format,
                                                     copy_all=False, relocate=opts.relocate)  # fmt: skip
        if opts.agent_tls_creds and kind != "qemu":
            raise LiverestoreError("--agent-tls-creds needs --hypervisor qemu: libvirt 9.0 takes NBD TLS credentials "
                                   "only from qemu.conf, for every domain")  # fmt: skip
        if opts.agent_tls_creds:
            server_context(opts.agent_tls_creds)  # unusable credentials: one line now, not a failed launch
        self._driver = open_hypervisor(kind, uri, opts.dest / f".{self.name}.vm", opts.accel)
        self.report.hypervisor = kind
        _prepare_dest(opts.dest, self.point, placement)
        self._driver.check(spec, placement.relocated)
        log.info("restoring %s (point %s) as %s with the %s driver", self.point.vm, self.point.id, self.name, kind)
        self._created = placement.all_files
        return {d.name for d in self.point.record.disks if d.name not in placement.copied}

    async def copy_side_files(self) -> None:
        assert self._placement is not None
        await restore_side_files(self.repo, self.point, self._placement, self.opts, self.report)

    async def _boot_and_relocate(self) -> None:
        opts, vm, spec, placement = self.opts, self._driver, self._spec, self._placement
        assert self.agent is not None and self.served is not None
        assert vm is not None and spec is not None and placement is not None
        exports = self.served.exports
        self.report.cache_blocks_at_start = sum(e.read_cache.present for e in exports.values())
        self.report.cache_start = "warm" if self.report.cache_blocks_at_start else "cold"
        port = self.nbd_port = self.agent.port
        self._tasks.append(asyncio.create_task(self._ticker()))
        block_size = self.repo.block_size
        stored_profile = self.repo.get_profile(self.point.vm) if opts.use_profile else None
        plan = profiles.profile_blocks(stored_profile, block_size)
        self.report.profile_blocks = sum(len(b) for b in plan.values())

        # prefetch: set 1
        self._enter("prefetch")
        futs = []
        for disk, blocks in plan.items():
            if (e := self._export_of(disk)) is not None:
                futs += e.prefetch([b for b in blocks if b < e.manifest.block_count], FetchClass.PREFETCH)
        if futs:
            _done, pending = await asyncio.wait(futs, timeout=opts.prefetch_budget_s)
            if pending:
                log.warning("profile prefetch budget of %.0f s used up; %d blocks left to fetch on demand",
                            opts.prefetch_budget_s, len(pending))  # fmt: skip
            self.report.profile_prefetched = sum(
                1
                for disk, blocks in plan.items()
                if (e := self._export_of(disk)) is not None
                for b in blocks
                if b < e.manifest.block_count and e.present(b)
            )

        # launch
        self._enter("launch")
        launched = time.monotonic()
        self.vm = vm
        attachments = [
            DiskAttachment(
                name=e.manifest.name, size=e.size, nbd_host="127.0.0.1", nbd_port=port, export=name,
                overlay=vm.workdir / f"{e.manifest.name}.overlay.qcow2", tls_creds=opts.agent_tls_creds,
            )
            for name, e in exports.items()
        ] + [
            DiskAttachment(name=n, size=p.stat().st_size, local_path=p) for n, p in placement.copied.items()
        ]  # fmt: skip
        await vm.launch(spec, attachments, nvram=placement.nvram)
        self.report.vm_identity = vm.describe()
        self.report.serial_log = str(vm.serial_log)
        if opts.relocate:
            self._save_state("running-from-backup")
        booted, how = await wait_for_boot(vm, self.served.metrics, opts, launched)
        self.report.boot_detected_by = how
        self.report.time_to_boot_s = round(booted - self._t0, 3)
        self.report.boot_after_launch_s = round(booted - launched, 3)
        boot_events = self.agent.recorder.since(launched, booted, exports.keys())
        self.report.boot_reads = len(boot_events)
        self.report.boot_reads_from_cache = sum(e.hit for e in boot_events)
        self.report.boot_io_stall_s = round(stalled_seconds(boot_events), 3)
        if opts.record_profile:
            sizes = {n: e.block_size for n, e in exports.items()}
            trace = {n.split("/", 1)[1]: b for n, b in profiles.blocks_from_trace(boot_events, sizes).items()}
            merged = profiles.merge_run(self.repo.get_profile(self.point.vm), trace, block_size)
            self.repo.put_profile(self.point.vm, merged)
        log.info("guest up %.2f s after launch (%.2f s after start; %s)", booted - launched, booted - self._t0, how)

        # run: set 2
        self._enter("run")
        if opts.background_prefetch:
            for e in exports.values():
                self.report.background_queued += start_background(e)
        if not opts.relocate:
            self._finish_phase()
            self._collect()
            return
        if opts.run_seconds > 0:
            await asyncio.sleep(opts.run_seconds)

        await self._relocate_and_pivot(restart_mirror=True)

    def _save_state(self, state: str) -> None:
        """Everything ``--resume`` needs to pick up a VM whose orchestrator died (absolute paths)."""
        assert self.vm is not None and self.served is not None and self._placement is not None
        spec = self._spec
        assert spec is not None
        _write_state(
            self.opts.dest, self.name, state, point=self.point.id, source_vm=self.point.vm,
            hypervisor=self.vm.kind, driver=self.vm.state(), nbd_port=self.nbd_port,
            agent_tls_creds=str(self.opts.agent_tls_creds) if self.opts.agent_tls_creds else None,
            cache_dir=str(self.opts.cache_dir), spec_xml=spec.domain_xml or bare_domain_xml(spec),
            files=[str(p) for p in self._placement.all_files],
            disks=[{"name": e.manifest.name, "size": e.size, "export": n,
                    "overlay": str(self.vm.workdir / f"{e.manifest.name}.overlay.qcow2"),
                    "final": str(self._placement.relocated[e.manifest.name])}
                   for n, e in self.served.exports.items()],
            copied={n: str(p) for n, p in self._placement.copied.items()},
            agent_shared_with=self.agent_shared_with,
        )  # fmt: skip

    def _export_of(self, disk: str) -> DiskExport | None:
        assert self.served is not None
        return next((e for e in self.served.exports.values() if e.manifest.name == disk), None)

    async def _relocate_and_pivot(self, restart_mirror: bool) -> None:
        assert self.agent is not None and self.served is not None
        assert self.vm is not None and self._placement is not None
        # relocate: set 3
        self._enter("relocate")
        scheduled = False
        while True:
            try:
                if restart_mirror:
                    await self.vm.start_relocation(self._placement.relocated, self.opts.dest_format)
                self._save_state("relocating")
                if not scheduled:
                    self._schedule_relocation()
                    scheduled = True
                await self._mirror_until_ready()
                break
            except LiverestoreError as e:
                if not self.vm.running:
                    raise
                await self._relocation_failed(e)
                restart_mirror = True

        # pivot
        self._enter("pivot")
        await self._pivot()

    def _schedule_relocation(self) -> None:
        """Set 2 gives way; guest reads and set 3, a window ahead of the mirror, share the slots."""
        assert self.agent is not None and self.served is not None
        self.agent.scheduler.cancel_queued(FetchClass.PREFETCH, self.point.id)
        self.agent.set_mode(Mode.FAIR, self.point)
        log.info("%s: scheduler fair for its point: guest reads and relocation copies share the repository",
                 self.name)  # fmt: skip
        for e in self.served.exports.values() if self.opts.relocation_prefetch else ():
            self._tasks.append(asyncio.create_task(RelocationPrefetcher(e).run()))

    async def _mirror_until_ready(self) -> None:
        """Follow the copies until every one is ready to pivot; a failed one raises."""
        assert self.vm is not None
        targets = self.vm.relocation_targets()
        writeback: asyncio.Future[int] | None = None
        while True:
            jobs = await self.vm.relocation_progress()
            # the flush before "ready" then finds little; never waited for: on a slow destination
            # it may block while the device's queue is full, and a poll must not
            if writeback is None or writeback.done():
                writeback = asyncio.ensure_future(asyncio.to_thread(start_writeback, targets))
            total = sum(j.length for j in jobs)
            self._relocation_fraction = sum(j.offset for j in jobs) / total if total else 1.0
            if all(j.ready for j in jobs):
                break
            if not self.vm.running:
                raise LiverestoreError("the VM stopped during relocation")
            await asyncio.sleep(0.2)

    async def _relocation_failed(self, error: LiverestoreError) -> None:
        """A relocation that fails (a destination that filled up, a failing disk) does not take
        the VM with it: the guest has run from the backup since launch, and stopping it would
        lose what it wrote since and take it down a second time. The copies are cancelled and
        their partial files removed, the VM goes on reading through the agent (a guest paused on
        a write the full disk refused runs again), and once the destination has room for the
        disks, relocation starts over, most of its blocks in the read-cache by then. Ctrl-C
        still stops the VM, as before a relocation."""
        assert self.vm is not None
        self.report.relocation_failures.append(str(error))
        # a failure that room does not cure (a chunk the backup lost) comes back: later each time
        delay = min(RELOCATION_RETRY_S * 2 ** (len(self.report.relocation_failures) - 1), RELOCATION_RETRY_MAX_S)
        log.warning("%s; %s keeps running from the backup, and its relocation starts again in %.0f s, or once %s "
                    "has room for its disks (Ctrl-C stops the VM)", error, self.name, delay, self.opts.dest)  # fmt: skip
        await self.vm.abort_relocation()
        self._relocation_fraction = 0.0
        try:
            self._save_state("running-from-backup")
        except OSError as e:  # the full disk may refuse this too: the VM matters more
            log.warning("cannot record the restore's state in %s: %s", self.opts.dest, e.strerror)
        while True:
            await asyncio.sleep(delay)
            if not self.vm.running:
                raise LiverestoreError(f"the VM stopped while its relocation waited to start again ({error})")
            free, need = _room(self.opts.dest, self.point)
            if free < need:
                log.warning("%s: %s has %.0f MiB free, its disks need %.0f MiB; still running from the backup",
                            self.name, self.opts.dest, free / 2**20, need / 2**20)  # fmt: skip
                delay = min(2 * delay, RELOCATION_RETRY_MAX_S)
                continue
            if await self.vm.resume_after_io_error():
                log.warning("%s was paused on a write its full disk refused; it runs again", self.name)
            log.warning("%s: starting its relocation again (%d failed so far)", self.name,
                        len(self.report.relocation_failures))  # fmt: skip
            return

    async def run_from_backup(self, poll_s: float = 1.0) -> None:
        """Until the VM stops, while it runs from the backup (``--no-relocate``): a guest its
        hypervisor paused on a write that the full disk under its overlay refused runs again
        once that disk has room. It lost nothing, but it stayed paused, its service down, until
        someone noticed and resumed it by hand. Resuming it with no room only pauses it again at
        its next write, so it waits for ``ROOM_TO_RESUME`` free bytes, and says once where."""
        assert self.vm is not None
        vm, told, failing = self.vm, False, False
        while vm.running:
            await asyncio.sleep(poll_s)
            try:
                paused = await vm.paused_on_io_error()
                failing = False
                if not paused:
                    continue
                free = shutil.disk_usage(vm.workdir).free
                if free < ROOM_TO_RESUME:
                    if not told:
                        log.warning("%s is paused: its disk writes go to %s, which is full (%.0f MiB free); it runs "
                                    "again by itself once %.0f MiB are free there", self.name, vm.workdir,
                                    free / 2**20, ROOM_TO_RESUME / 2**20)  # fmt: skip
                        told = True
                    continue
                if await vm.resume_after_io_error():
                    log.warning("%s runs again (%.0f MiB free in %s)", self.name, free / 2**20, vm.workdir)
                told = False
            except (LiverestoreError, OSError) as e:  # the VM stopping under the query, mostly
                if vm.running and not failing:  # said once, not at every look
                    log.warning("%s: cannot tell whether it is paused on a full disk: %s", self.name, e)
                failing = True

    async def _pivot(self) -> None:
        assert self.vm is not None and self._placement is not None and self.served is not None
        await self.vm.pivot()
        self.report.destinations = {n: str(p) for n, p in {**self._placement.relocated,
                                                           **self._placement.copied}.items()}  # fmt: skip
        self.report.relocated = True
        self.report.vm_identity = self.vm.describe()
        _write_state(self.opts.dest, self.name, "complete", point=self.point.id, hypervisor=self.vm.kind,
                     disks=self.report.destinations)  # fmt: skip
        self._collect()
        cache_dir = self.served.cache_dir
        await self.release_agent()
        if not self.opts.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)  # retention: a relocated VM needs no read-cache
            log.info("read-cache %s removed (the disks are on primary storage now)", cache_dir)
        self._finish_phase()

    async def resume(self) -> RestoreReport:
        """Pick up a restore whose orchestrator died: same cache, same NBD port (QEMU reconnects
        to it), the running copy jobs if they survived, else fresh ones; then pivot. A VM it
        cannot adopt is left exactly as it is."""
        st = self.load_resume_state()
        unfinished = [n for n in st.get("agent_shared_with", []) if needs_agent(self.opts.dest, n)]
        if unfinished:
            names = " ".join(f"--vm {n}" for n in [self.name, *unfinished])
            raise LiverestoreError(f"{self.name} was restored together with {', '.join(unfinished)} from one agent: "
                                   f"resume them together (restore --resume {names} --dest {self.opts.dest})")  # fmt: skip
        disks = {d["name"] for d in st["disks"]}
        try:
            self._use_agent(self._start_agent(Path(st["cache_dir"]), disks), shared=False)
            assert self.agent is not None
            await self.agent.listen("127.0.0.1", int(st["nbd_port"]))
        except BaseException:
            await self.release_agent()
            raise
        return await self.resume_on(self.agent, shared=False)

    def load_resume_state(self) -> dict[str, Any]:
        """Read and check the state file, find the VM's hypervisor object; starts nothing."""
        path = state_path(self.opts.dest, self.name)
        try:
            st: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LiverestoreError(f"nothing to resume: {path} is missing or unreadable") from None
        if st.get("state") == "complete":
            raise LiverestoreError(f"the restore of {self.name} in {self.opts.dest} is already complete")
        if st.get("state") not in ("running-from-backup", "relocating") or "driver" not in st:
            raise LiverestoreError(f"the restore in {self.opts.dest} is {st.get('state')}; start a new one")
        self.point = self.repo.get_point(st["source_vm"], st["point"])
        self.report.point, self.report.mode = self.point.id, "instant-resumed"
        spec = self._spec = parse_domain(st["spec_xml"])
        self._placement = Placement({d["name"]: Path(d["final"]) for d in st["disks"]},
                                    {n: Path(p) for n, p in st.get("copied", {}).items()},
                                    Path(st["driver"]["nvram"]) if st["driver"].get("nvram") else None)  # fmt: skip
        if st.get("agent_tls_creds"):  # the VM's NBD connections expect the agent on TLS again
            self.opts.agent_tls_creds = Path(st["agent_tls_creds"])
        disks = [DiskAttachment(name=d["name"], size=d["size"], nbd_host="127.0.0.1", nbd_port=st["nbd_port"],
                                export=d["export"], overlay=Path(d["overlay"]), tls_creds=self.opts.agent_tls_creds)
                 for d in st["disks"]]  # fmt: skip
        disks += [DiskAttachment(name=n, size=p.stat().st_size if p.exists() else 0, local_path=p)
                  for n, p in self._placement.copied.items()]  # fmt: skip
        self.vm = adopt_hypervisor(st["hypervisor"], st["driver"], spec, disks)
        self.report.hypervisor = self.vm.kind
        self.report.serial_log = str(self.vm.serial_log)
        self._resume_state = st
        return st

    async def resume_on(self, agent: MediaAgent, shared: bool = True) -> RestoreReport:
        """Adopt the VM ``load_resume_state`` found, on an agent listening on its old port."""
        assert self.vm is not None and self._resume_state is not None
        st = self._resume_state
        try:
            self._use_agent(agent, shared)
            self.nbd_port = agent.port
            log.info("agent back on port %d; %s reconnects to it", self.nbd_port, self.name)
            await self.vm.connect()
            self._adopted = True
            self.report.vm_identity = self.vm.describe()
            self.phase = "run"
            healthy = False
            if st["state"] == "relocating":
                try:
                    healthy = all(not j.failed for j in await self.vm.relocation_progress(raise_on_failure=False))
                except LiverestoreError:
                    healthy = False
                if not healthy:
                    log.warning("the copy jobs of %s did not survive the interruption; starting them again", self.name)
                    await self.vm.abort_relocation()
            await self._relocate_and_pivot(restart_mirror=not healthy)
        except BaseException:
            if self._adopted:
                await self._abort_resume()
            else:
                await self.release_agent()
            raise
        return self.report

    async def _abort_resume(self) -> None:
        """A resume that fails after adopting the VM cancels its copy but keeps the VM running from
        backup: the guest's state matters more than the restore; ``--resume`` can be tried again."""
        log.warning("resume of %s failed in phase %s; the VM keeps running from backup", self.name, self.phase)
        if self.vm is not None and self.phase in ("relocate", "pivot") and not self.report.relocated:
            with contextlib.suppress(Exception):
                await self.vm.abort_relocation()
        await self.release_agent()
        if self.vm is not None:
            await self.vm.close()

    def _collect(self) -> None:
        assert self.served is not None
        m = self.served.metrics
        r = self.report
        r.bytes_fetched += m.bytes_fetched
        r.bytes_fetched_stored += m.bytes_fetched_stored
        r.blocks_fetched += m.blocks_fetched
        r.repository_requests += round(m.requests)
        r.reads, r.reads_from_cache, r.reads_from_repository = m.reads, m.read_hits, m.read_misses
        r.hit_rate = round(m.hit_rate, 4)
        r.read_latency_p50_ms = m.guest_latency.percentile(0.5)
        r.read_latency_p99_ms = m.guest_latency.percentile(0.99)
        r.bulk_read_latency_p99_ms = m.bulk_latency.percentile(0.99)
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
            if self._shared_agent:  # the other VMs' restores go on reading from it
                await self.agent.release(self.point)
            else:
                await self.agent.close()
            self.agent, self.served = None, None

    async def abort(self) -> None:
        """Stop the VM this restore started (a transient libvirt domain disappears with it) and
        remove every file it made, so nothing incomplete looks done."""
        log.info("restore aborted in phase %s", self.phase)
        if self.vm is not None and self.phase in ("relocate", "pivot") and not self.report.relocated:
            with contextlib.suppress(Exception):
                await self.vm.abort_relocation()
        if self.vm is not None and not self.report.relocated:
            with contextlib.suppress(Exception):
                await self.vm.stop()
        await self.release_agent()
        if not self.report.relocated:
            for p in self._created:
                p.unlink(missing_ok=True)
                p.with_name(p.name + ".partial").unlink(missing_ok=True)
        if self.vm is not None and self.opts.relocate and not self.report.relocated:
            _write_state(self.opts.dest, self.name, "aborted", point=self.point.id, phase=self.phase)
        if self.vm is not None:
            with contextlib.suppress(Exception):
                await self.vm.close()

    async def close(self, stop_vm: bool = True, shutdown_timeout: float = 0) -> None:
        """Stop the VM (ACPI first when ``shutdown_timeout``) or leave it running, then release the
        agent. In that order: a VM not relocated (``--no-relocate``) still reads its disks from the
        agent while its guest shuts down, and a guest whose disks vanish under it fails its reads.
        Interrupted while the guest takes its time, a VM still on the backup is forced off (its
        agent is about to go); a relocated one is left running on primary storage."""
        try:
            if self.vm is not None and stop_vm:
                try:
                    if shutdown_timeout > 0:
                        await self.vm.shutdown(shutdown_timeout)
                    else:
                        await self.vm.stop()
                except asyncio.CancelledError:
                    if not self.report.relocated:
                        await self.vm.stop()
                    raise
        finally:
            await self.release_agent()
            if self.vm is not None:
                await self.vm.close()


async def wait_for_boot(vm: Hypervisor, reads: Metrics | None, opts: RestoreOptions,
                        launched: float) -> tuple[float, str]:
    """When the guest counts as up, and how that was told: its marker on the console; else the
    guest agent answering, or its reads from the backup going quiet; else the end of the window."""
    if opts.boot_marker:
        return await vm.wait_for_console(opts.boot_marker, opts.boot_timeout_s), "console marker"
    deadline = launched + opts.boot_window_s
    while (now := time.monotonic()) < deadline:
        if await vm.guest_agent_ready():
            return time.monotonic(), "guest agent"
        last = reads.last_read_at if reads is not None else None
        if last is not None and last > launched and now - last >= opts.boot_quiet_s:
            return last, f"guest reads quiet for {opts.boot_quiet_s:g} s"
        if not vm.running:
            raise LiverestoreError("the VM stopped while booting")
        await asyncio.sleep(0.25)
    return deadline, f"boot window ({opts.boot_window_s:g} s)"


async def classic_restore(repo: Repository, opts: RestoreOptions) -> tuple[RestoreReport, Hypervisor]:
    """The baseline: copy every block to the destination first, then boot from the local copy."""
    opts = replace(opts, dest=opts.dest.absolute())
    point = repo.get_point(opts.vm, opts.point)
    spec = load_spec(repo, point, opts)
    kind, uri = resolve_choice(opts.hypervisor, spec)
    report = RestoreReport(vm=point.vm, point=point.id, mode="classic", name=spec.name, hypervisor=kind)
    t0 = time.monotonic()
    placement = plan_placement(opts.dest, spec, point, opts.dest_format, copy_all=True)
    _prepare_dest(opts.dest, point, placement)
    vm = open_hypervisor(kind, uri, opts.dest / f".{spec.name}.vm", opts.accel)
    vm.check(spec, {})
    try:
        await restore_side_files(repo, point, placement, opts, report)
    except BaseException:
        for p in placement.all_files:
            p.unlink(missing_ok=True)
        raise
    report.phases["restore"] = round(time.monotonic() - t0, 3)
    attachments = [DiskAttachment(name=n, size=p.stat().st_size, local_path=p) for n, p in placement.copied.items()]
    launched = time.monotonic()
    await vm.launch(spec, attachments, nvram=placement.nvram)
    await vm.persist()
    booted, how = await wait_for_boot(vm, None, opts, launched)
    report.boot_detected_by = how
    report.phases["launch"] = round(booted - launched, 3)
    report.time_to_boot_s = round(booted - t0, 3)
    report.boot_after_launch_s = round(booted - launched, 3)
    report.destinations = {n: str(p) for n, p in placement.copied.items()}
    report.relocated = True
    report.serial_log = str(vm.serial_log)
    report.vm_identity = vm.describe()
    return report, vm
