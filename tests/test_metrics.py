"""Honest read metrics: log-linear latency histograms exact to 6.25 %, the guest's reads kept
apart from bulk (mirror) reads, and the same counters as Prometheus text on ``/metrics``."""

from __future__ import annotations

import json
import random
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from liverestore.agent.control import ControlServer
from liverestore.agent.metrics import LatencyHistogram, _upper_us, bucket_of
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import MiB
from tests.nbdclient import NbdClient


def test_percentiles_are_exact_to_a_sixteenth_at_every_scale() -> None:
    rnd = random.Random(3)
    for scale in (1e-6, 1e-4, 1e-2, 1.0):  # microseconds to seconds
        values = sorted(rnd.uniform(1, 100) * scale for _ in range(5000))
        h = LatencyHistogram()
        for v in values:
            h.add(v)
        for q in (0.5, 0.9, 0.99):
            true_ms = values[int(q * len(values)) - 1] * 1000
            got = h.percentile(q)
            assert true_ms <= got <= max(true_ms * (1 + 1 / 16) + 1e-6, 0.001), (scale, q, true_ms, got)
        assert h.percentile(1.0) >= values[-1] * 1000


def test_every_latency_lands_in_the_bucket_whose_edges_hold_it() -> None:
    """``bucket_of`` finds the sixteenth in integers (every cached read is counted): each value,
    at the edges and between them, from 1 us to two minutes, falls within its bucket's edges."""
    rnd = random.Random(5)
    edges = [2**e * (1 + k / 16) for e in range(27) for k in range(16)]
    for us in edges + [e * 1.0001 for e in edges] + [10 ** rnd.uniform(0, 8.1) for _ in range(50_000)]:
        b = bucket_of(us / 1e6)
        assert _upper_us(b - 1) * (1 - 1e-9) <= us < _upper_us(b) * (1 + 1e-9), (us, b)
    assert bucket_of(0.0) == bucket_of(0.5e-6) == 0
    assert bucket_of(1000.0) == bucket_of(500.0)  # past 2**27 us, all in the last bucket


def test_guest_and_bulk_reads_are_counted_apart_and_exposed_to_prometheus(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory
) -> None:
    # No readahead: the 5 sequential 1 MiB reads would start background fetches, and a block
    # landing between the /status and /metrics requests made their byte counts differ (2 MiB
    # against 1 MiB, once in CI).
    agent = start_agent(repo, point, readahead_bytes=0)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    for i in range(20):
        c.read(MiB + i * 4096, 4096)  # a guest's small reads, where the disk holds data
    for i in range(5):
        c.read(8 * MiB + i * MiB, MiB)  # what a mirror or nbdcopy reads
    c.close()

    ctl = ControlServer(agent.agent)
    port = agent.call(ctl.listen("127.0.0.1", 0))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            status = json.loads(r.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    finally:
        agent.call(ctl.close())

    m = status["metrics"]
    assert m["guest_read_latency"]["count"] == 20 and m["bulk_read_latency"]["count"] == 5
    assert m["reads"] == 25
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    ids = (("point", point.id), ("vm", "vm1"))
    assert samples[("liverestore_reads_total", ids)] == 25
    assert samples[("liverestore_read_bytes_total", ids)] == 20 * 4096 + 5 * MiB
    for kind, n in (("guest", 20), ("bulk", 5)):
        key = tuple(sorted((*ids, ("kind", kind))))
        assert samples[("liverestore_read_latency_seconds_count", key)] == n
        assert samples[("liverestore_read_latency_seconds_bucket", tuple(sorted((*key, ("le", "+Inf")))))] == n
    misses = samples[("liverestore_read_cache_misses_total", ids)]
    assert misses == m["read_misses"] > 0
    assert samples[("liverestore_repository_fetched_bytes_total", ids)] == m["bytes_fetched"] > 0
    export = tuple(sorted((*ids, ("export", "vm1/disk0"))))
    assert samples[("liverestore_cached_blocks", export)] == status["exports"]["vm1/disk0"]["cached_blocks"] > 0


def test_boot_io_stall_is_the_union_of_the_misses_waits() -> None:
    """Overlapping waits count once, hits not at all: the time at least one read was waiting."""
    from liverestore.agent.recorder import AccessEvent, stalled_seconds

    events = [
        AccessEvent(t=10.0, export="e", offset=0, length=4096, hit=False, seconds=1.0),  # 9-10
        AccessEvent(t=10.5, export="e", offset=0, length=4096, hit=False, seconds=1.0),  # 9.5-10.5
        AccessEvent(t=11.0, export="e", offset=0, length=4096, hit=True, seconds=0.9),  # a hit: no stall
        AccessEvent(t=13.0, export="e", offset=0, length=4096, hit=False, seconds=0.5),  # 12.5-13
        AccessEvent(t=12.9, export="e", offset=0, length=4096, hit=False, seconds=0.1),  # inside the last
    ]
    assert abs(stalled_seconds(events) - 2.0) < 1e-9
    assert stalled_seconds([]) == 0.0
