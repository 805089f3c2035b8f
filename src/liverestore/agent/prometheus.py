"""The agent's counters in Prometheus' text format, for ``GET /metrics`` on the control endpoint.

A collector reads the live ``Metrics`` and scheduler state at scrape time (nothing is counted
twice, and one process may run several agents), through ``prometheus-client``'s own exposition.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from liverestore.agent.metrics import PROMETHEUS_BOUNDS_S, LatencyHistogram

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
        a, m = self.agent, self.agent.metrics
        labels = ["vm", "point"]
        ids = [a.point.vm, a.point.id]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"liverestore_{name}", doc, labels=labels)
            c.add_metric(ids, value)
            return c

        yield counter("reads", "NBD reads served", m.reads)
        yield counter("read_bytes", "Bytes returned to NBD clients", m.read_bytes)
        yield counter("read_cache_hits", "Reads answered from the read-cache alone", m.read_hits)
        yield counter("read_cache_misses", "Reads that waited for the repository", m.read_misses)
        yield counter("read_errors", "Reads answered with an error", m.read_errors)
        yield counter("writes", "NBD writes into the copy-on-write area", m.writes)
        yield counter("repository_fetched_bytes", "Block bytes fetched from the repository", m.bytes_fetched)
        yield counter("repository_requests", "Ranged reads sent to the repository (neighbouring blocks share one)",
                      self.agent.fetcher.requests)  # fmt: skip
        yield counter("repository_fetch_errors", "Fetches that failed (damage or outage)", m.fetch_errors)
        yield counter("repository_outages", "Times the repository became unreachable", a.retrying.outages)
        fetched = CounterMetricFamily("liverestore_repository_fetched_blocks", "Blocks fetched, by why",
                                      labels=[*labels, "class"])  # fmt: skip
        for cls, n in sorted(m.fetched_by_class.items()):
            fetched.add_metric([*ids, cls], n)
        yield fetched
        lat = HistogramMetricFamily("liverestore_read_latency_seconds",
                                    "NBD read latency; kind=guest under 512 KiB, kind=bulk (mirror, copy tools) above",
                                    labels=[*labels, "kind"])  # fmt: skip
        for kind, h in (("guest", m.guest_latency), ("bulk", m.bulk_latency)):
            lat.add_metric([*ids, kind], _buckets(h), h.sum_s)
        yield lat
        up = GaugeMetricFamily("liverestore_repository_available", "1 while the repository answers", labels=labels)
        up.add_metric(ids, 1.0 if a.retrying.available else 0.0)
        yield up
        conns = GaugeMetricFamily("liverestore_nbd_connections", "Open NBD connections", labels=labels)
        conns.add_metric(ids, a.server.active_connections)
        yield conns
        cached = GaugeMetricFamily("liverestore_cached_blocks", "Blocks in the read-cache", labels=[*labels, "export"])
        alloc = GaugeMetricFamily("liverestore_allocated_blocks", "Allocated blocks of the backup",
                                  labels=[*labels, "export"])  # fmt: skip
        for name, e in sorted(a.exports.items()):
            cached.add_metric([*ids, name], e.read_cache.present)
            alloc.add_metric([*ids, name], e.manifest.allocated_count)
        yield cached
        yield alloc


def exposition(agent: MediaAgent) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return bytes(generate_latest(registry))
