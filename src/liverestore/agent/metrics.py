"""Agent counters: cache hits, repository traffic, read latency. Cheap enough for the hot path.

Read latency is kept apart by kind: *guest* reads (under 512 KiB: what a booting or working VM
issues) and *bulk* reads (512 KiB and more: QEMU's mirror during relocation, nbdcopy, qemu-img).
Mixed together, a relocation's 1 MiB mirror reads waiting on the repository would be reported
as the guest's latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BULK_READ_MIN = 512 * 1024  # the mirror's reads (see prefetch.MIRROR_READ_MIN) and copy tools'

SUB_BUCKETS = 16  # per power of two: a value is known to within 1/16 (6.25 %)
MAX_EXPONENT = 27  # 2**27 us = 134 s; slower reads land in the last bucket
PROMETHEUS_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0, 10.0)  # fmt: skip


def bucket_of(seconds: float) -> int:
    """The bucket a latency of ``seconds`` is counted in."""
    us = seconds * 1e6
    if us < 1:
        return 0
    exp = int(us).bit_length() - 1  # floor(log2(us)), without a float log
    if exp >= MAX_EXPONENT:
        return 1 + MAX_EXPONENT * SUB_BUCKETS + min(int((us / 2**MAX_EXPONENT - 1) * SUB_BUCKETS), SUB_BUCKETS - 1)
    # us / 2**exp is in [1, 2): its sixteenths past 1, in integers (every cached read passes here)
    return 1 + exp * SUB_BUCKETS + (int(us * SUB_BUCKETS) >> exp) - SUB_BUCKETS


def _upper_us(index: int) -> float:
    """The upper edge of bucket ``index`` in microseconds."""
    if index == 0:
        return 1.0
    exp, sub = divmod(index - 1, SUB_BUCKETS)
    return float(2**exp * (1 + (sub + 1) / SUB_BUCKETS))


@dataclass
class LatencyHistogram:
    """Log-linear buckets (HDR style): 16 per power of two from 1 us to 134 s, so a percentile is
    exact to 6.25 % at any scale with a fixed 450 counters."""

    counts: list[int] = field(default_factory=lambda: [0] * (2 + (MAX_EXPONENT + 1) * SUB_BUCKETS))
    total: int = 0
    sum_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.add_at(bucket_of(seconds), seconds)

    def add_at(self, bucket: int, seconds: float) -> None:
        """``add`` with its bucket already found (``bucket_of``): a read counted in two
        histograms finds it once."""
        self.counts[bucket] += 1
        self.total += 1
        self.sum_s += seconds

    def percentile(self, q: float) -> float:
        """The q-th quantile in ms (the upper edge of its bucket); 0 when empty."""
        if not self.total:
            return 0.0
        need, seen = q * self.total, 0
        for i, n in enumerate(self.counts):
            seen += n
            if n and seen >= need:
                return round(_upper_us(i) / 1000, 4)
        return round(_upper_us(len(self.counts) - 1) / 1000, 4)

    def cumulative(self, bounds_s: tuple[float, ...]) -> list[int]:
        """Counts at or under each bound (whole buckets only), for a coarser exposition."""
        out, seen, i = [], 0, 0
        for bound in bounds_s:
            while i < len(self.counts) and _upper_us(i) <= bound * 1e6:
                seen += self.counts[i]
                i += 1
            out.append(seen)
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.total,
            "mean_ms": round(1000 * self.sum_s / self.total, 3) if self.total else 0.0,
            "p50_ms": self.percentile(0.5),
            "p90_ms": self.percentile(0.9),
            "p99_ms": self.percentile(0.99),
            "max_ms": self.percentile(1.0),
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
    requests: float = 0.0  # this point's share of the ranged reads (agents serving several points share them)
    last_read_at: float | None = None  # monotonic; "boot reads went quiet" is judged per point
    fetched_by_class: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # every read
    guest_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # reads under 512 KiB
    bulk_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # mirror and copy reads

    def record_read(self, length: int, hit: bool, seconds: float, now: float | None = None) -> None:
        """``now``: when the read was answered (``time.monotonic()``), if the caller has it."""
        self.last_read_at = time.monotonic() if now is None else now
        self.reads += 1
        self.read_bytes += length
        if hit:
            self.read_hits += 1
        else:
            self.read_misses += 1
        bucket = bucket_of(seconds)
        self.latency.add_at(bucket, seconds)
        (self.bulk_latency if length >= BULK_READ_MIN else self.guest_latency).add_at(bucket, seconds)

    def record_fetch(self, cls: str, raw: int, stored: int, request_share: float = 0.0) -> None:
        self.requests += request_share
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
            "repository_requests": round(self.requests),
            "fetched_by_class": dict(self.fetched_by_class),
            "read_latency_avg_ms": round(1000 * self.latency.sum_s / self.reads, 3) if self.reads else 0.0,
            "read_latency": self.latency.as_dict(),
            "guest_read_latency": self.guest_latency.as_dict(),
            "bulk_read_latency": self.bulk_latency.as_dict(),
        }
