"""The media agent against real NBD clients: qemu-img, nbdinfo, nbdcopy, qemu-io, and our own."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from liverestore.agent.blockfile import BlockFile
from liverestore.agent.nbd import protocol as p
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import MiB, tree_digest
from tests.nbdclient import NbdClient, NbdError
from tests.packs import flip_chunk_byte


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_qemu_img_compare_raw_and_qcow2(
    repo: Repository, disk: tuple[Path, bytes], tmp_path: Path, start_agent: AgentFactory
) -> None:
    raw, _ = disk
    q = tmp_path / "disk1.qcow2"
    assert run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)).returncode == 0
    point, _ = run_backup(repo, "vm1", [raw, q], [])
    agent = start_agent(repo, point)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), agent.uri("disk0"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(q), agent.uri("disk1"))
    assert r.returncode == 0, r.stdout + r.stderr
    # a byte changed in the source must make compare fail: the check has teeth
    with open(raw, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"X")
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), agent.uri("disk0")).returncode == 1


def test_nbdinfo_list_and_map_and_nbdcopy(
    repo: Repository, point: RestorePoint, disk: tuple[Path, bytes], tmp_path: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent(repo, point)
    listing = run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{agent.port}")
    assert listing.returncode == 0, listing.stderr
    names = [e["export-name"] for e in json.loads(listing.stdout)["exports"]]
    assert names == ["vm1/disk0"]

    m = run("nbdinfo", "--map", "--json", agent.uri("disk0"))
    assert m.returncode == 0, m.stderr
    extents = json.loads(m.stdout)
    manifest = repo.load_manifest(point.record.disks[0])
    data_bytes = sum(e["length"] for e in extents if e["type"] == 0)
    assert data_bytes == manifest.allocated_bytes
    assert all(e["type"] == 3 for e in extents if e["offset"] == 10 * MiB)  # written zeros → hole

    out = tmp_path / "copy.raw"
    r = run("nbdcopy", agent.uri("disk0"), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == disk[1]


def test_hole_reads_never_fetch(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory, tmp_path: Path
) -> None:
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    assert c.base_allocation
    status = c.block_status(40 * MiB, 8 * MiB)
    assert status == [(8 * MiB, p.STATE_HOLE | p.STATE_ZERO)]
    assert c.read(40 * MiB, 8 * MiB) == bytes(8 * MiB)
    assert agent.agent.metrics.blocks_fetched == 0
    # a mirror-style full copy fetches each allocated block exactly once
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", agent.uri("disk0"), str(tmp_path / "copy"))
    assert r.returncode == 0, r.stderr
    manifest = repo.load_manifest(point.record.disks[0])
    assert agent.agent.metrics.blocks_fetched == manifest.allocated_count
    c.close()


def test_read_only_refuses_writes_and_past_end(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory
) -> None:
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    assert c.flags & p.TFLAG_READ_ONLY
    with pytest.raises(NbdError) as e:
        c.write(0, b"x" * 512)
    assert e.value.errno == p.EPERM
    with pytest.raises(NbdError) as e:
        c.read(c.size - 512, 1024)
    assert e.value.errno == p.EINVAL
    assert c.read(c.size - 512, 512)  # the connection survived both errors
    c.close()
    r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", agent.uri("disk0"))
    assert "Operation not permitted" in r.stdout + r.stderr or r.returncode != 0


def test_writable_export_keeps_writes_out_of_repository(
    repo: Repository, point: RestorePoint, disk: tuple[Path, bytes], start_agent: AgentFactory
) -> None:
    before = tree_digest(repo.root)
    agent = start_agent(repo, point, writable=True)
    uri = agent.uri("disk0")
    w = run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1536k 8k",
        "-c",
        "write -z 20m 1m",
        "-c",
        "write -P 0x11 50m 4k",
        uri,
    )
    assert w.returncode == 0 and "error" not in w.stdout.lower(), w.stdout + w.stderr
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    content = disk[1]
    got = c.read(1 * MiB, 2 * MiB)
    assert got[: 512 * 1024] == content[1 * MiB : 1 * MiB + 512 * 1024]  # untouched part of a COW block
    assert got[512 * 1024 : 520 * 1024] == b"\xab" * 8192
    assert got[520 * 1024 :] == content[1 * MiB + 520 * 1024 : 3 * MiB]
    assert c.read(20 * MiB, 1 * MiB) == bytes(MiB)
    assert c.read(50 * MiB, 4096) == b"\x11" * 4096
    assert c.block_status(50 * MiB, 1 * MiB) == [(1 * MiB, 0)]  # written hole now reports data
    c.close()
    agent.close()
    assert tree_digest(repo.root) == before


def test_cache_survives_restart(repo: Repository, point: RestorePoint, start_agent: AgentFactory) -> None:
    a1 = start_agent(repo, point)
    c = NbdClient("127.0.0.1", a1.port, "vm1/disk0")
    first = c.read(0, 8 * MiB)
    c.close()
    fetched = a1.agent.metrics.blocks_fetched
    assert fetched > 0
    a1.close()
    a2 = start_agent(repo, point)
    c = NbdClient("127.0.0.1", a2.port, "vm1/disk0")
    assert c.read(0, 8 * MiB) == first
    assert a2.agent.metrics.blocks_fetched == 0 and a2.agent.metrics.read_hits == 1
    c.close()


def test_corrupt_chunk_fails_that_read_only(
    repo: Repository,
    point: RestorePoint,
    disk: tuple[Path, bytes],
    start_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    manifest = repo.load_manifest(point.record.disks[0])
    bad = manifest.blocks[2]
    assert bad is not None
    flip_chunk_byte(repo, bad, at=0.1, mask=0x01)
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    with pytest.raises(NbdError) as e:
        c.read(2 * MiB, 4096)
    assert e.value.errno == p.EIO
    assert any(bad in rec.getMessage() for rec in caplog.records)
    assert c.read(1 * MiB, 4096) == disk[1][1 * MiB : 1 * MiB + 4096]  # other blocks still served
    c.close()
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", agent.uri("disk0"), str(tmp_path / "copy"))
    assert r.returncode != 0  # a full copy must fail loudly, not produce wrong data


@pytest.mark.parametrize("structured", [True, False])
def test_cached_reads_every_path_same_bytes(
    repo: Repository,
    point: RestorePoint,
    disk: tuple[Path, bytes],
    start_agent: AgentFactory,
    structured: bool,
) -> None:
    """Small cached reads are answered inline, large ones by sendfile, misses through the scheduler:
    all three must give the same bytes, with simple and structured replies."""
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0", structured=structured)
    content = disk[1]
    spans = [(1 * MiB + 100, 4096), (1 * MiB, 2 * MiB), (3 * MiB - 10, 20), (20 * MiB, 1 * MiB + 7)]
    for _ in range(2):  # first round misses, second round hits the cache
        for offset, length in spans:
            assert c.read(offset, length) == content[offset : offset + length], (offset, length)
    m = agent.agent.metrics
    assert m.read_hits >= len(spans) and m.read_misses >= 1
    c.close()


def test_pipelined_small_reads_share_sends_and_mixed_requests_keep_their_replies(
    repo: Repository,
    point: RestorePoint,
    disk: tuple[Path, bytes],
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client with many small reads in flight sends them together; the replies of those answered
    from the cache go out together too (one send, not one each). Between them, a read that must
    be fetched and a request that fails are answered on their own: every reply arrives whole,
    once, under its own handle."""
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    content = disk[1]
    assert c.read(0, 1 * MiB) == content[: 1 * MiB]  # now cached: the small reads below are inline

    sends = 0
    real_send = socket.socket.send

    def counting_send(sock: socket.socket, data: Any, *flags: int) -> int:
        nonlocal sends
        sends += 1
        return real_send(sock, data, *flags)

    monkeypatch.setattr(socket.socket, "send", counting_send)
    wanted: dict[int, tuple[int, int] | None] = {}  # handle: the bytes it reads (None: it fails)
    batch = bytearray()

    def ask(offset: int, length: int, flags: int = 0) -> None:
        c.handle += 1
        batch.extend(p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, flags, p.CMD_READ, c.handle, offset, length))
        wanted[c.handle] = (offset, length) if not flags else None

    for i in range(64):
        ask(i * 4096, 4096)
    c.sock.sendall(bytes(batch))
    for _ in range(64):
        handle, data, _ = c.reply()
        offset, length = wanted.pop(handle) or (0, 0)
        assert data == content[offset : offset + length]
    assert sends <= 8, f"{sends} sends for 64 cached 4 KiB replies (one each before corking)"

    batch.clear()
    for i in range(10):
        ask(i * 4096 + 7, 4096)
    ask(30 * MiB, 1 * MiB)  # not cached: fetched through the scheduler, sent with sendfile
    ask(8192, 4096, flags=0x8000)  # an unknown flag: an error reply
    for i in range(10):
        ask(512 * 1024 + i * 4096, 4096)
    c.sock.sendall(bytes(batch))
    failed = 0
    for _ in range(len(wanted)):
        try:
            handle, data, _ = c.reply()
        except NbdError as e:
            assert e.errno == p.EINVAL
            failed += 1
            continue
        offset, length = wanted.pop(handle) or (0, 0)
        assert data == content[offset : offset + length], (offset, length)
    assert failed == 1 and list(wanted.values()) == [None]
    c.close()


