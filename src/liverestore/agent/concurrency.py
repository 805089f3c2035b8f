"""How many repository fetches to keep in flight: as many as the link needs, and no more.

Latency x bandwidth decides it (Little's law): a 50 ms link moving 64 KiB objects needs about a
hundred fetches in flight to fill 1 Gbit/s, a 1 ms link a handful — and any more than the link
can carry only wait in its queue, delaying the guest's next read. Neither number is known in
advance, but every fetch reports one sample of latency. While recent latency stays near the
lowest latency seen (the link's own), there is room and the limit grows (by about its square
root, so it finds a hundred quickly); when recent latency rises above it, requests are queueing
and the limit shrinks in proportion. This is the gradient rule of Netflix's concurrency-limits
(Gradient2), measured against the minimum, which drifts up slowly so a link that became slower
for good is learned again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdaptiveLimit:
    limit: float = 32.0
    minimum: int = 4
    maximum: int = 256
    tolerance: float = 2.0  # recent latency up to this many times the base one is no queueing
    smoothing: float = 0.2
    _base: float = 0.0  # the link's own latency: the lowest seen, drifting up slowly
    _short: float = 0.0  # recent latency (fast moving average)
    samples: int = 0

    def sample(self, latency_s: float, inflight: int) -> int:
        """Feed one fetch's latency and how many were in flight when it started; the new limit."""
        self.samples += 1
        if self.samples == 1:
            self._base = self._short = latency_s
        else:
            self._short += (latency_s - self._short) * 0.1
            self._base = min(latency_s, self._base + (latency_s - self._base) * 0.001)
        gradient = max(0.5, min(1.0, self.tolerance * self._base / max(self._short, 1e-9)))
        target = self.limit * gradient + math.sqrt(self.limit)
        if inflight < self.limit / 2 and target > self.limit:
            target = self.limit  # the fetches do not use the limit we have: nothing says more would help
        self.limit += (target - self.limit) * self.smoothing
        self.limit = min(float(self.maximum), max(float(self.minimum), self.limit))
        return int(self.limit)

    def snapshot(self) -> dict[str, float]:
        return {"limit": round(self.limit, 1), "base_latency_ms": round(1000 * self._base, 2),
                "recent_latency_ms": round(1000 * self._short, 2)}  # fmt: skip
