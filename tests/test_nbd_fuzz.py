"""A raw-socket fuzz campaign against a real ``liverestore serve`` process.

Each case opens a connection and sends one of: mutated handshakes and options, well-framed but
random commands (any command, flags, offset, length; lies in write payloads) followed by one
verified read, truncated frames, abrupt closes; every 500 cases a burst of connections. The
agent must answer or drop that connection — never crash, hang, return a wrong byte, or leak a
descriptor. CI runs ``--fuzz-cases`` (default 3000); the soak is::

    .venv/bin/python -m pytest tests/test_nbd_fuzz.py --fuzz-cases 200000 -s

and prints cases, crashes, hangs, wrong bytes, RSS and descriptor counts.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from liverestore.agent.nbd import protocol as p
from liverestore.backup import run_backup
from liverestore.repository import Repository
from tests.helpers import MiB, make_disk

EXPORT = "vm1/disk0"
SIZE = 32 * MiB


@dataclass
class Campaign:
    cases: int = 0
    dropped: int = 0  # connections the agent closed (a protocol violation: its right)
    verified_reads: int = 0
    wrong_bytes: int = 0
    hangs: int = 0
    crashes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _handshake(s: socket.socket, structured: bool) -> None:
    _recv_exact(s, 18)
    s.sendall(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))

    def option(opt: int, data: bytes) -> list[int]:
        s.sendall(struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data)
        types = []
        while True:
            _magic, _o, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
            _recv_exact(s, length)
            types.append(rtype)
            if rtype == p.REP_ACK or rtype & p.REP_FLAG_ERROR:
                return types

    if structured:
        option(p.OPT_STRUCTURED_REPLY, b"")
        q, name = p.BASE_ALLOCATION.encode(), EXPORT.encode()
        option(p.OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
    name = EXPORT.encode()
    assert option(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))[-1] == p.REP_ACK


def _replies_until(s: socket.socket, want: int, requests: dict[int, tuple[int, int, int]]) -> bytes:
    """Read replies (any order) until the one for handle ``want``; returns its read data."""
    while True:
        magic = struct.unpack(">I", _recv_exact(s, 4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", _recv_exact(s, 12))
            cmd, _off, length = requests[handle]
            data = _recv_exact(s, length) if cmd == p.CMD_READ and not err else b""
            if handle == want:
                return data
            continue
        assert magic == p.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        out = bytearray()
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", _recv_exact(s, 16))
            body = _recv_exact(s, length)
            if rtype == p.REPLY_TYPE_OFFSET_DATA and handle == want:
                off = struct.unpack(">Q", body[:8])[0] - requests[want][1]
                out[off : off + length - 8] = body[8:]
            if flags & p.REPLY_FLAG_DONE:
                break
            magic = struct.unpack(">I", _recv_exact(s, 4))[0]
        if handle == want:
            return bytes(out)


def _random_request(rnd: random.Random, handle: int) -> tuple[bytes, tuple[int, int, int]]:
    cmd = rnd.choice([p.CMD_READ] * 6 + [p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES,
                                          p.CMD_BLOCK_STATUS, 8, 9, 200])  # fmt: skip
    flags = rnd.choice([0, 0, 0, p.CMD_FLAG_FUA, p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE, rnd.getrandbits(16)])
    offset = rnd.choice([0, rnd.randrange(SIZE), SIZE - 1, SIZE, 2**63 - 1, rnd.getrandbits(64)])
    length = rnd.choice([0, 1, 512, 4096, 65536, rnd.randrange(1, 1 << 20), 32 * MiB, 32 * MiB + 1,
                         rnd.getrandbits(32)])  # fmt: skip
    payload = b""
    if cmd == p.CMD_WRITE:
        length = min(length, 1 << 16)  # a write's payload always follows its header
        payload = rnd.randbytes(length)
    header = p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length)
    return header + payload, (cmd, offset, length)


def _case(port: int, rnd: random.Random, content: bytes, c: Campaign) -> None:
    kind = rnd.choice(["handshake", "commands", "commands", "commands", "truncated", "abrupt"])
    c.kinds[kind] = c.kinds.get(kind, 0) + 1
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if kind == "handshake":
            _recv_exact(s, 18)
            frames = [struct.pack(">I", rnd.choice([1, 3, 0, rnd.getrandbits(32)]))]
            for _ in range(rnd.randrange(1, 6)):
                data = rnd.randbytes(rnd.randrange(0, 80))
                lie = rnd.choice([0, 0, 0, 1, -1, 100_000])
                frames.append(struct.pack(">QII", rnd.choice([p.IHAVEOPT] * 3 + [rnd.getrandbits(64)]),
                                          rnd.choice([rnd.randrange(0, 12), rnd.getrandbits(32)]),
                                          max(0, len(data) + lie)) + data)  # fmt: skip
            s.sendall(b"".join(frames))
            s.settimeout(0.05)
            with contextlib.suppress(TimeoutError, OSError):
                s.recv(65536)
            return
        _handshake(s, structured=rnd.random() < 0.7)
        if kind == "truncated":
            frame, _ = _random_request(rnd, 1)
            s.sendall(frame[: rnd.randrange(1, max(2, len(frame)))])
            return
        if kind == "abrupt":
            for h in range(rnd.randrange(1, 20)):
                s.sendall(_random_request(rnd, h + 1)[0])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            return
        requests: dict[int, tuple[int, int, int]] = {}
        for h in range(1, rnd.randrange(2, 12)):
            frame, requests[h] = _random_request(rnd, h)
            s.sendall(frame)
        want = len(requests) + 1
        off = rnd.randrange(0, SIZE - 70_000)
        ln = rnd.randrange(1, 65_536)
        requests[want] = (p.CMD_READ, off, ln)
        s.sendall(p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, want, off, ln))
        try:
            data = _replies_until(s, want, requests)
        except TimeoutError:
            c.hangs += 1
            return
        except ConnectionError:
            c.dropped += 1
            return
        c.verified_reads += 1
        if data != content[off : off + ln]:
            c.wrong_bytes += 1
    except ConnectionError:
        c.dropped += 1
    finally:
        s.close()


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_fuzz_campaign_against_a_serving_agent(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cases = int(request.config.getoption("--fuzz-cases"))
    seed = int(request.config.getoption("--fuzz-seed"))
    content = make_disk(tmp_path / "disk0.raw", SIZE)
    repo = Repository.init(tmp_path / "repo", 64 * 1024)
    run_backup(repo, "vm1", [tmp_path / "disk0.raw"], [])
    repo.close()
    log_path = tmp_path / "serve.log"  # the agent's log, for a failure's post-mortem
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(tmp_path / "repo"),
                             "--vm", "vm1", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache")],
                            stderr=log)  # fmt: skip
    c = Campaign()
    rnd = random.Random(seed)
    try:
        deadline = time.monotonic() + 30
        while "nbd://127.0.0.1:" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = int(log_path.read_text().split("nbd://127.0.0.1:")[1].split("/")[0])
        fds0, rss0 = _fds(proc.pid), _status_mib(proc.pid, "VmRSS")
        t0 = time.monotonic()
        for i in range(cases):
            c.cases += 1
            _case(port, rnd, content, c)
            if i % 500 == 499:
                burst = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
                for s in burst:
                    s.close()
                if proc.poll() is not None:
                    c.crashes += 1
                    break
        time.sleep(1.0)  # let the agent see the last closes
        fds1, rss1, peak = _fds(proc.pid), _status_mib(proc.pid, "VmRSS"), _status_mib(proc.pid, "VmHWM")
        elapsed = time.monotonic() - t0
        if proc.poll() is not None:
            c.crashes += 1
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    print(f"\nfuzz: {c.cases} cases in {elapsed:.0f} s (seed {seed}), kinds {c.kinds}; {c.crashes} crashes, "
          f"{c.hangs} hangs, {c.wrong_bytes} wrong reads of {c.verified_reads} verified, {c.dropped} dropped "
          f"connections; fds {fds0} -> {fds1}; RSS {rss0:.0f} -> {rss1:.0f} MiB (peak {peak:.0f})")  # fmt: skip
    assert c.crashes == 0 and c.hangs == 0 and c.wrong_bytes == 0
    assert c.verified_reads > cases // 4
    assert fds1 <= fds0 + 2, f"descriptors leaked: {fds0} -> {fds1}"
    assert peak < 300, f"RSS peaked at {peak:.0f} MiB"
