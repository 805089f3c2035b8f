"""Where missing blocks come from: the repository, optionally behind filters (nbdkit-style).

``ThrottledSource`` emulates a real dedup appliance or object store: a fixed latency per fetch and
a shared link bandwidth. Tests and benchmarks need it because a local directory answers in
microseconds and would hide every scheduling decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from liverestore.errors import RepositoryUnavailable
from liverestore.repository import DiskManifest, Repository

log = logging.getLogger("liverestore.source")


@dataclass(frozen=True)
class Fetched:
    data: bytes
    stored_bytes: int


class BlockSource(Protocol):
    async def fetch(self, manifest: DiskManifest, index: int) -> Fetched: ...


class RepositorySource:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    async def fetch(self, manifest: DiskManifest, index: int) -> Fetched:
        cid = manifest.blocks[index]
        assert cid is not None, "zero blocks are never fetched"
        length = manifest.block_length(index)

        def work() -> Fetched:
            return Fetched(*self.repo.chunks.fetch(cid, length))

        return await asyncio.to_thread(work)


class ThrottledSource:
    def __init__(self, inner: BlockSource, latency_ms: float = 0.0, mbps: float = 0.0) -> None:
        self.inner = inner
        self.latency = latency_ms / 1000.0
        self.bytes_per_s = mbps * 1_000_000 / 8 if mbps > 0 else 0.0
        self._link_free_at = 0.0

    async def fetch(self, manifest: DiskManifest, index: int) -> Fetched:
        if self.latency:
            await asyncio.sleep(self.latency)
        got = await self.inner.fetch(manifest, index)
        if self.bytes_per_s:
            # one shared link: transfers queue behind each other, as on a real WAN/SAN port
            now = time.monotonic()
            start = max(now, self._link_free_at)
            self._link_free_at = start + got.stored_bytes / self.bytes_per_s
            await asyncio.sleep(self._link_free_at - now)
        return got


class RetryingSource:
    """Rides out repository outages: retries unavailability with exponential backoff for up to
    ``deadline_s`` and warns while it does. Damage (a corrupt or missing chunk) is never retried:
    it will not heal, and the read must fail with EIO rather than hang."""

    def __init__(self, inner: BlockSource, deadline_s: float = 120.0, max_delay_s: float = 2.0) -> None:
        self.inner = inner
        self.deadline_s = deadline_s
        self.max_delay_s = max_delay_s
        self.outages = 0
        self.retries = 0
        self.available = True

    async def fetch(self, manifest: DiskManifest, index: int) -> Fetched:
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                got = await self.inner.fetch(manifest, index)
            except RepositoryUnavailable as e:
                waited = time.monotonic() - start
                if waited >= self.deadline_s:
                    raise
                if self.available:
                    self.available = False
                    self.outages += 1
                    log.warning("repository unavailable (%s); retrying for up to %.0f s", e, self.deadline_s)
                self.retries += 1
                await asyncio.sleep(min(delay, self.deadline_s - waited))
                delay = min(delay * 2, self.max_delay_s)
                continue
            if not self.available:
                self.available = True
                log.warning("repository is back after an outage; resuming")
            return got


def repository_source(repo: Repository, latency_ms: float = 0.0, mbps: float = 0.0) -> BlockSource:
    """The repository, behind the slow-repository emulation when one is asked for."""
    source: BlockSource = RepositorySource(repo)
    if latency_ms > 0 or mbps > 0:
        source = ThrottledSource(source, latency_ms, mbps)
    return source
