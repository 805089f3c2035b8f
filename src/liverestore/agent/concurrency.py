"""How many repository fetches to keep in flight: as many as the link needs, and no more.

Latency x bandwidth decides it (Little's law): a 50 ms link moving 64 KiB objects needs about a
hundred fetches in flight to fill 1 Gbit/s, a 1 ms link a handful — and any more than the link
can carry only wait in its queue, delaying the guest's next read. Neither number is known in
advance, but every fetch reports one sample of latency. While recent latency stays near the
link's own latency (the base), there is room and the limit grows (by about its square root, so
it finds a hundred quickly); when recent latency rises above it, requests are queueing and the
limit shrinks in proportion. This is the gradient rule of Netflix's concurrency-limits
(Gradient2).

The base is the lowest latency seen, and it never drifts up with the samples: under a load that
keeps the link busy every sample carries some queue, a base that followed them rose with the
queue, the limit rose with the base, and the queue with the limit. With 15 bulk readers on a
10 ms link the base climbed to 71 ms in seconds and the limit to 256; a guest booting beside
them waited 100 ms per read. Instead, as BBR does (ProbeRTT), when no sample has come near the
base for ``probe_every_s`` the limit drops to its minimum for a moment, the link's queue drains,
and the latency of the fetches started in that moment is the base again, higher or lower: so a
link that became slower for good is still learned, within seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

RUN_FLOOR_FETCHES = 32  # on packs, never fewer fetches in flight than this ...
RUN_FLOOR_BYTES = 4 * 1024 * 1024  # ... or than this many bytes of blocks, where blocks are small


@dataclass
class AdaptiveLimit:
    limit: float = 32.0
    minimum: int = 4
    maximum: int = 256
    tolerance: float = 2.0  # recent latency up to this many times the base one is no queueing
    probe_every_s: float = 10.0  # the base is measured again when no sample came near it for this long
    probe_s: float = 0.2  # how long a probe holds the limit at its minimum (longer on a slower link)
    _base: float = 0.0  # the link's own latency: the lowest seen since the last probe
    _base_seen: float = 0.0  # when a sample last came within ``CONFIRMS`` of the base
    _short: float = 0.0  # recent latency: the mean of the last round trip's samples
    _round_start: float = 0.0  # the round trip now being sampled: since when, and its samples
    _round_sum: float = 0.0
    _round_count: int = 0
    _round_inflight: int = 0
    _probe_start: float | None = None  # while probing: when it began
    _probe_base: float = math.inf  # while probing: the lowest latency of a fetch started in it
    _limit_before_probe: float = 0.0
    samples: int = 0
    probes: int = 0

    CONFIRMS = 1.25  # a sample within this factor of the base shows the base still holds

    def sample(self, latency_s: float, inflight: int, now: float | None = None) -> int:
        """Feed one fetch's latency and how many were in flight when it started; the new limit."""
        now = time.monotonic() if now is None else now
        self.samples += 1
        if self.samples == 1:
            self._base = self._short = latency_s
            self._base_seen = self._round_start = now
        if self._probe_start is not None:
            return self._probing(latency_s, now)
        if latency_s <= self._base * self.CONFIRMS:
            self._base = min(self._base, latency_s)
            self._base_seen = now
        elif now - self._base_seen > self.probe_every_s:
            self._probe_start, self._probe_base, self._limit_before_probe = now, math.inf, self.limit
            self.probes += 1
            return self.minimum
        self._round_sum += latency_s
        self._round_count += 1
        self._round_inflight = max(self._round_inflight, inflight)
        if now - self._round_start >= self._short:
            self._end_round(now)
        return int(self.limit)

    def _end_round(self, now: float) -> None:
        """One step of the limit per round trip, from that round's mean latency. A step on every
        sample (2,000 a second on a busy 10 ms link) moved the limit many times before the
        latency of its first step came back, and it swung between 6 and 100 every 1.6 s."""
        self._short = self._round_sum / self._round_count
        allowed = max(self.tolerance * self._base, 1e-9)
        gradient = max(0.5, min(1.0, allowed / max(self._short, 1e-9)))
        # Far below the allowed latency the link has room to spare: grow in proportion to it (up
        # to half the limit a round trip) rather than by the square root alone, which took 15
        # round trips (1.2 s on a 50 ms link) to go from 32 to the 200 a relocation needs.
        headroom = max(0.0, 1.0 - self._short / allowed)
        target = self.limit * (gradient + headroom) + math.sqrt(self.limit)
        if self._round_inflight < self.limit / 2 and target > self.limit:
            target = self.limit  # the fetches do not use the limit we have: nothing says more would help
        self.limit = min(float(self.maximum), max(float(self.minimum), target))
        self._round_start, self._round_sum, self._round_count, self._round_inflight = now, 0.0, 0, 0

    def _probing(self, latency_s: float, now: float) -> int:
        """Hold the minimum until a fetch started inside the probe has answered and ``probe_s``
        (or two base latencies, on a slow link) has passed; then that fetch's latency is the base."""
        assert self._probe_start is not None
        if now - latency_s >= self._probe_start:
            self._probe_base = min(self._probe_base, latency_s)
        if self._probe_base < math.inf and now - self._probe_start >= max(self.probe_s, 2 * self._base):
            self._base = self._short = self._probe_base
            self._base_seen = self._round_start = now
            self._round_sum, self._round_count, self._round_inflight = 0.0, 0, 0
            self._probe_start = None
            self.limit = self._limit_before_probe
            return int(self.limit)
        return self.minimum

    @classmethod
    def for_source(cls, block_size: int, shared_requests: bool) -> AdaptiveLimit:
        """The limit for fetches from a repository of ``block_size`` blocks. Where neighbouring
        blocks share one ranged request (packs, in a directory or on S3) a fetch also waits on
        the agent's own decoding, and on 2 cores on the S3 server's too: the limit read that as a
        queue on the link and shrank, to 7 blocks at 1 MiB on SeaweedFS, and runs split into
        requests of 1-3 blocks. So there it never goes under ``RUN_FLOOR_FETCHES``, or
        ``RUN_FLOOR_BYTES`` of blocks where that is more. Where every block pays its own round
        trip (the emulated link, like a store of one object per chunk) it may fall to a handful,
        so a guest's read does not queue behind the agent's own."""
        per_run = min(cls.maximum, max(RUN_FLOOR_FETCHES, RUN_FLOOR_BYTES // block_size))
        floor = per_run if shared_requests else 4
        return cls(limit=max(32.0, floor), minimum=floor)

    def snapshot(self) -> dict[str, float]:
        return {"limit": round(self.limit, 1), "base_latency_ms": round(1000 * self._base, 2),
                "recent_latency_ms": round(1000 * self._short, 2), "probes": self.probes}  # fmt: skip
