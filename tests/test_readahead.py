"""Readahead through a real agent over real NBD: a client reading a disk in order finds the blocks
ahead of it fetched, up to the window and no further; a client jumping about triggers nothing;
a reader that skips a hole (as nbdcopy and QEMU's mirror do) stays one stream."""

from __future__ import annotations

import os
import time
from pathlib import Path

from liverestore.agent.export import DiskExport
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import AgentThread, MiB
from tests.nbdclient import NbdClient

SIZE = 64 * MiB
WINDOW = 16 * MiB


def quiet(agent: AgentThread, timeout: float = 30.0) -> None:
    """Wait until the agent has no fetch queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = agent.agent.scheduler.snapshot()
        running = snap["running"]
        classes = snap["classes"]
        assert isinstance(running, dict) and isinstance(classes, dict)
        if not any(running.values()) and not any(c["queued_now"] for c in classes.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"fetches still in flight after {timeout} s: {agent.agent.scheduler.snapshot()}")


def cached(export: DiskExport) -> list[int]:
    return [i for i in range(export.read_cache.block_count) if export.read_cache.has(i)]


def backed_up(repo: Repository, tmp_path: Path) -> tuple[RestorePoint, bytes]:
    """A point of a disk of random bytes (every block allocated), and those bytes."""
    src = tmp_path / "disk0.raw"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    return run_backup(repo, "vm1", [src], [])[0], data


def read_all(c: NbdClient, data: bytes, offsets: list[int]) -> None:
    for off in offsets:
        assert c.read(off, MiB) == data[off : off + MiB]


def test_a_reader_in_order_finds_the_window_ahead_of_it_fetched_and_no_more(
    repo: Repository, tmp_path: Path, start_agent: AgentFactory
) -> None:
    point, data = backed_up(repo, tmp_path)
    agent = start_agent(repo, point, readahead_bytes=WINDOW)
    export = agent.agent.exports["vm1/disk0"]
    assert export.block_size == MiB
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    read_all(c, data, [i * MiB for i in range(8)])
    quiet(agent)
    # The stream is trusted after 4 MiB: blocks 4-19 (the window past 4 MiB) went ahead in one
    # batch; at 8 MiB the window's end (24 MiB) was less than half a window past what was queued.
    assert cached(export) == list(range(20))
    assert export.readahead is not None and export.readahead.issued == 16
    assert agent.agent.metrics.fetched_by_class == {"demand": 4, "readahead": 16}
    # Reading on, the window moves in half-window batches, and the bytes are right.
    read_all(c, data, [i * MiB for i in range(8, 13)])
    quiet(agent)
    assert cached(export) == list(range(28))  # at 12 MiB, 12 + 16 reached 20 + 8: blocks 20-27 went
    c.close()


def test_readahead_off_fetches_only_what_was_read(
    repo: Repository, tmp_path: Path, start_agent: AgentFactory
) -> None:
    """Off when asked; by default off behind the emulated link (one FIFO queue, where bulk
    readers' readahead would sit in front of every guest read) and for small blocks; on by
    default on packs of 1 MiB blocks."""
    point, data = backed_up(repo, tmp_path)
    default = start_agent(repo, point, cache_dir=tmp_path / "c-default")
    assert default.agent.exports["vm1/disk0"].readahead is not None
    default.close()
    linked = start_agent(repo, point, cache_dir=tmp_path / "c-link", repo_latency_ms=1)
    assert linked.agent.exports["vm1/disk0"].readahead is None
    linked.close()
    small = Repository.init(tmp_path / "repo64", 64 * 1024)  # small blocks: off by default
    small_point = run_backup(small, "vm1", [tmp_path / "disk0.raw"], [])[0]
    small_agent = start_agent(small, small_point, cache_dir=tmp_path / "c-small")
    assert small_agent.agent.exports["vm1/disk0"].readahead is None
    small_agent.close()
    small.close()
    agent = start_agent(repo, point, readahead_bytes=0)
    export = agent.agent.exports["vm1/disk0"]
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    read_all(c, data, [i * MiB for i in range(8)])
    quiet(agent)
    assert cached(export) == list(range(8))
    assert export.readahead is None
    c.close()


def test_a_reader_jumping_about_triggers_no_readahead(
    repo: Repository, tmp_path: Path, start_agent: AgentFactory
) -> None:
    point, data = backed_up(repo, tmp_path)
    agent = start_agent(repo, point, readahead_bytes=WINDOW)
    export = agent.agent.exports["vm1/disk0"]
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    # Backwards within a window, forwards over data, and far away: each starts a new stream.
    jumps = [40, 30, 34, 50, 10, 2, 20, 60, 44]
    read_all(c, data, [b * MiB for b in jumps])
    quiet(agent)
    assert cached(export) == sorted(jumps)
    assert export.readahead is not None and export.readahead.issued == 0
    c.close()


def test_a_reader_that_skips_a_hole_stays_one_stream(
    repo: Repository, tmp_path: Path, start_agent: AgentFactory
) -> None:
    src = tmp_path / "disk0.raw"
    data = bytearray(os.urandom(SIZE))
    data[3 * MiB : 11 * MiB] = bytes(8 * MiB)  # a hole: the backup stores no block for it
    src.write_bytes(data)
    point, _ = run_backup(repo, "vm1", [src], [])
    agent = start_agent(repo, point, readahead_bytes=WINDOW)
    export = agent.agent.exports["vm1/disk0"]
    assert not any(export.manifest.is_allocated(i) for i in range(3, 11))
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    # 3 MiB, a skipped hole, then 2 MiB: 5 MiB of data read in order, past the 4 MiB trigger.
    read_all(c, bytes(data), [0, MiB, 2 * MiB, 11 * MiB, 12 * MiB])
    quiet(agent)
    # The window past 12 MiB (blocks 12-27) was fetched; read as two streams it never triggers.
    assert cached(export) == [0, 1, 2, *range(11, 28)]
    c.close()