def test_small_reads_in_order_share_one_read_of_the_cache_and_never_reach_past_what_it_holds(
    repo: Repository,
    point: RestorePoint,
    disk: tuple[Path, bytes],
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection reading 4 KiB pieces in order gets its cached pieces from one read of the cache
    per 64 KiB, not one each; what such a read keeps never covers a block that is not cached yet
    (it would be a hole of zeros there), so the pieces of a missing block are fetched and right."""
    agent = start_agent(repo, point, readahead_bytes=0)
    export = agent.agent.exports["vm1/disk0"]
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    content = disk[1]
    assert c.read(1 * MiB, 1 * MiB) == content[1 * MiB : 2 * MiB]  # blocks 1 and 3 cached, 2 not
    assert c.read(3 * MiB, 1 * MiB) == content[3 * MiB : 4 * MiB]
    assert not export.present(2) and export.manifest.is_allocated(2)

    reads: list[int] = []
    real_pread = BlockFile.pread

    def counting_pread(self: BlockFile, length: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(self, length, offset)

    monkeypatch.setattr(BlockFile, "pread", counting_pread)
    batch, wanted = bytearray(), {}
    for offset in range(1 * MiB, 4 * MiB, 4096):
        c.handle += 1
        batch += p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, c.handle, offset, 4096)
        wanted[c.handle] = offset
    for at in range(0, len(batch), 16 * p.REQUEST_HEADER.size):  # 16 in flight, as nbdcopy keeps
        c.sock.sendall(bytes(batch[at : at + 16 * p.REQUEST_HEADER.size]))
        for _ in range(16):
            handle, data, _ = c.reply()
            offset = wanted.pop(handle)
            assert data == content[offset : offset + 4096], offset
    assert not wanted and export.present(2)
    in_block_1 = [o for o in reads if 1 * MiB <= o < 2 * MiB]
    assert len(in_block_1) <= 1 * MiB // (64 * 1024) + 1, f"{len(in_block_1)} reads of the cache for 256 pieces"
    c.close()


@pytest.mark.parametrize("structured", [True, False])
def test_a_cached_read_sent_with_sendfile_sends_its_headers_in_one_write(
    repo: Repository,
    point: RestorePoint,
    disk: tuple[Path, bytes],
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
    structured: bool,
) -> None:
    """A large read from the cache goes out as its headers, then ``sendfile`` of the data: the
    headers in one ``send``, with ``MSG_MORE`` so that they leave with the data. A structured
    reply's chunk header and offset sent apart were two sends, two packets and two wake-ups of
    the client on loopback, per read (warm 1 MiB reads over TCP ran at two thirds of the speed)."""
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0", structured=structured)
    content = disk[1]
    assert c.read(0, 4 * MiB) == content[: 4 * MiB]  # now cached

    sends: list[tuple[int, int]] = []
    real_send = socket.socket.send

    def counting_send(sock: socket.socket, data: Any, flags: int = 0) -> int:
        if sock.family == socket.AF_INET:  # not the event loop's wake-up socketpair
            sends.append((len(data), flags))
        return real_send(sock, data, flags)

    monkeypatch.setattr(socket.socket, "send", counting_send)
    for i in range(4):
        assert c.read(i * MiB, MiB) == content[i * MiB : (i + 1) * MiB]
    head = 20 + 8 if structured else 16  # chunk header and offset, or the simple reply
    # each with MSG_MORE: the headers wait for the data and leave with it
    assert sends == [(head, socket.MSG_MORE)] * 4, f"sends (bytes, flags) of {sends} for 4 cached 1 MiB reads"
    c.close()
