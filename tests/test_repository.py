"""Repository format: dedup, zero blocks, integrity, formats, atomic points."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.errors import DiskFormatError, IntegrityError, LiverestoreError, RepositoryError
from liverestore.repository import Repository
from tests.helpers import MiB, make_disk
from tests.packs import flip_chunk_byte


def test_backup_roundtrip_and_zero_blocks_not_stored(repo: Repository, disk: tuple[Path, bytes]) -> None:
    path, content = disk
    point, stats = run_backup(repo, "vm1", [path], [])
    manifest = repo.load_manifest(point.record.disks[0])
    assert manifest.virtual_size == len(content)
    rebuilt = bytearray()
    for i, cid in enumerate(manifest.blocks):
        n = manifest.block_length(i)
        rebuilt += bytes(n) if cid is None else repo.chunks.get(cid, n)
    assert bytes(rebuilt) == content
    # blocks 10 and 11 were explicit zeros, block 5 a hole: none stored
    assert manifest.blocks[10] is None and manifest.blocks[11] is None and manifest.blocks[5] is None
    assert stats.blocks_zero == sum(c is None for c in manifest.blocks)
    # the repeated text block compresses well: stored bytes < data bytes
    assert stats.bytes_new_stored < manifest.allocated_bytes


def test_second_backup_stores_nothing_new_and_dedups_across_vms(
    repo: Repository, disk: tuple[Path, bytes]
) -> None:
    path, _ = disk
    _, first = run_backup(repo, "vm1", [path], [])
    _, second = run_backup(repo, "vm1", [path], [])
    _, other_vm = run_backup(repo, "vm2", [path], [])
    assert first.bytes_new_stored > 1 * MiB
    assert second.bytes_new_stored == 0 and second.blocks_new == 0
    assert other_vm.bytes_new_stored == 0
    assert len(repo.points("vm1")) == 2


def test_incremental_change_stores_only_changed_block(repo: Repository, disk: tuple[Path, bytes]) -> None:
    path, _ = disk
    run_backup(repo, "vm1", [path], [])
    with open(path, "r+b") as f:
        f.seek(30 * MiB + 7)
        f.write(b"changed")
    _, stats = run_backup(repo, "vm1", [path], [])
    assert stats.blocks_new == 1


def test_qcow2_source_matches_raw(repo: Repository, disk: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = disk
    q = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(path), str(q)], check=True)
    raw_point, _ = run_backup(repo, "a", [path], [])
    q_point, stats = run_backup(repo, "b", [q], [])
    m_raw = repo.load_manifest(raw_point.record.disks[0])
    m_q = repo.load_manifest(q_point.record.disks[0])
    assert list(m_raw.blocks) == list(m_q.blocks) and m_q.source_format == "qcow2"
    assert stats.bytes_new_stored == 0


def test_configs_are_stored(repo: Repository, disk: tuple[Path, bytes], tmp_path: Path) -> None:
    cfg = tmp_path / "vm1.xml"
    cfg.write_text("<domain><name>vm1</name></domain>")
    point, _ = run_backup(repo, "vm1", [disk[0]], [cfg])
    assert [c.filename for c in point.record.configs] == ["vm1.xml"]
    assert repo.read_config(point.record.configs[0]) == cfg.read_bytes()


def test_corrupt_chunk_is_an_error_never_data(repo: Repository, point: object) -> None:
    cid = next(c for c in repo.load_manifest(repo.get_point("vm1").record.disks[0]).blocks if c)
    flip_chunk_byte(repo, cid)
    with pytest.raises(IntegrityError, match=cid):
        repo.chunks.get(cid, 1 * MiB)


def test_bad_inputs(tmp_path: Path, repo: Repository, disk: tuple[Path, bytes]) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.open(tmp_path / "nope")
    with pytest.raises(RepositoryError, match="block size"):
        Repository.init(tmp_path / "r2", block_size=1000)
    with pytest.raises(RepositoryError, match="block size"):
        Repository.init(tmp_path / "r3", block_size=32 * 1024)
    with pytest.raises(RepositoryError, match="has no backups"):
        repo.get_point("ghost")
    run_backup(repo, "vm1", [disk[0]], [])
    with pytest.raises(RepositoryError, match="does not exist"):
        repo.get_point("vm1", "ffffffffffff")
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    with pytest.raises(DiskFormatError, match="vmdk"):
        run_backup(repo, "vm1", [vmdk], [])
    with pytest.raises(LiverestoreError, match="VM name"):
        run_backup(repo, "bad/name", [disk[0]], [])


def test_truncated_qcow2_is_rejected_and_leaves_no_point(repo: Repository, tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    make_disk(raw, 16 * MiB)
    q = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)], check=True)
    with open(q, "r+b") as f:
        f.truncate(q.stat().st_size // 2)
    with pytest.raises(DiskFormatError):
        run_backup(repo, "vmq", [q], [])
    assert repo.points("vmq") == []


def test_a_qcow2_name_on_raw_bytes_is_refused_unless_declared(tmp_path: Path) -> None:
    """A ``.qcow2`` file holding raw data (a lost header reads the same) is not guessed at."""
    repo = tmp_path / "repo"
    fake = tmp_path / "web01.qcow2"
    content = make_disk(fake, 8 * MiB)

    def lr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True)

    assert lr("init", str(repo)).returncode == 0
    r = lr("backup", "--repo", str(repo), "--vm", "web01", str(fake))
    assert r.returncode == 1 and "is named qcow2 but holds raw data" in r.stderr and "--format raw" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert lr("list", "--repo", str(repo)).stdout.count("point ") == 0, "nothing is committed"
    r = lr("backup", "--repo", str(repo), "--vm", "web01", "--format", "raw", str(fake))
    assert r.returncode == 0, r.stderr
    back = Repository.open(repo)
    manifest = back.load_manifest(back.get_point("web01").record.disks[0])
    assert manifest.source_format == "raw" and manifest.virtual_size == len(content)
    real = tmp_path / "real.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(fake), str(real)], check=True)
    r = lr("backup", "--repo", str(repo), "--vm", "web02", "--format", "raw", str(real))
    assert r.returncode == 1 and "is declared raw but holds qcow2 data" in r.stderr


def _remade(location: Path, *, strip_id: bool) -> Repository:
    """An encrypted repository made at ``location``, as one from before ids when ``strip_id``."""
    Repository.init(location, passphrase="pw").close()
    if strip_id:
        cfg_path = location / "repository.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("id", None)
        cfg_path.write_text(json.dumps(cfg))
    return Repository(location, passphrase="pw")


@pytest.mark.parametrize("strip_id", [False, True], ids=["with-id", "before-ids"])
def test_a_repository_made_again_where_one_was_inherits_nothing_from_its_catalog(
    tmp_path: Path, disk: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, strip_id: bool
) -> None:
    """An encrypted repository's catalog lives in the data dir, which outlives the repository. A
    repository deleted and made again at the same location (here on a fresh /tmp under a kept
    home, as a CI machine does) once found the old points in that catalog and wrote them out into
    the new repository as its own: its first backup then failed on a manifest that was never
    there. With an id, the new repository has a catalog of its own; from before ids (same
    catalog), the stale points are dropped, never written out."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    location = tmp_path / "repo"
    old = _remade(location, strip_id=strip_id)
    run_backup(old, "vm1", [disk[0]], [])
    old.put_profile("vm1", {"blocks": [1, 2, 3]})
    old.close()
    shutil.rmtree(location)

    new = _remade(location, strip_id=strip_id)
    try:
        assert new.points("vm1") == [] and list(new.backend.list("points")) == []
        assert new.get_profile("vm1") is None
        point, _ = run_backup(new, "vm1", [disk[0]], [])
        assert [p.id for p in new.points("vm1")] == [point.id] == list(new.backend.list("points"))
    finally:
        new.close()
