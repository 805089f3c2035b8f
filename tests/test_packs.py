"""Chunks packed into large objects: few objects per backup, neighbouring blocks read with one
ranged request, prune repacking mostly dead packs under a serving agent that follows the move,
and repositories from before packs (loose chunk objects) still read and still take backups."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from liverestore.backup import run_backup
from liverestore.repository import DiskManifest, Repository
from liverestore.repository.backend import Handle
from liverestore.repository.chunkstore import PackIndex
from liverestore.retention import forget, prune
from tests.conftest import AgentFactory
from tests.helpers import MiB
from tests.nbdclient import NbdClient

BS = 64 * 1024


def _files(root: Path) -> list[Path]:
    return [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []


def _random_disk(path: Path, size: int, seed: int, base: bytes | None = None, change: float = 1.0) -> bytes:
    """``size`` bytes of half-compressible blocks; with ``base``, that disk with ``change`` of its
    blocks rewritten."""
    rnd = random.Random(seed)
    data = bytearray(base or bytes(size))
    for at in range(0, size, BS):
        if base is None or rnd.random() < change:
            data[at : at + BS] = rnd.randbytes(BS // 2) * 2
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_backup_is_a_few_packs_and_a_sequential_read_a_few_requests(
    tmp_path: Path, start_agent: AgentFactory
) -> None:
    repo = Repository.init(tmp_path / "repo", BS)
    content = _random_disk(tmp_path / "d.raw", 48 * MiB, seed=1)
    point, stats = run_backup(repo, "vm1", [tmp_path / "d.raw"], [])
    blocks = 48 * MiB // BS
    packs, loose = _files(tmp_path / "repo" / "packs"), _files(tmp_path / "repo" / "chunks")
    assert not loose and 1 <= len(packs) <= -(-stats.bytes_new_stored // (16 * MiB)) + 1, [p.name for p in packs]
    assert len(_files(tmp_path / "repo" / "index")) == 1
    agent = start_agent(repo, point, fetch_slots=64)  # fixed: a read's 32 blocks are fetched at once
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    got = b"".join(c.read(off, 2 * MiB) for off in range(0, 48 * MiB, 2 * MiB))
    c.close()
    assert got == content
    requests = agent.agent.fetcher.requests
    print(f"{blocks} blocks read with {requests} requests")
    assert requests <= blocks // 8  # 32 blocks a read: neighbours in a pack share a ranged read

    # the chunks lie in the packs in disk order, though two workers compressed them: a batch of
    # neighbouring blocks is one contiguous span of its pack, never split by a swapped neighbour
    [located] = repo.chunks.locations([repo.load_manifest(point.record.disks[0])])
    spans = [(w.pack, w.offset, w.offset + w.length) for k in range(blocks) if (w := located.at(k)) is not None]
    assert len(spans) == blocks
    out_of_order = [k for k in range(1, blocks) if spans[k][0] == spans[k - 1][0] and spans[k][1] != spans[k - 1][2]]
    assert not out_of_order, f"blocks out of disk order in their pack: {out_of_order[:10]}"


def test_prune_repacks_a_mostly_dead_pack_and_a_serving_agent_follows(
    tmp_path: Path, start_agent: AgentFactory
) -> None:
    repo = Repository.init(tmp_path / "repo", BS)
    disk = tmp_path / "d.raw"
    first = _random_disk(disk, 8 * MiB, seed=2)
    p1, _ = run_backup(repo, "vm1", [disk], [])
    second = _random_disk(disk, 8 * MiB, seed=3, base=first, change=0.8)
    p2, _ = run_backup(repo, "vm1", [disk], [])
    agent = start_agent(repo, p2)
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    assert c.read(0, BS) == second[:BS]  # the agent has read the index: it now names p1's pack
    forget(repo, "vm1", keep_last=1, keep_daily=0, keep_weekly=0, apply=True)
    before = sum(f.stat().st_size for f in _files(tmp_path / "repo" / "packs"))
    report = prune(repo)
    after = sum(f.stat().st_size for f in _files(tmp_path / "repo" / "packs"))
    assert report.packs_repacked == 1 and report.packs_deleted == 1, report
    kept = {cid for cid in repo.load_manifest(p2.record.disks[0]).blocks if cid}
    live = sum(repo.chunks.stored_size(cid) for cid in kept)
    trailers = 40 * len(kept) + 12 * len(_files(tmp_path / "repo" / "packs"))  # a pack names its chunks
    assert after == live + trailers < before  # nothing dead is left in the packs
    assert c.read(0, 8 * MiB) == second  # the blocks p2 shares with p1 moved under the agent
    c.close()
    again = prune(repo)
    assert again.chunks_deleted == 0 and again.bytes_deleted == 0 and again.packs_deleted == 0
    v = subprocess.run([sys.executable, "-m", "liverestore", "verify", "--repo", str(tmp_path / "repo")],
                       capture_output=True, text=True)  # fmt: skip
    assert v.returncode == 0, v.stderr
    assert repo.points("vm1")[0].id == p2.id and p1.id not in {p.id for p in repo.points()}


def test_a_repository_of_loose_chunks_reads_and_takes_new_backups(
    tmp_path: Path, start_agent: AgentFactory
) -> None:
    root = tmp_path / "repo"
    repo = Repository.init(root, BS)
    disk = tmp_path / "d.raw"
    first = _random_disk(disk, 4 * MiB, seed=4)
    p1, stats1 = run_backup(repo, "vm1", [disk], [])
    # turn it into a repository as the version before packs wrote it: one object per chunk
    index = repo.chunks.reload()
    for cid in list(index.chunk_ids()):
        where = index.get(cid)
        assert where is not None
        repo.backend.save(Handle("chunks", cid), repo.chunks.load_raw(where, cid))
    for f in _files(root / "packs") + _files(root / "index"):
        f.unlink()
    cfg = json.loads((root / "repository.json").read_text())
    (root / "repository.json").write_text(json.dumps({**cfg, "version": 1}))
    repo.close()

    old = Repository.open(root)
    agent = start_agent(old, p1)
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    assert c.read(0, 4 * MiB) == first
    c.close()
    agent.close()  # p1 is no longer served: it can be forgotten
    second = _random_disk(disk, 4 * MiB, seed=5, base=first, change=0.5)
    p2, stats = run_backup(old, "vm1", [disk], [])
    assert 0 < stats.bytes_new_stored < 0.75 * stats1.bytes_new_stored  # the unchanged half is not stored again
    assert _files(root / "packs"), "new chunks go to packs"
    forget(old, "vm1", keep_last=1, keep_daily=0, keep_weekly=0, apply=True)
    report = prune(old)
    assert report.chunks_deleted > 0 and len(_files(root / "chunks")) < len(index)
    agent2 = start_agent(old, p2, cache_dir=tmp_path / "cache2")
    c = NbdClient("127.0.0.1", agent2.port, "vm1/d")
    assert c.read(0, 4 * MiB) == second
    c.close()
    v = subprocess.run([sys.executable, "-m", "liverestore", "verify", "--repo", str(root)],
                       capture_output=True, text=True)  # fmt: skip
    assert v.returncode == 0, v.stderr
    old.close()


def test_the_index_finds_every_chunk_and_the_first_copy_wins() -> None:
    rnd = random.Random(6)
    keys = [rnd.randbytes(32) for _ in range(5000)]
    index = PackIndex()
    index.add("ab" * 32, ((k, i * 100, 100) for i, k in enumerate(keys)))
    index.seal()
    index.add("cd" * 32, [(keys[7], 0, 50), (b"\x00" * 32, 10, 20)])  # keys[7] stored twice
    index.seal()
    assert len(index) == 5002 and sum(1 for _ in index.chunk_ids()) == 5001
    for i in rnd.sample(range(5000), 500):
        where = index.get(keys[i].hex())
        assert where is not None and (where.pack, where.offset, where.length) == ("ab" * 32, i * 100, 100)
    zero = index.get("00" * 32)
    assert zero is not None and zero.pack == "cd" * 32 and zero.offset == 10
    assert rnd.randbytes(32).hex() not in index and index.has_pack("cd" * 32) and not index.has_pack("ef" * 32)


def test_a_damaged_index_object_stops_prune_and_is_named_by_verify(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.init(root, BS)
    disk = tmp_path / "d.raw"
    _random_disk(disk, 2 * MiB, seed=7)
    run_backup(repo, "vm1", [disk], [])
    _random_disk(disk, 2 * MiB, seed=8)
    run_backup(repo, "vm2", [disk], [])
    first = sorted(_files(root / "index"), key=lambda f: f.stat().st_mtime)[0]
    first.write_bytes(first.read_bytes()[:-5])  # its packs are now named by nothing readable
    packs_before = sorted(_files(root / "packs"))
    lr = [sys.executable, "-m", "liverestore"]
    r = subprocess.run([*lr, "prune", "--repo", str(root)], capture_output=True, text=True)
    assert r.returncode == 1 and "prune stopped, nothing deleted: index object" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and sorted(_files(root / "packs")) == packs_before
    v = subprocess.run([*lr, "verify", "--repo", str(root)], capture_output=True, text=True)
    assert v.returncode == 1 and f"index object {first.name} is unreadable" in v.stderr, v.stderr


def test_an_agent_locates_its_blocks_without_holding_the_repository_index(
    tmp_path: Path, start_agent: AgentFactory
) -> None:
    """An agent resolves where its disks' blocks are from the index objects as they stream past
    and keeps 12 bytes a block, not the merged index of every backup in the repository: blocks
    shared within a disk and across disks are all found, a chunk no index names is reported as
    such, and reads are byte-exact with the merged index let go."""
    repo = Repository.init(tmp_path / "repo", BS)
    other = tmp_path / "other.raw"
    _random_disk(other, 8 * MiB, seed=8)
    run_backup(repo, "big", [other], [])  # chunks this agent never serves
    disk = tmp_path / "d.raw"
    block = random.Random(9).randbytes(BS // 2) * 2
    content = _random_disk(disk, 2 * MiB, seed=10)
    content = content[: 5 * BS] + block * 3 + content[8 * BS :]  # three blocks share one chunk
    disk.write_bytes(content)
    second = tmp_path / "e.raw"
    second.write_bytes(block + bytes(BS))  # and a second disk shares it too
    point, _ = run_backup(repo, "vm1", [disk, second], [])
    manifests = [repo.load_manifest(d) for d in point.record.disks]
    d_manifest, e_manifest = manifests
    stray = DiskManifest("x", 2 * BS, BS, ["ef" * 32, d_manifest.chunk(0)], "raw")
    repo.chunks.drop_index()
    streamed = repo.chunks.locations([d_manifest, e_manifest, stray])  # from the index objects
    merged = repo.chunks.reload()
    from_merged = repo.chunks.locations([d_manifest, e_manifest, stray])  # from the index in memory
    for d_loc, e_loc, x_loc in (streamed, from_merged):
        for m, loc in ((d_manifest, d_loc), (e_manifest, e_loc)):
            for k, (_, cid) in enumerate(m.chunks()):
                assert loc.at(k) == merged.get(cid), (m.name, k)
        assert d_loc.at(5) == d_loc.at(6) == d_loc.at(7) == e_loc.at(0) is not None
        assert x_loc.at(0) is None and x_loc.at(1) == d_loc.at(0)

    agent = start_agent(repo, point)
    assert repo.chunks._index is None  # let go once the agent's blocks were located
    c = NbdClient("127.0.0.1", agent.port, "vm1/d")
    assert c.read(0, len(content)) == content
    c.close()
    c = NbdClient("127.0.0.1", agent.port, "vm1/e")
    assert c.read(0, 2 * BS) == block + bytes(BS)
    c.close()
