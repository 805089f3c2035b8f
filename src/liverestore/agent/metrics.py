"""Agent counters: cache hits, repository traffic, read latency. Cheap enough for the hot path."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# latency histogram bucket upper bounds in milliseconds
_BOUNDS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


@dataclass
class LatencyHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS_MS))
    total: int = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS_MS, seconds * 1000)] += 1
        self.total += 1

    def percentile(self, q: float) -> float:
        """Upper bound (ms) of the bucket holding the q-th quantile; 0 when empty."""
        if not self.total:
            return 0.0
        need, seen = q * self.total, 0
        for bound, n in zip(_BOUNDS_MS, self.counts, strict=True):
            seen += n
            if seen >= need:
                return bound
        return _BOUNDS_MS[-1]

    def as_dict(self) -> dict[str, object]:
        return {
            "buckets_ms": {
                ("inf" if b == float("inf") else str(b)): n
                for b, n in zip(_BOUNDS_MS, self.counts, strict=True)
                if n
            },
            "p50_ms": self.percentile(0.5),
            "p99_ms": self.percentile(0.99),
        }


@dataclass
class Metrics:
    started: float = field(default_factory=time.monotonic)
    reads: int = 0
    read_bytes: int = 0
    read_hits: int = 0
    read_misses: int = 0
    read_errors: int = 0
    writes: int = 0
    write_bytes: int = 0
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    bytes_fetched_stored: int = 0
    fetch_errors: int = 0
    fetched_by_class: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_sum: float = 0.0

    def record_read(self, length: int, hit: bool, seconds: float) -> None:
        self.reads += 1
        self.read_bytes += length
        if hit:
            self.read_hits += 1
        else:
            self.read_misses += 1
        self.latency.add(seconds)
        self.latency_sum += seconds

    def record_fetch(self, cls: str, raw: int, stored: int) -> None:
        self.blocks_fetched += 1
        self.bytes_fetched += raw
        self.bytes_fetched_stored += stored
        self.fetched_by_class[cls] = self.fetched_by_class.get(cls, 0) + 1

    @property
    def hit_rate(self) -> float:
        return self.read_hits / self.reads if self.reads else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "reads": self.reads,
            "read_bytes": self.read_bytes,
            "read_hits": self.read_hits,
            "read_misses": self.read_misses,
            "read_errors": self.read_errors,
            "hit_rate": round(self.hit_rate, 4),
            "writes": self.writes,
            "write_bytes": self.write_bytes,
            "blocks_fetched": self.blocks_fetched,
            "bytes_fetched": self.bytes_fetched,
            "bytes_fetched_stored": self.bytes_fetched_stored,
            "fetch_errors": self.fetch_errors,
            "fetched_by_class": dict(self.fetched_by_class),
            "read_latency_avg_ms": round(1000 * self.latency_sum / self.reads, 3) if self.reads else 0.0,
            "read_latency": self.latency.as_dict(),
        }
