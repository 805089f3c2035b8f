"""Cold reads through a real agent. Drop-behind: the read-cache's pages leave the host's page cache
once one read has taken their block whole, and only then; blocks nobody read yet, or read
piecemeal, stay; what was dropped reads back right (from disk). Fetch limit: a cold read from
packs keeps neighbouring blocks in shared ranged requests."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import subprocess
import time
from pathlib import Path

from liverestore.agent.dropbehind import BATCH_BYTES
from liverestore.backup import run_backup
from liverestore.repository import Repository
from tests.conftest import AgentFactory
from tests.helpers import MiB
from tests.nbdclient import NbdClient

SIZE = 192 * MiB

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore(2) over a mapping that touches nothing)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def settled(path: Path, at_most: int, timeout: float = 20.0) -> int:
    """Resident bytes once the drop-behind thread has caught up (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (now := resident_bytes(path)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_blocks_read_whole_leave_the_page_cache_and_read_back_right(
    repo: Repository, tmp_path: Path, start_agent: AgentFactory
) -> None:
    src = tmp_path / "disk0.raw"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    point, _ = run_backup(repo, "vm1", [src], [])
    agent = start_agent(repo, point)
    export = agent.agent.exports["vm1/disk0"]
    cache = export.read_cache.data_path

    # Blocks fetched ahead (as set 1 and set 2 do) and not yet read stay: the reader is still to come.
    agent.call(export.cache(0, SIZE))
    assert export.read_cache.present == SIZE // export.block_size
    os.sync()
    assert resident_bytes(cache) >= SIZE - 8 * MiB

    # 4 KiB reads take no block whole: a guest reading a block piecemeal finds it in memory.
    c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
    for off in range(0, 48 * MiB, 4096):
        assert c.read(off, 4096) == data[off : off + 4096]
    c.close()
    assert resident_bytes(cache) >= SIZE - 8 * MiB

    # A whole read (QEMU's mirror, nbdcopy) lets them go, but for the last batches in flight.
    out = tmp_path / "out.raw"
    r = subprocess.run(["nbdcopy", "--request-size=1048576", agent.uri("disk0"), str(out)],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    left = settled(cache, 2 * BATCH_BYTES + 4 * MiB)
    assert left <= 2 * BATCH_BYTES + 4 * MiB, f"{left / MiB:.0f} MiB of {SIZE / MiB:.0f} still cached"
    assert agent.agent.drop_behind.dropped_bytes >= SIZE - 2 * BATCH_BYTES - 4 * MiB

    # Dropped is not lost: a second whole read, now from disk, gets the same bytes.
    out.unlink()
    r = subprocess.run(["nbdcopy", "--request-size=65536", agent.uri("disk0"), str(out)],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data


def test_a_cold_whole_read_from_packs_keeps_neighbouring_blocks_in_shared_requests(
    tmp_path: Path, start_agent: AgentFactory
) -> None:
    """The fetch limit counts blocks; a local repository's latency is the agent's own decoding, and
    read as a queue on a link it shrank the limit to a handful and split ranged reads apart."""
    src = tmp_path / "disk0.raw"
    src.write_bytes(os.urandom(SIZE))
    repo = Repository.init(tmp_path / "repo64", 64 * 1024)
    point, _ = run_backup(repo, "vm1", [src], [])
    agent = start_agent(repo, point)
    blocks = SIZE // agent.agent.exports["vm1/disk0"].block_size
    r = subprocess.run(["nbdcopy", "--request-size=1048576", "--requests=16", agent.uri("disk0"), "null:"],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    adaptive = agent.agent.scheduler.adaptive
    assert adaptive is not None
    requests = agent.agent.fetcher.requests
    assert requests <= blocks / 5, f"{requests} requests for {blocks} blocks; limit {adaptive.snapshot()}"
    repo.close()
