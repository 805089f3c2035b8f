"""MediaAgent: the exports of one restore point, their shared scheduler, cache and counters."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from liverestore.agent.concurrency import AdaptiveLimit
from liverestore.agent.export import DiskExport
from liverestore.agent.malloc import limit_arenas
from liverestore.agent.metrics import Metrics
from liverestore.agent.nbd.export import ExportError
from liverestore.agent.nbd.server import NbdServer
from liverestore.agent.nbd.tls import TlsPolicy
from liverestore.agent.recorder import AccessRecorder
from liverestore.agent.scheduler import FetchClass, FetchScheduler, Mode
from liverestore.agent.source import RepositorySource, RetryingSource, emulate_link
from liverestore.errors import LiverestoreError
from liverestore.repository import Repository, RestorePoint
from liverestore.repository.backend import Handle
from liverestore.repository.leases import SERVE, Lease

log = logging.getLogger("liverestore.agent")

PERSIST_INTERVAL_S = 1.0


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


class MediaAgent:
    def __init__(
        self, repo: Repository, point: RestorePoint, config: AgentConfig, disks: set[str] | None = None
    ) -> None:
        self.repo = repo
        self.point = point
        self.config = config
        self.metrics = Metrics()
        self.recorder = AccessRecorder(config.access_log)
        self.scheduler = FetchScheduler(
            slots=config.fetch_slots or 32, mode=config.mode,
            adaptive=AdaptiveLimit() if config.fetch_slots is None else None,
        )  # fmt: skip
        limit_arenas()  # before the fetch threads exist (see malloc.py)
        self.fetcher = RepositorySource(repo)
        self.retrying = RetryingSource(emulate_link(self.fetcher, config.repo_latency_ms, config.repo_mbps),
                                       deadline_s=config.repo_retry_s)  # fmt: skip
        self.source = self.retrying
        self.cache_dir = config.cache_dir / f"{point.vm}-{point.id}"
        self.lease = serve_lease(repo, point)
        self._lock_fd: int | None = None
        self.exports: dict[str, DiskExport] = {}
        try:
            self._lock_fd = lock_cache_dir(self.cache_dir)
            self._open_exports(disks)
            repo.chunks.index()  # read now: the first guest read must not wait for it
        except BaseException:  # undo in reverse: exports, the cache lock, the lease
            for e in self.exports.values():
                e.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self.lease.release()
            self.fetcher.close()
            raise
        self.server = NbdServer(self.exports, config.tls)
        self._persist_task: asyncio.Task[None] | None = None

    def _open_exports(self, disks: set[str] | None) -> None:
        repo, point, config, source = self.repo, self.point, self.config, self.source
        for rec in point.record.disks:
            if disks is not None and rec.name not in disks:
                continue
            manifest = repo.load_manifest(rec)
            name = f"{point.vm}/{rec.name}"
            self.exports[name] = DiskExport(
                name,
                manifest,
                rec.manifest_id,
                self.cache_dir,
                self.scheduler,
                source,
                self.metrics,
                self.recorder,
                writable=config.writable,
            )
        self._check_cache_space()

    def _check_cache_space(self) -> None:
        """Relocation brings every allocated block through the cache: refuse to start a restore
        that would hit ENOSPC half-way, when the fix (another --cache-dir) is cheap now."""
        need = sum(
            e.manifest.block_length(i) for e in self.exports.values() for i in e.manifest.allocated_blocks()
            if not e.read_cache.has(i)
        )  # fmt: skip
        st = os.statvfs(self.cache_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise LiverestoreError(
                f"cache directory {self.cache_dir} has {free / 2**20:.0f} MiB free but this restore point "
                f"needs {need / 2**20:.0f} MiB: choose another --cache-dir"
            )

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
        for e in self.exports.values():
            await e.flush()

    def set_mode(self, mode: Mode) -> None:
        self.scheduler.set_mode(mode)

    def prefetch(self, export: str, blocks: Iterable[int], cls: FetchClass) -> list[asyncio.Future[None]]:
        return self.export(export).prefetch(blocks, cls)

    def status(self) -> dict[str, object]:
        return {
            "vm": self.point.vm,
            "point": self.point.id,
            "connections": self.server.active_connections,
            "exports": {
                name: {
                    "size": e.size,
                    "block_size": e.block_size,
                    "allocated_blocks": e.manifest.allocated_count,
                    "cached_blocks": e.read_cache.present,
                    "writable": e.writable,
                }
                for name, e in self.exports.items()
            },
            "repository": {
                "available": self.retrying.available,
                "outages": self.retrying.outages,
                "retries": self.retrying.retries,
                "requests": self.fetcher.requests,
            },
            "scheduler": self.scheduler.snapshot(),
            "metrics": self.metrics.as_dict(),
        }

    async def close(self) -> None:
        if self._persist_task:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
        await self.server.close()
        for e in self.exports.values():
            await e.stop_background()
        await self.scheduler.close()
        self.fetcher.close()
        for e in self.exports.values():
            e.close()
        self.recorder.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the cache directory's lock
            self._lock_fd = None
            await asyncio.to_thread(self.lease.release)
