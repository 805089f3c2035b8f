"""Memory that does not grow with the disk: the compact manifest (bytes per allocated block, none
per hole), the old JSON manifests still load, and set 2 streams instead of queueing the disk."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from liverestore.agent.prefetch import BACKGROUND_WINDOW, start_background
from liverestore.agent.scheduler import FetchClass
from liverestore.backup import run_backup
from liverestore.errors import IntegrityError
from liverestore.repository import DiskManifest, Repository, RestorePoint
from tests.conftest import AgentFactory
from tests.helpers import MiB
from tests.nbdclient import NbdClient

TiB = 1 << 40


def _ids(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [rnd.randbytes(32).hex() for _ in range(n)]


def test_a_sparse_tebibyte_costs_bytes_per_allocated_block() -> None:
    bs = 64 * 1024
    count = TiB // bs  # 16 Mi blocks
    rnd = random.Random(1)
    allocated = sorted(rnd.sample(range(count), 20_000))
    ids = _ids(len(allocated), 2)
    table: dict[int, str] = dict(zip(allocated, ids, strict=True))

    def blocks() -> Iterator[str | None]:
        for i in range(count):
            yield table.get(i)

    t0 = time.monotonic()
    m = DiskManifest("big", TiB, bs, blocks(), "raw")
    built = time.monotonic() - t0
    assert m.allocated_count == len(allocated) and m.block_count == count
    assert m.memory_bytes() == 40 * len(allocated)  # before the allocation bitmap is needed
    back = DiskManifest.from_bytes(m.to_bytes(), "big")
    for i in [*rnd.sample(allocated, 200), 0, count - 1, allocated[0] + 1]:
        assert back.chunk(i) == table.get(i)
        assert back.is_allocated(i) == (i in table)
    # as decoded (what an agent holds): 32-bit block numbers, 36 bytes a block; with the bitmap
    # the agent uses for every read, one bit per block of the disk on top
    assert back.memory_bytes() == 36 * len(allocated) + count // 8
    assert list(back.allocated_blocks()) == allocated
    assert len(m.to_bytes()) < 50 * len(allocated)
    print(f"1 TiB manifest, {len(allocated)} allocated: built in {built:.1f} s, {back.memory_bytes() / MiB:.1f} MiB")


def test_format_1_manifests_still_load_and_damage_is_named() -> None:
    blocks = [None, "ab" * 32, None, "cd" * 32]
    doc = {"version": 1, "name": "d", "virtual_size": 4 * 65536 - 100, "block_size": 65536, "source_format": "raw",
           "blocks": blocks}  # fmt: skip
    m = DiskManifest.from_bytes(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()), "old")
    assert list(m.blocks) == blocks and m.allocated_bytes == 2 * 65536 - 100
    assert [i for i, _ in m.chunks()] == [1, 3] and m.blocks[-1] == "cd" * 32
    bad = zstandard.ZstdCompressor().compress(json.dumps({**doc, "blocks": blocks[:3]}).encode())
    with pytest.raises(IntegrityError, match="manifest short is"):
        DiskManifest.from_bytes(bad, "short")
    with pytest.raises(IntegrityError, match="unreadable"):
        DiskManifest.from_bytes(m.to_bytes()[:-9], "cut")


def test_format_2_block_tables_of_the_wrong_length_are_damage() -> None:
    """The decoder streams the block table into its arrays: a table one byte short or long, a
    count beyond the disk, or a header with no table are named as damage, never half-loaded."""
    ids = _ids(3000, 7)
    m = DiskManifest("d", 4000 * 65536, 65536, [*ids, *([None] * 1000)], "raw")
    doc = zstandard.ZstdDecompressor().decompress(m.to_bytes())
    back = DiskManifest.from_bytes(zstandard.ZstdCompressor().compress(doc), "whole")
    assert list(back.blocks) == list(m.blocks) and back.position(2999) == 2999 and back.position(3000) is None
    assert back.raw_id(5).hex() == ids[5]
    header, _, body = doc.partition(b"\n")
    too_many = json.dumps({**json.loads(header), "allocated": 5000}).encode()
    for label, bad in [("short", doc[:-1]), ("long", doc + b"\0"), ("no table", header),
                       ("count", too_many + b"\n" + body)]:  # fmt: skip
        with pytest.raises(IntegrityError, match=f"manifest {label} is unreadable"):
            DiskManifest.from_bytes(zstandard.ZstdCompressor().compress(bad), label)


def test_set2_streams_a_window_not_the_whole_disk(tmp_path: Path, start_agent: AgentFactory) -> None:
    base = tmp_path
    disk = base / "d.raw"
    rnd = random.Random(3)
    with open(disk, "wb") as f:
        for _ in range(64):  # 64 MiB in 64 KiB blocks: 1024 blocks, four windows
            f.write(rnd.randbytes(MiB))
    repo = Repository.init(base / "repo", 64 * 1024)
    point, _ = run_backup(repo, "vm1", [disk], [])
    agent = start_agent(repo, point, repo_latency_ms=2)
    export = agent.agent.exports["vm1/d"]
    queued_max = 0

    async def watch() -> int:
        nonlocal queued_max
        todo = start_background(export)
        while export.read_cache.present < export.manifest.allocated_count:
            queued_max = max(queued_max, agent.agent.scheduler.queued(FetchClass.PREFETCH))
            await asyncio.sleep(0.005)
        return todo

    assert agent.call(watch()) == 1024
    assert 0 < queued_max <= BACKGROUND_WINDOW
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    got = b"".join(c.read(off, 16 * MiB) for off in range(0, 64 * MiB, 16 * MiB))
    assert got == disk.read_bytes()  # every block came through set 2 intact
    c.close()
    assert agent.agent.metrics.fetched_by_class.get("prefetch") == 1024


def test_block_status_jumps_holes_and_matches_a_block_walk(
    repo: Repository, point: RestorePoint, start_agent: AgentFactory
) -> None:
    export = start_agent(repo, point).agent.exports["vm1/disk0"]
    m, bs = export.manifest, export.block_size
    rnd = random.Random(5)
    for _ in range(300):
        offset = rnd.randrange(0, m.virtual_size)
        length = rnd.randrange(1, m.virtual_size - offset + 1)
        walk: list[tuple[int, int]] = []
        pos = offset
        for i in range(offset // bs, (offset + length - 1) // bs + 1):
            seg = min(offset + length, (i + 1) * bs) - pos
            flags = 0 if m.is_allocated(i) else 3  # HOLE | ZERO
            walk[-1:] = [(walk[-1][0] + seg, flags)] if walk and walk[-1][1] == flags else [*walk[-1:], (seg, flags)]
            pos += seg
        assert export.block_status(offset, length) == walk, (offset, length)
