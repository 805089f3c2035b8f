"""Mass restore: one agent serving several restore points at once, over real NBD, fairly."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from liverestore.agent.blockfile import BlockFile
from liverestore.agent.export import CachedBlock
from liverestore.agent.nbd import server as nbd_server
from liverestore.agent.prometheus import exposition
from liverestore.agent.scheduler import FetchClass, Mode
from liverestore.agent.source import Fetched, RepositorySource, SharedChunks, ThrottledSource
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import AgentThread, make_disk
from tests.nbdclient import NbdClient
from tests.test_cli import LR, assert_one_line_error, free_port, lr

KiB, MiB = 1024, 1 << 20


def _three_points(tmp_path: Path) -> tuple[Repository, list[RestorePoint], dict[str, bytes]]:
    """vm1 at two points (the disk changed in between) and vm2: three points, four exports' worth."""
    repo = Repository.init(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    d1, d2 = src / "disk0.raw", src / "data.raw"
    first = make_disk(d1, 16 * MiB, seed=1)
    p1 = run_backup(repo, "vm1", [d1], [])[0]
    with open(d1, "r+b") as f:  # the second point differs from the first in one block
        f.seek(5 * MiB)
        f.write(b"second point" * 1000)
    second = d1.read_bytes()
    p2 = run_backup(repo, "vm1", [d1], [])[0]
    other = make_disk(d2, 8 * MiB, seed=2)
    p3 = run_backup(repo, "vm2", [d2], [])[0]
    want = {f"vm1@{p1.id}/disk0": first, f"vm1@{p2.id}/disk0": second, "vm2/data": other}
    return repo, [p1, p2, p3], want


def test_one_agent_serves_several_points_byte_for_byte(tmp_path: Path, start_agent: AgentFactory) -> None:
    repo, points, want = _three_points(tmp_path)
    agent = start_agent(repo, points)
    assert sorted(agent.agent.exports) == sorted(want)  # vm1 twice: named by point; vm2 once: plain
    for name, data in want.items():
        c = NbdClient("127.0.0.1", agent.port, name)
        got = b"".join(c.read(off, MiB) for off in range(0, len(data), MiB))
        c.close()
        assert got == data, name
    status = agent.agent.status()
    served = {(p["vm"], p["point"]): p for p in status["points"]}  # type: ignore[attr-defined]
    assert set(served) == {(p.vm, p.id) for p in points}
    for p in points:  # each point counts its own reads, into its own cache directory
        m = served[(p.vm, p.id)]["metrics"]
        assert m["reads"] == len(next(d for n, d in want.items() if n.endswith(p.id + "/disk0") or
                                      (p.vm == "vm2" and n.startswith("vm2"))) ) // MiB  # fmt: skip
        assert (tmp_path / "cache" / f"{p.vm}-{p.id}").is_dir()
    assert "metrics" not in status  # several points: no single-point counters to misread


def _boot_read_latency(tmp_path: Path, start_agent: AgentFactory, mode: Mode, flood: bool) -> float:
    """How long VM b's 10 boot reads (one at a time, as a booting guest reads) take in all while VM a
    relocates: a's mirror reads (demand, 96 queued), its set 3 (96 queued) and its set 2 (the
    rest) all wait for a slow repository."""
    repo = Repository.init(tmp_path / f"repo-{mode}-{flood}", block_size=64 * KiB)
    src = tmp_path / f"src-{mode}-{flood}"
    src.mkdir()
    (src / "a.raw").write_bytes(random.Random(1).randbytes(512 * 64 * KiB))
    (src / "b.raw").write_bytes(random.Random(2).randbytes(64 * 64 * KiB))
    pa = run_backup(repo, "a", [src / "a.raw"], [])[0]
    pb = run_backup(repo, "b", [src / "b.raw"], [])[0]
    agent = start_agent(repo, [pa, pb], cache_dir=tmp_path / f"cache-{mode}-{flood}", repo_latency_ms=20,
                        fetch_slots=4, mode=mode)  # fmt: skip
    if flood:
        if mode != Mode.FIFO:
            agent.run(agent.agent.set_mode, Mode.FAIR, pa)
        agent.run(agent.agent.prefetch, "a/a", range(0, 96), FetchClass.DEMAND)
        agent.run(agent.agent.prefetch, "a/a", range(96, 192), FetchClass.RELOCATION)
        agent.run(agent.agent.prefetch, "a/a", range(192, 512), FetchClass.PREFETCH)
        time.sleep(0.1)
    c = NbdClient("127.0.0.1", agent.port, "b/b")
    took = []
    for i in range(10):
        t0 = time.monotonic()
        c.read(i * 6 * 64 * KiB, 4096)
        took.append(time.monotonic() - t0)
    c.close()
    if flood and mode != Mode.FIFO:  # a's flood outlived b's reads: the test measured what it says
        assert agent.agent.scheduler.queued(FetchClass.PREFETCH) > 100
    agent.close()
    return sum(took)


def test_one_vms_relocation_does_not_slow_another_vms_boot(tmp_path: Path, start_agent: AgentFactory) -> None:
    alone = _boot_read_latency(tmp_path, start_agent, Mode.DEMAND_FIRST, flood=False)
    shared = _boot_read_latency(tmp_path, start_agent, Mode.DEMAND_FIRST, flood=True)
    fifo = _boot_read_latency(tmp_path, start_agent, Mode.FIFO, flood=True)
    print(f"VM b's 10 boot reads took: alone {alone * 1000:.0f} ms, beside VM a's relocation "
          f"{shared * 1000:.0f} ms (points take turns), {fifo * 1000:.0f} ms (fifo)")  # fmt: skip
    # a's 192 foreground fetches at 20 ms on 4 slots are ~1 s of work: fifo makes b's first read wait
    # behind them; with points taking turns each of b's reads waits for one slot at most (<= 20 ms)
    assert fifo > 0.9
    assert shared < alone + 10 * 0.030  # one 20 ms fetch of a per read, and 10 ms of scheduling noise
    assert shared < fifo / 3


def test_serve_cli_serves_several_points(tmp_path: Path) -> None:
    repo, points, want = _three_points(tmp_path)
    repo.close()
    port = free_port()
    cport = free_port()
    proc = subprocess.Popen(
        [*LR, "serve", "--repo", str(tmp_path / "repo"), "--vm", f"vm1@{points[0].id}", "--vm",
         f"vm1@{points[1].id[:6]}", "--vm", "vm2", "--listen", f"127.0.0.1:{port}", "--control",
         f"127.0.0.1:{cport}", "--cache-dir", str(tmp_path / "cache")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(4)]
        assert sorted(ln.split("/", 3)[-1].strip() for ln in lines[:3]) == sorted(want), lines
        assert "status:" in lines[3]
        for name, data in want.items():
            c = NbdClient("127.0.0.1", port, name)
            assert c.read(5 * MiB, 64 * KiB) == data[5 * MiB : 5 * MiB + 64 * KiB], name
            c.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{cport}/status", timeout=5) as r:
            status = json.loads(r.read())
        assert [p["vm"] for p in status["points"]] == ["vm1", "vm1", "vm2"]
        prom = urllib.request.urlopen(f"http://127.0.0.1:{cport}/metrics", timeout=5).read().decode()
        for p in points:  # each point's reads under its own labels
            assert f'liverestore_reads_total{{point="{p.id}",vm="{p.vm}"}} 1.0' in prom, prom
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(f"{p.vm}@{p.id}" in err for p in points)  # the final counters, per point


def test_serve_cli_refuses_bad_point_lists(tmp_path: Path) -> None:
    repo, points, _want = _three_points(tmp_path)
    repo.close()
    r = str(tmp_path / "repo")
    assert_one_line_error(lr("serve", "--repo", r, "--vm", "vm1", "--vm", "vm2", "--point", points[0].id,
                             check=False), "--point goes with one --vm")  # fmt: skip
    assert_one_line_error(lr("serve", "--repo", r, "--vm", "vm1@", check=False), "write VM or VM@POINT")
    assert_one_line_error(lr("serve", "--repo", r, "--vm", "vm2", "--vm", "nosuch", check=False), "'nosuch'")
    assert_one_line_error(lr("serve", "--repo", r, "--vm", f"vm2@{points[2].id}", "--vm", "vm2", check=False),
                          "given twice")  # fmt: skip


def test_serve_cli_shares_chunks_unless_told_not_to(tmp_path: Path) -> None:
    """``serve`` with two clones: the second's read of a block the first fetched crosses no
    link; with --no-chunk-sharing it is fetched again."""
    repo, points, data = _clones(tmp_path, 2)
    repo.close()
    for flags, shared in (((), 1), (("--no-chunk-sharing",), 0)):
        port, cport = free_port(), free_port()
        proc = subprocess.Popen(
            [*LR, "serve", "--repo", str(tmp_path / "repo"), "--vm", points[0].vm, "--vm", points[1].vm,
             "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}", "--cache-dir",
             str(tmp_path / f"cache-{shared}"), *flags],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            while "status:" not in proc.stderr.readline():
                assert proc.poll() is None, proc.stderr.read()
            for p in points:
                c = NbdClient("127.0.0.1", port, f"{p.vm}/golden")
                assert c.read(0, 64 * KiB) == data[: 64 * KiB]
                c.close()
            with urllib.request.urlopen(f"http://127.0.0.1:{cport}/status", timeout=5) as r:
                status = json.loads(r.read())
            assert status["repository"]["shared_blocks"] == shared, (flags, status["repository"])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)


def _guest_reads_beside_a_copier(tmp_path: Path, start_agent: AgentFactory, copier: bool) -> float:
    repo = Repository.init(tmp_path / f"repo-{copier}", block_size=64 * KiB)
    src = tmp_path / f"src-{copier}"
    src.mkdir()
    rnd = random.Random(3)
    with open(src / "a.raw", "wb") as f:  # 256 MiB: a copy of seconds
        for _ in range(16):
            f.write(rnd.randbytes(16 * MiB))
    (src / "b.raw").write_bytes(random.Random(4).randbytes(4 * MiB))
    pa = run_backup(repo, "a", [src / "a.raw"], [])[0]
    pb = run_backup(repo, "b", [src / "b.raw"], [])[0]
    agent = start_agent(repo, [pa, pb], cache_dir=tmp_path / f"cache-{copier}", repo_latency_ms=5)
    copy = None
    try:
        if copier:  # a relocation of VM a, as QEMU's mirror or nbdcopy makes it: many large reads in flight
            copy = subprocess.Popen(["nbdcopy", "--request-size=1048576", f"nbd://127.0.0.1:{agent.port}/a/a",
                                     "null:"])  # fmt: skip
            deadline = time.monotonic() + 10
            while agent.agent.server.budget.used < 6 * MiB:  # the copier holds the (shrunk) server budget
                assert time.monotonic() < deadline and copy.poll() is None, "the copier never filled the budget"
                time.sleep(0.01)
        c = NbdClient("127.0.0.1", agent.port, "b/b")
        t0 = time.monotonic()
        for i in range(20):
            c.read(i * 3 * 64 * KiB, 32 * KiB)  # a boot's reads: small, one at a time, each a miss
        took = time.monotonic() - t0
        c.close()
        if copy is not None:
            assert copy.poll() is None, "the guest's reads ended after the whole copy: they waited behind it"
    finally:  # the copier this test started, by its handle, whatever failed
        if copy is not None:
            copy.kill()
            copy.wait()
        agent.close()
    return took


def test_a_bulk_copier_holding_the_server_budget_does_not_queue_a_guests_reads(
    tmp_path: Path, start_agent: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-wide reply budget (shrunk to 8 MiB here, 256 MiB in production) is taken when a
    request is read and held while its fetch waits: granted in arrival order, a guest's read
    queued behind the copier's. It goes to the connection holding least first."""
    monkeypatch.setattr(nbd_server, "SERVER_BYTES_IN_FLIGHT", 8 * MiB)
    alone = _guest_reads_beside_a_copier(tmp_path, start_agent, copier=False)
    beside = _guest_reads_beside_a_copier(tmp_path, start_agent, copier=True)
    print(f"20 guest reads of VM b: alone {alone * 1000:.0f} ms, beside VM a's bulk copy {beside * 1000:.0f} ms")
    # before, the guest's reads waited out the whole copy (the copier was done first, which the
    # helper asserts against); now each may wait for one of the copier's fetches in the
    # scheduler's turn and share the 2 cores with the copy's decompression and hashing
    assert beside < alone + 20 * 0.040


def _clones(tmp_path: Path, count: int) -> tuple[Repository, list[RestorePoint], bytes]:
    """``count`` VMs backed up from one image (a template's clones): the repository holds its
    chunks once; 64 KiB blocks, 48 of them allocated, no two alike."""
    repo = Repository.init(tmp_path / "repo", block_size=64 * KiB)
    image = tmp_path / "golden.raw"
    rnd = random.Random(7)
    text = b"".join((b"template block %02d " % i * 4000)[: 64 * KiB] for i in range(16))  # compressible
    data = rnd.randbytes(32 * 64 * KiB) + bytes(8 * 64 * KiB) + text
    image.write_bytes(data)
    points = [run_backup(repo, f"clone{i}", [image], [])[0] for i in range(count)]
    return repo, points, data


def _read_together(port: int, exports: list[str], size: int) -> dict[str, bytes]:
    """Every export read whole at once, one 64 KiB read at a time, as booting guests read."""
    got: dict[str, bytes] = {}
    start = threading.Barrier(len(exports))

    def reader(name: str) -> None:
        c = NbdClient("127.0.0.1", port, name)
        start.wait()
        got[name] = b"".join(c.read(off, 64 * KiB) for off in range(0, size, 64 * KiB))
        c.close()

    threads = [threading.Thread(target=reader, args=(name,)) for name in exports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == sorted(exports), "a reader failed (its error is above)"
    return got


def _link_use(agent: AgentThread) -> tuple[int, int, int]:
    """(blocks fetched by all points, stored bytes that crossed the link for them, blocks shared)."""
    status = agent.agent.status()
    metrics = [p["metrics"] for p in status["points"]]  # type: ignore[attr-defined]
    shared = status["repository"]["shared_blocks"]  # type: ignore[index]
    return sum(m["blocks_fetched"] for m in metrics), sum(m["bytes_fetched_stored"] for m in metrics), shared


def test_clones_read_together_fetch_each_chunk_once(tmp_path: Path, start_agent: AgentFactory) -> None:
    """Four clones of one image booting over a slow link, two at once and then two more: each chunk
    crosses the link once (joined while in flight, or copied from the cache it landed in), every
    clone reads its own bytes, and without sharing each clone fetches it all again."""
    repo, points, data = _clones(tmp_path, 4)
    allocated = 32 + 16  # the zeros are a hole
    exports = [f"{p.vm}/golden" for p in points]
    use = {}
    for share in (True, False):
        agent = start_agent(repo, points, cache_dir=tmp_path / f"cache-{share}", repo_latency_ms=20,
                            share_chunks=share)  # fmt: skip
        # two clones at once (the second joins the first's fetches), then two more (copied from
        # the chunks that landed)
        got = _read_together(agent.port, exports[:2], len(data)) | _read_together(agent.port, exports[2:], len(data))
        assert all(got[name] == data for name in exports)
        use[share] = _link_use(agent)
        prom = agent.run(exposition, agent.agent).decode()
        assert f"liverestore_shared_blocks_total {float(use[share][2])}" in prom
        # a copy answered in a millisecond is no sample of a 20 ms link: taken for one, it made
        # the adaptive limit see queueing everywhere and shrink to its minimum
        adaptive = agent.agent.status()["scheduler"]["adaptive"]  # type: ignore[index]
        assert adaptive["base_latency_ms"] >= 19, adaptive
        agent.close()
    fetched, stored, shared = use[True]
    assert fetched == 4 * allocated  # every clone's cache holds every block
    assert shared == 3 * allocated  # all but one clone's came from another's fetch
    assert use[False][:2] == (4 * allocated, 4 * stored)  # unshared: the link carries it four times
    assert use[False][2] == 0


def test_shared_chunk_of_a_released_point_is_fetched_again(tmp_path: Path, start_agent: AgentFactory) -> None:
    """The cache a shared chunk landed in goes with its point: the next clone fetches the chunk
    itself rather than read a closed (or reused) file."""
    repo, points, data = _clones(tmp_path, 2)
    agent = start_agent(repo, points)
    first, second = (f"{p.vm}/golden" for p in points)
    assert _read_together(agent.port, [first], len(data))[first] == data
    agent.call(agent.agent.release(points[0]))
    assert _read_together(agent.port, [second], len(data))[second] == data
    fetched, _stored, shared = _link_use(agent)
    assert shared == 0 and fetched == 2 * 48


def test_joiners_of_an_abandoned_fetch_fetch_for_themselves(tmp_path: Path) -> None:
    """A fetch whose reader went away answers nobody: the asks that joined it are fetched anew."""
    repo, points, data = _clones(tmp_path, 2)
    manifests = [repo.load_manifest(p.record.disks[0]) for p in points]
    caches = [BlockFile(tmp_path / f"c{i}.cache", "m", len(data), 64 * KiB) for i in range(2)]

    async def scenario() -> list[Fetched | Exception]:
        source = SharedChunks(ThrottledSource(RepositorySource(repo), latency_ms=200))
        answers: list[Fetched | Exception] = []
        owner = asyncio.create_task(source.fetch_many(manifests[0], [(3, CachedBlock(caches[0], 3))],
                                                      lambda _n, got: caches[0].mark(3)))  # fmt: skip
        await asyncio.sleep(0.05)
        joiner = asyncio.create_task(source.fetch_many(manifests[1], [(3, CachedBlock(caches[1], 3))],
                                                       lambda _n, got: answers.append(got)))  # fmt: skip
        await asyncio.sleep(0.05)
        owner.cancel()
        await asyncio.wait_for(joiner, 5)
        assert source.shared_blocks == 0
        source.close()
        return answers

    answers = asyncio.run(scenario())
    assert len(answers) == 1 and isinstance(answers[0], Fetched) and answers[0].stored_bytes > 0
    caches[1].mark(3)
    assert caches[1].read_block(3) == data[3 * 64 * KiB : 4 * 64 * KiB]
    assert caches[0].read_block(3) is None  # the abandoned fetch never marked its block
    for c in caches:
        c.close()
