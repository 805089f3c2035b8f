"""Hostile NBD clients: fuzzed handshakes and commands, oversize lengths, half-closed and idle
connections. The agent answers with NBD errors or drops that one connection — and keeps serving
everyone else the right bytes."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liverestore.agent.nbd import protocol as p
from liverestore.backup import run_backup
from liverestore.repository import Repository
from tests.helpers import AgentThread, MiB, make_disk
from tests.nbdclient import NbdClient, NbdError


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentThread, bytes]]:
    from liverestore.agent.agent import AgentConfig

    base = tmp_path_factory.mktemp("hostile")
    content = make_disk(base / "disk0.raw", 32 * MiB)
    repo = Repository.init(base / "repo")
    point, _ = run_backup(repo, "vm1", [base / "disk0.raw"], [])
    agent = AgentThread(repo, point, AgentConfig(cache_dir=base / "cache"))
    yield agent, content
    agent.close()


def _drain(sock: socket.socket, seconds: float = 0.3) -> None:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _still_serving(agent: AgentThread, content: bytes) -> None:
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0", timeout=10)
    assert c.read(1 * MiB + 777, 5000) == content[1 * MiB + 777 : 1 * MiB + 5777]
    c.close()


option_frame = st.builds(
    lambda magic, opt, data, lie: struct.pack(">QII", magic, opt, len(data) + lie) + data,
    st.sampled_from([p.IHAVEOPT, p.IHAVEOPT, 0, 0xDEADBEEF]),
    st.integers(0, 12) | st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
    st.sampled_from([0, 0, 1, -1, 100_000, 2**31]).filter(lambda x: x >= 0),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.integers(0, 2**32 - 1) | st.just(3), frames=st.lists(option_frame, max_size=5))
def test_fuzzed_handshake(served: tuple[AgentThread, bytes], flags: int, frames: list[bytes]) -> None:
    agent, content = served
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
        s.recv(18)
        s.sendall(struct.pack(">I", flags) + b"".join(frames))
        _drain(s)
    _still_serving(agent, content)


request_frame = st.builds(
    lambda magic, flags, cmd, offset, length: p.REQUEST_HEADER.pack(magic, flags, cmd, 7, offset, length),
    st.sampled_from([p.REQUEST_MAGIC] * 5 + [0x12345678]),
    st.integers(0, 0xFFFF),
    st.integers(0, 12) | st.integers(0, 0xFFFF),
    st.integers(0, 40 * MiB) | st.integers(0, 2**64 - 1),
    st.integers(0, 64 * 1024) | st.integers(0, 2**32 - 1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    structured=st.booleans(),
    frames=st.lists(request_frame, min_size=1, max_size=6),
    tail=st.binary(max_size=32),
)
def test_fuzzed_commands(
    served: tuple[AgentThread, bytes], structured: bool, frames: list[bytes], tail: bytes
) -> None:
    agent, content = served
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0", structured=structured)
    c.sock.sendall(b"".join(frames) + tail)
    c.sock.shutdown(socket.SHUT_WR)  # half-close: whatever is pending must not hang the server
    _drain(c.sock)
    c.sock.close()
    _still_serving(agent, content)


def test_specific_bad_requests_get_errors_not_disconnects(served: tuple[AgentThread, bytes]) -> None:
    agent, content = served
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    cases = [
        (p.CMD_READ, c.size, 1, p.EINVAL),  # past the end
        (p.CMD_READ, 2**64 - 512, 1024, p.EINVAL),  # offset overflow
        (p.CMD_READ, 0, p.MAX_REQUEST + 1, p.EINVAL),  # oversize read
        (42, 0, 512, p.EINVAL),  # unknown command
        (p.CMD_TRIM, 0, 4096, p.EPERM),  # read-only export
        (p.CMD_WRITE_ZEROES, 0, 4096, p.EPERM),
    ]
    for cmd, offset, length, errno in cases:
        c.request(cmd, offset, length)
        with pytest.raises(NbdError) as e:
            c.reply()
        assert e.value.errno == errno, (cmd, offset, length)
    assert c.read(0, 4096) == content[:4096]
    c.close()


def test_oversize_write_and_option_drop_only_that_connection(served: tuple[AgentThread, bytes]) -> None:
    agent, content = served
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    c.sock.sendall(p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 2**31))
    _drain(c.sock, 2)
    with pytest.raises(OSError):
        c.sock.sendall(b"x" * 65536 * 64)
        c.read(0, 512)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
        s.recv(18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 2**31))
        s.settimeout(5)
        assert s.recv(100) == b""  # closed, not waiting for 2 GiB
    _still_serving(agent, content)


def test_many_idle_connections(served: tuple[AgentThread, bytes], tmp_path: Path) -> None:
    agent, content = served
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=5) for _ in range(200)]
    try:
        time.sleep(0.2)
        _still_serving(agent, content)
        assert agent.agent.server.active_connections >= 200
    finally:
        for s in idle:
            s.close()
