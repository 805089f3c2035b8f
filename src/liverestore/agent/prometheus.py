"""The agent's counters in Prometheus' text format, for ``GET /metrics`` on the control endpoint.

A collector reads the live ``Metrics`` and scheduler state at scrape time (nothing is counted
twice, and one process may run several agents), through ``prometheus-client``'s own exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from liverestore.agent.metrics import PROMETHEUS_BOUNDS_S, LatencyHistogram, Metrics

if TYPE_CHECKING:
    from liverestore.agent.agent import MediaAgent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _buckets(h: LatencyHistogram) -> list[tuple[str, float]]:
    counts = h.cumulative(PROMETHEUS_BOUNDS_S)
    return [(repr(b), float(n)) for b, n in zip(PROMETHEUS_BOUNDS_S, counts, strict=True)] + [("+Inf", float(h.total))]


class AgentCollector:
    def __init__(self, agent: MediaAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        """Per point (labels vm, point) what its exports did; agent-wide, without those labels,
        what the points share: the repository link and the NBD server."""
        a = self.agent
        labels = ["vm", "point"]
        points = [([sp.point.vm, sp.point.id], sp) for sp in a.served]

        def per_point(name: str, doc: str, value: Callable[[Metrics], float]) -> CounterMetricFamily:
            c = CounterMetricFamily(f"liverestore_{name}", doc, labels=labels)
            for ids, sp in points:
                c.add_metric(ids, value(sp.metrics))
            return c

        yield per_point("reads", "NBD reads served", lambda m: m.reads)
        yield per_point("read_bytes", "Bytes returned to NBD clients", lambda m: m.read_bytes)
        yield per_point("read_cache_hits", "Reads answered from the read-cache alone", lambda m: m.read_hits)
        yield per_point("read_cache_misses", "Reads that waited for the repository", lambda m: m.read_misses)
        yield per_point("read_errors", "Reads answered with an error", lambda m: m.read_errors)
        yield per_point("writes", "NBD writes into the copy-on-write area", lambda m: m.writes)
        yield per_point("repository_fetched_bytes", "Block bytes fetched from the repository",
                        lambda m: m.bytes_fetched)  # fmt: skip
        yield per_point("repository_fetch_errors", "Fetches that failed (damage or outage)", lambda m: m.fetch_errors)
        fetched = CounterMetricFamily("liverestore_repository_fetched_blocks", "Blocks fetched, by why",
                                      labels=[*labels, "class"])  # fmt: skip
        lat = HistogramMetricFamily("liverestore_read_latency_seconds",
                                    "NBD read latency; kind=guest under 512 KiB, kind=bulk (mirror, copy tools) above",
                                    labels=[*labels, "kind"])  # fmt: skip
        cached = GaugeMetricFamily("liverestore_cached_blocks", "Blocks in the read-cache", labels=[*labels, "export"])
        alloc = GaugeMetricFamily("liverestore_allocated_blocks", "Allocated blocks of the backup",
                                  labels=[*labels, "export"])  # fmt: skip
        for ids, sp in points:
            for cls, n in sorted(sp.metrics.fetched_by_class.items()):
                fetched.add_metric([*ids, cls], n)
            for kind, h in (("guest", sp.metrics.guest_latency), ("bulk", sp.metrics.bulk_latency)):
                lat.add_metric([*ids, kind], _buckets(h), h.sum_s)
            for name, e in sorted(sp.exports.items()):
                cached.add_metric([*ids, name], e.read_cache.present)
                alloc.add_metric([*ids, name], e.manifest.allocated_count)
        yield fetched
        yield lat
        yield cached
        yield alloc
        yield CounterMetricFamily("liverestore_repository_requests",
                                  "Ranged reads sent to the repository (neighbouring blocks share one)",
                                  value=a.fetcher.requests)  # fmt: skip
        yield CounterMetricFamily("liverestore_shared_blocks",
                                  "Blocks copied from another restore point's fetch of the same chunk, not fetched",
                                  value=a.sharing.shared_blocks if a.sharing is not None else 0)  # fmt: skip
        yield CounterMetricFamily("liverestore_repository_outages", "Times the repository became unreachable",
                                  value=a.retrying.outages)  # fmt: skip
        yield GaugeMetricFamily("liverestore_repository_available", "1 while the repository answers",
                                value=1.0 if a.retrying.available else 0.0)  # fmt: skip
        yield GaugeMetricFamily("liverestore_nbd_connections", "Open NBD connections", value=a.server.active_connections)


def exposition(agent: MediaAgent) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return bytes(generate_latest(registry))
