"""Defects outside NBD clients and a fuzz campaign found in the agent, each reproduced against a
running agent: lockout by silent clients, zero-length structured reads, unbounded memory on
pipelined reads, cache saves after a full disk, FLUSH on a full disk, log floods, spec points."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liverestore.agent.agent import AgentConfig
from liverestore.agent.blockfile import _HEADER
from liverestore.agent.nbd import protocol as p
from liverestore.agent.nbd import server as nbd_server
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.helpers import AgentThread, MiB, make_disk
from tests.nbdclient import NbdClient, NbdError


@pytest.fixture
def disk_point(tmp_path: Path) -> tuple[Repository, RestorePoint, bytes]:
    content = make_disk(tmp_path / "disk0.raw", 64 * MiB)
    repo = Repository.init(tmp_path / "repo", 64 * 1024)
    return repo, run_backup(repo, "vm1", [tmp_path / "disk0.raw"], [])[0], content


@pytest.fixture
def agent(disk_point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> Iterator[AgentThread]:
    repo, point, _ = disk_point
    a = AgentThread(repo, point, AgentConfig(cache_dir=tmp_path / "cache", writable=True))
    yield a
    a.close()


def _handshaken(port: int, export: str = "vm1/disk0") -> NbdClient:
    return NbdClient("127.0.0.1", port, export, timeout=10)


def _raw_reply_header(c: NbdClient) -> tuple[int, int, int, bytes]:
    """(flags, type, errno or 0, body) of one structured reply chunk."""
    magic, flags, rtype, _handle, length = struct.unpack(">IHHQI", c._recv(20))
    assert magic == p.STRUCTURED_REPLY_MAGIC
    body = c._recv(length)
    err = struct.unpack_from(">I", body)[0] if rtype & 0x8000 else 0
    return flags, rtype, err, body


def test_silent_clients_and_a_burst_cannot_lock_out_a_real_client(
    agent: AgentThread, disk_point: tuple[Repository, RestorePoint, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    caplog.set_level(logging.WARNING, "liverestore.nbd")
    held: list[socket.socket] = []
    try:
        for _ in range(512):  # connect, then say nothing: not even the 4 bytes of client flags
            held.append(socket.create_connection(("127.0.0.1", agent.port)))
        time.sleep(0.5)
        for _ in range(300):  # a burst on top, each also silent
            held.append(socket.create_connection(("127.0.0.1", agent.port)))
        t0 = time.monotonic()
        r = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{agent.port}/vm1/disk0"], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
        elapsed = time.monotonic() - t0
        print(f"nbdinfo behind 512 silent connections and a burst of 300: {elapsed:.2f} s")
        assert r.returncode == 0 and "64 MiB" in r.stdout.replace("67108864", "64 MiB"), r.stderr
        assert elapsed < 2.0, f"nbdinfo took {elapsed:.1f} s"
        c = _handshaken(agent.port)
        content = disk_point[2]
        assert c.read(1 * MiB + 777, 5000) == content[1 * MiB + 777 : 1 * MiB + 5777]
        c.close()
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped the oldest connection still in its handshake" in m for m in warnings)
    assert len(warnings) < 20, "refusals are rate-limited"


def test_the_handshake_timeout_covers_the_client_flags(
    agent: AgentThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT_S", 1.0)
    s = socket.create_connection(("127.0.0.1", agent.port))
    s.settimeout(10)
    greeting = s.recv(18)
    assert greeting.startswith(p.NBDMAGIC)
    t0 = time.monotonic()
    assert s.recv(1) == b"", "a client that never sends its flags is dropped"
    assert time.monotonic() - t0 < 5
    s.close()


def test_zero_length_read_with_structured_replies_is_a_done_chunk(agent: AgentThread) -> None:
    c = _handshaken(agent.port)
    assert c.structured
    c.request(p.CMD_READ, 4096, 0)
    flags, rtype, err, body = _raw_reply_header(c)
    assert flags & p.REPLY_FLAG_DONE and rtype == p.REPLY_TYPE_NONE and err == 0 and body == b""
    # libnbd (nbdsh runs on Debian's own python3) reads zero bytes, then more on the same connection
    r = subprocess.run(["/usr/bin/python3", "-m", "nbd", "-u", f"nbd://127.0.0.1:{agent.port}/vm1/disk0", "-c",
                        "h.set_strict_mode(0); print(len(h.pread(0, 4096))); print(len(h.pread(4096, 0)))"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["0", "4096"], r.stdout + r.stderr
    c.close()


def _proc_status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key}")


def _serve(repo: Repository, cache_dir: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    """A real ``serve`` of vm1 on a free loopback port, and that port (from the first line it
    logs); stopped here when it never says where it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(repo.root), "--vm", "vm1",
                             "--listen", "127.0.0.1:0", "--cache-dir", str(cache_dir), *args],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        return proc, int(line.split("nbd://127.0.0.1:")[1].split("/")[0])
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise


