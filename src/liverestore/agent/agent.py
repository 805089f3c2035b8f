"""MediaAgent: the exports of one restore point, their shared scheduler, cache and counters."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from liverestore.agent.concurrency import AdaptiveLimit
from liverestore.agent.dropbehind import DropBehind
from liverestore.agent.export import DiskExport
from liverestore.agent.malloc import limit_arenas
from liverestore.agent.metrics import Metrics
from liverestore.agent.nbd.export import ExportError
from liverestore.agent.nbd.server import NbdServer
from liverestore.agent.nbd.tls import TlsPolicy
from liverestore.agent.readahead import WINDOW_BYTES
from liverestore.agent.recorder import AccessRecorder
from liverestore.agent.scheduler import FetchClass, FetchScheduler, Mode
from liverestore.agent.source import BlockSource, RepositorySource, RetryingSource, SharedChunks, emulate_link
from liverestore.errors import LiverestoreError
from liverestore.repository import Repository, RestorePoint
from liverestore.repository.backend import Handle
from liverestore.repository.leases import SERVE, Lease

log = logging.getLogger("liverestore.agent")

PERSIST_INTERVAL_S = 1.0
READAHEAD_MIN_BLOCK = 1024 * 1024  # readahead by default from this block size up (see below)
BACKGROUND_BATCH = 0.25  # on packs, background fetches start once this share of the slots is free


@dataclass
class AgentConfig:
    cache_dir: Path
    writable: bool = False
    repo_latency_ms: float = 0.0
    repo_mbps: float = 0.0
    fetch_slots: int | None = None  # None: adapt to the link (starting at 32); a number: fixed
    mode: Mode = Mode.DEMAND_FIRST
    access_log: Path | None = None
    repo_retry_s: float = 120.0  # how long a read waits for an unavailable repository
    tls: TlsPolicy | None = None  # x509 on the NBD port (STARTTLS); None: plaintext
    readahead_bytes: int | None = None  # ahead of a sequential reader (readahead.py); 0: off; None: see below
    keep_reads: bool = True  # the answered reads in memory, for a restore's boot profile (recorder.py)
    share_chunks: bool = True  # with several points: one fetch per chunk for all (source.SharedChunks)


CACHE_LOCK_NAME = ".lock"


def lock_cache_dir(path: Path) -> int:
    """Hold an exclusive ``flock`` on a cache directory for the agent's life: two agents writing
    one cache would overwrite each other's blocks. A dead holder's lock goes with its process."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / CACHE_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise LiverestoreError(f"cannot use cache directory {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LiverestoreError(f"cache directory {path} is in use by another agent or restore "
                               "(give this one another --cache-dir)") from None  # fmt: skip
    return fd


def serve_lease(repo: Repository, point: RestorePoint) -> Lease:
    """While an agent serves a point, it cannot be forgotten and its data survives a prune. The
    point must still exist once the lease is visible: a prune that began earlier kept it."""
    lease = Lease(repo, SERVE, points=[point.id],
                  manifests=[f"{d.manifest_id}:{d.manifest_size}" for d in point.record.disks]).take()  # fmt: skip
    try:
        if repo.backend.stat(Handle("points", point.id)) is None:
            raise LiverestoreError(f"restore point {point.id} of {point.vm} was forgotten meanwhile")
    except BaseException:
        lease.release()
        raise
    return lease


@dataclass
class ServedPoint:
    """One restore point an agent serves: the lease that keeps its data alive, its locked cache
    directory, its exports and the counters its restore reports."""

    point: RestorePoint
    cache_dir: Path
    lease: Lease
    metrics: Metrics = field(default_factory=Metrics)
    exports: dict[str, DiskExport] = field(default_factory=dict)
    lock_fd: int | None = None

    def close(self) -> None:
        """Close the exports and give up the cache directory (the lease is released apart: S3)."""
        for e in self.exports.values():
            e.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def export_prefixes(points: Sequence[RestorePoint]) -> list[str]:
    """``VM`` for a VM served at one point, ``VM@POINT`` for each where the same VM is served at
    several: export names stay what single-point clients know, and never collide."""
    per_vm = Counter(p.vm for p in points)
    return [p.vm if per_vm[p.vm] == 1 else f"{p.vm}@{p.id}" for p in points]


class MediaAgent:
    """Serves one or several restore points through one NBD server, one fetch scheduler, one
    fetch pool and one repository link: several VMs restored at once share the link fairly
    (each point is a scheduler tenant) instead of competing agents each taking all of it."""

    def __init__(
        self,
        repo: Repository,
        points: RestorePoint | Sequence[RestorePoint],
        config: AgentConfig,
        disks: set[str] | Mapping[str, set[str]] | None = None,
    ) -> None:
        """``disks``: which disks to serve (CD-ROMs a restore copied are not), for every point or,
        keyed by point id, for each; None serves them all."""
        points = [points] if isinstance(points, RestorePoint) else list(points)
        if not points:
            raise LiverestoreError("no restore point to serve")
        twice = [pid for pid, n in Counter(p.id for p in points).items() if n > 1]
        if twice:
            raise LiverestoreError(f"restore point {twice[0]} is given twice")
        self.repo = repo
        self.config = config
        self.recorder = AccessRecorder(config.access_log, keep=config.keep_reads)
        limit_arenas()  # before the fetch threads exist (see malloc.py)
        self.fetcher = RepositorySource(repo)
        link = emulate_link(self.fetcher, config.repo_latency_ms, config.repo_mbps)
        self.retrying = RetryingSource(link, deadline_s=config.repo_retry_s)
        # With 32 fetches in flight at least on packs (see AdaptiveLimit.for_source), a cold read
        # from SeaweedFS at 1 MiB blocks ran 1.4-1.6x as fast with under half the requests (with
        # readahead, which needs those slots to fill). At 64 KiB blocks 4 MiB (64) stays the
        # floor: 256 held 7 MiB more of the agent's memory in bench memory and went no faster.
        shared_requests = link is self.fetcher
        self.scheduler = FetchScheduler(
            slots=config.fetch_slots or 32, mode=config.mode,
            background_batch=BACKGROUND_BATCH if shared_requests else 0.0,
            adaptive=AdaptiveLimit.for_source(repo.block_size, shared_requests) if config.fetch_slots is None else None,
        )  # fmt: skip
        # Readahead by default only where it fills shared ranged requests, and only for blocks of
        # 1 MiB (the default) and up. Behind the emulated link every block pays its own round
        # trip and the link is one FIFO queue: 15 bulk readers' readahead kept it full, and a
        # guest booting beside them took 39.9 s instead of 6.4 s (bench mass_restore). At 64 KiB
        # blocks a bulk reader's own 16 requests already fill the 64-256 slots, so readahead made
        # a cold read no faster (SeaweedFS 13.4 s against 13.6 s off, directory 9.6 s against
        # 8.9 s) and its 8 MiB runs took the agent over its memory budget (76 MiB against 65).
        big_blocks = repo.block_size >= READAHEAD_MIN_BLOCK
        default_readahead = WINDOW_BYTES if shared_requests and big_blocks else 0
        self.readahead_bytes = default_readahead if config.readahead_bytes is None else config.readahead_bytes
        # One point gains nothing from sharing (its own repeats of a chunk share ranged reads
        # already), so its reads keep the shortest path.
        share = config.share_chunks and len(points) > 1
        self.sharing = SharedChunks(self.retrying) if share else None
        self.source: BlockSource = self.sharing or self.retrying
        self.drop_behind = DropBehind()
        self.served: list[ServedPoint] = []
        self.exports: dict[str, DiskExport] = {}
        try:
            for point, prefix in zip(points, export_prefixes(points), strict=True):
                wanted = disks.get(point.id) if isinstance(disks, Mapping) else disks
                self.served.append(self._serve_point(point, prefix, wanted))
            self._check_cache_space()
            self.fetcher.locate([e.manifest for e in self.exports.values()])  # now: no guest read waits for it
        except BaseException:  # undo in reverse: each point's exports, cache lock and lease
            for sp in reversed(self.served):
                sp.close()
                sp.lease.release()
            self.fetcher.close()
            if self.sharing is not None:
                self.sharing.close()
            self.drop_behind.close()
            raise
        # one point's restore reads these: its point, its counters, its cache directory
        self.point = points[0]
        self.metrics = self.served[0].metrics
        self.cache_dir = self.served[0].cache_dir
        self.server = NbdServer(self.exports, config.tls)  # the same dict: released exports leave it
        self.port = 0  # the TCP port, once listening
        self._persist_task: asyncio.Task[None] | None = None

    def _serve_point(self, point: RestorePoint, prefix: str, disks: set[str] | None) -> ServedPoint:
        sp = ServedPoint(point, self.config.cache_dir / f"{point.vm}-{point.id}", serve_lease(self.repo, point))
        try:
            sp.lock_fd = lock_cache_dir(sp.cache_dir)
            for rec in point.record.disks:
                if disks is not None and rec.name not in disks:
                    continue
                name = f"{prefix}/{rec.name}"
                sp.exports[name] = self.exports[name] = DiskExport(
                    name,
                    self.repo.load_manifest(rec),
                    rec.manifest_id,
                    sp.cache_dir,
                    self.scheduler,
                    self.source,
                    sp.metrics,
                    self.recorder,
                    writable=self.config.writable,
                    tenant=point.id,
                    drop_behind=self.drop_behind,
                    readahead_bytes=self.readahead_bytes,
                )
        except BaseException:
            for name in sp.exports:
                del self.exports[name]
            sp.close()
            sp.lease.release()
            raise
        return sp

    def _check_cache_space(self) -> None:
        """Relocation brings every allocated block through the cache: refuse to start a restore
        that would hit ENOSPC half-way, when the fix (another --cache-dir) is cheap now."""
        need = 0
        for e in self.exports.values():
            m, cache = e.manifest, e.read_cache
            if not cache.present:  # every allocated byte: no walk over millions of blocks at start
                need += m.allocated_bytes
            else:
                need += sum(m.block_length(i) for i in m.allocated_blocks() if not cache.has(i))
        st = os.statvfs(self.config.cache_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            what = "this restore point needs" if len(self.served) == 1 else f"the {len(self.served)} points need"
            raise LiverestoreError(
                f"cache directory {self.config.cache_dir} has {free / 2**20:.0f} MiB free but {what} "
                f"{need / 2**20:.0f} MiB: choose another --cache-dir"
            )

    def served_point(self, point: RestorePoint) -> ServedPoint:
        return next(sp for sp in self.served if sp.point.id == point.id)

    async def release(self, point: RestorePoint) -> None:
        """Stop serving one point (its VM has pivoted, or its restore failed) while the others go
        on: its copiers stop, its queued fetches go, its exports leave the server, its cache
        directory and lease are given up."""
        sp = self.served_point(point)
        if sp.lock_fd is None:
            return  # released before
        for e in sp.exports.values():
            await e.stop_background()
        await self.scheduler.forget(point.id)
        for name in sp.exports:
            self.exports.pop(name, None)
        await asyncio.to_thread(sp.close)  # saves the bitmaps, then gives up the cache lock
        await asyncio.to_thread(sp.lease.release)

    def export(self, name: str) -> DiskExport:
        try:
            return self.exports[name]
        except KeyError:
            raise LiverestoreError(f"no export {name!r} (have: {', '.join(self.exports)})") from None

    async def listen(self, host: str, port: int) -> int:
        """Start serving on TCP; returns the bound port (useful with port 0)."""
        try:
            bound = await self.server.listen_tcp(host, port)
        except OSError as e:
            raise LiverestoreError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        self._start_persist()
        self.port = bound
        return bound

    async def listen_unix(self, path: Path) -> None:
        try:
            await self.server.listen_unix(str(path))
        except OSError as e:
            raise LiverestoreError(f"cannot listen on {path}: {e.strerror}") from None
        self._start_persist()

    def _start_persist(self) -> None:
        if self._persist_task is None:
            self._persist_task = asyncio.create_task(self._persist_loop())

    async def _persist_loop(self) -> None:
        """Save the cache bitmaps every second. A failed save (cache disk full) is logged and
        retried next time: one error must not stop every later save."""
        failing = False
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            try:
                await self.persist()
            except (ExportError, OSError) as e:
                if not failing:
                    log.warning("cannot save the read-cache bitmap (%s); retrying every %.0f s", e, PERSIST_INTERVAL_S)
                failing = True
                continue
            if failing:
                log.warning("read-cache bitmap saved again")
            failing = False

    async def persist(self) -> None:
        for e in list(self.exports.values()):
            await e.flush()

    def set_mode(self, mode: Mode, point: RestorePoint | None = None) -> None:
        """The mode of every point, or of one (a restore relocating its own VM)."""
        self.scheduler.set_mode(mode, point.id if point is not None else None)

    def prefetch(self, export: str, blocks: Iterable[int], cls: FetchClass) -> list[asyncio.Future[None]]:
        return self.export(export).prefetch(blocks, cls)

    def status(self) -> dict[str, object]:
        def exports(sp: ServedPoint) -> dict[str, object]:
            return {
                name: {
                    "size": e.size,
                    "block_size": e.block_size,
                    "allocated_blocks": e.manifest.allocated_count,
                    "cached_blocks": e.read_cache.present,
                    "readahead_blocks": e.readahead.issued if e.readahead is not None else 0,
                    "writable": e.writable,
                }
                for name, e in sp.exports.items()
            }

        out: dict[str, object] = {
            "points": [{"vm": sp.point.vm, "point": sp.point.id, "exports": exports(sp),
                        "metrics": sp.metrics.as_dict()} for sp in self.served],
            "connections": self.server.active_connections,
            "exports": {name: info for sp in self.served for name, info in exports(sp).items()},
            "repository": {
                "available": self.retrying.available,
                "outages": self.retrying.outages,
                "retries": self.retrying.retries,
                "requests": self.fetcher.requests,
                "shared_blocks": self.sharing.shared_blocks if self.sharing is not None else 0,
            },
            "scheduler": self.scheduler.snapshot(),
        }
        if len(self.served) == 1:  # the single-point shape clients have read all along
            out.update(vm=self.point.vm, point=self.point.id, metrics=self.metrics.as_dict())
        return out

    async def close(self) -> None:
        if self._persist_task:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
        await self.server.close()
        for e in self.exports.values():
            await e.stop_background()
        await self.scheduler.close()
        if self.sharing is not None:
            self.sharing.close()
        self.fetcher.close()
        self.drop_behind.close()
        self.recorder.close()
        for sp in self.served:
            if sp.lock_fd is None:
                continue  # closed before
            sp.close()  # releases the cache directory's lock
            await asyncio.to_thread(sp.lease.release)