def test_pipelined_big_reads_with_unread_replies_stay_bounded(
    disk_point: tuple[Repository, RestorePoint, bytes], tmp_path: Path
) -> None:
    """A real ``serve --writable`` process; three connections each pipeline 100 reads of 32 MiB
    over copy-on-write blocks (answered from memory) and never read a reply."""
    repo, _point, content = disk_point
    proc, port = _serve(repo, tmp_path / "c", "--writable")
    try:
        writer = _handshaken(port)
        block = os.urandom(4 * MiB)
        for off in range(0, 32 * MiB, len(block)):
            writer.write(off, block)
        attackers = [_handshaken(port) for _ in range(3)]
        for c in attackers:
            for _ in range(100):
                c.request(p.CMD_READ, 0, 32 * MiB)
        time.sleep(4)  # all the server will do while nobody reads the replies
        peak = _proc_status(proc.pid, "VmHWM")
        print(f"serve peak RSS under 3 x 100 pipelined 32 MiB reads: {peak:.0f} MiB")
        assert peak < 200, f"the agent peaked at {peak:.0f} MiB"
        for c in attackers:
            c.sock.close()
        assert writer.read(40 * MiB, 4096) == content[40 * MiB : 40 * MiB + 4096]
        assert writer.read(0, 4096) == block[:4096]
        writer.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_spec_points(agent: AgentThread) -> None:
    c = _handshaken(agent.port)
    for flags, cmd, offset, length, errno in [
        (1 << 9, p.CMD_READ, 0, 4096, p.EINVAL),  # an unknown command flag
        (0, p.CMD_WRITE, 64 * MiB - 512, 1024, p.ENOSPC),  # a write crossing the end
        (0, p.CMD_READ, 0, 33 * MiB, p.EINVAL),  # oversize read, no DF
        (p.CMD_FLAG_DF, p.CMD_READ, 0, 33 * MiB, p.EOVERFLOW),  # oversize read under DF
    ]:
        payload = bytes(length) if cmd == p.CMD_WRITE else b""
        c.request(cmd, offset, length, payload, flags=flags)
        with pytest.raises(NbdError) as e:
            c.reply()
        assert e.value.errno == errno, (flags, cmd, offset, length)
    c.close()
    r = subprocess.run(["qemu-img", "info", f"nbd://127.0.0.1:{agent.port}/nope"], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "vm1/disk0" in r.stderr, r.stderr  # the error names what exists


def test_one_connections_bad_requests_log_a_few_lines_and_a_count(
    agent: AgentThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "liverestore.nbd")
    c = _handshaken(agent.port)
    for _ in range(1000):
        c.request(p.CMD_READ, 0, 4096, flags=1 << 9)
    for _ in range(1000):
        with pytest.raises(NbdError):
            c.reply()
    c.close()
    time.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "liverestore.nbd"]
    assert len(lines) <= nbd_server.WARNINGS_PER_CONNECTION + 1, len(lines)
    assert any("990 more failed requests not logged" in m for m in lines), lines[-3:]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem that fills up: a 6 MiB tmpfs (the tests run as root, as CI does)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests need root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path) -> Path:
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_cache_disk_flush_is_enospc_and_saves_resume_afterwards(
    small_fs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    content = make_disk(tmp_path / "d.raw", 8 * MiB)
    repo = Repository.init(tmp_path / "repo2", 64 * 1024)
    point, _ = run_backup(repo, "vm2", [tmp_path / "d.raw"], [])
    a = AgentThread(repo, point, AgentConfig(cache_dir=small_fs / "cache"))
    try:
        c = NbdClient("127.0.0.1", a.port, "vm2/d", timeout=10)
        filler = _fill(small_fs)
        os.truncate(filler, filler.stat().st_size - 1 * MiB)  # room for 16 cached blocks, no more
        assert c.read(1 * MiB, 1 * MiB) == content[1 * MiB : 2 * MiB]
        c.request(p.CMD_FLUSH, 0, 0)  # the bitmap cannot be written now
        with pytest.raises(NbdError) as e:
            c.reply()
        assert e.value.errno == p.ENOSPC
        time.sleep(2.5)  # the once-a-second save fails meanwhile
        filler.unlink()
        time.sleep(2.5)  # and succeeds again once there is room
        bitmap = (small_fs / "cache" / f"vm2-{point.id}" / "d.cache.bitmap").read_bytes()
        saved = sum(bin(b).count("1") for b in bitmap[_HEADER.size :])
        present = a.agent.exports["vm2/d"].read_cache.present
        assert saved == present and saved >= 16, (saved, present)
        c.close()
    finally:
        a.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("crashed" in m for m in messages)
    assert any("cannot save the read-cache bitmap" in m for m in messages)
    assert any("bitmap saved again" in m for m in messages)
    shutil.rmtree(small_fs / "cache", ignore_errors=True)


def test_serve_memory_does_not_grow_with_the_reads_it_answers(
    disk_point: tuple[Repository, RestorePoint, bytes], tmp_path: Path
) -> None:
    """A real ``serve`` answers 131,072 cached 4 KiB reads (nbdcopy, eight passes over the disk).
    Its memory must not follow the number of reads: a restore keeps the reads it answers to
    learn the boot profile (up to 100,000 of them, about 15 MiB), a plain ``serve`` has nobody to
    read them back and keeps none (it grew 14.8 MiB here when it kept them). ``--access-log``
    still gets every read."""
    repo, _point, _content = disk_point
    log_path = tmp_path / "access.log"
    proc, port = _serve(repo, tmp_path / "c", "--access-log", str(log_path))
    try:
        uri = f"nbd://127.0.0.1:{port}/vm1/disk0"
        copy = ["nbdcopy", "--no-extents", "--connections=1", "--requests=16", uri, "null:"]  # every block, holes too
        subprocess.run([*copy, "--request-size=1048576"], check=True, timeout=120)  # the cache is full
        subprocess.run([*copy, "--request-size=4096"], check=True, timeout=120)  # the allocator's steady state
        before = _proc_status(proc.pid, "VmRSS")
        for _ in range(8):
            subprocess.run([*copy, "--request-size=4096"], check=True, timeout=120)
        grew = _proc_status(proc.pid, "VmRSS") - before
        print(f"serve RSS grew {grew:.1f} MiB over 131,072 cached 4 KiB reads")
        assert grew < 6, f"serve grew {grew:.1f} MiB answering reads from its cache"
    finally:
        proc.terminate()
        proc.wait(30)
    logged = log_path.read_text().splitlines()
    assert len(logged) == 64 + 16384 * 9, len(logged)  # every read, the 1 MiB ones first
