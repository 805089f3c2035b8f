"""``repair-index``: an index object lost or damaged leaves every chunk in its pack, and the index
is written again from the packs alone (each names its chunks in a trailer; packs from before
trailers are split by their zstd frames). Until then prune deletes nothing, and verify says what
to run. Encrypted packs without a trailer cannot be split: said, and nothing is removed."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from liverestore.agent.agent import AgentConfig
from liverestore.repository import Repository
from liverestore.repository.backend import Handle, LocalBackend
from liverestore.repository.chunkstore import chunk_id
from tests.helpers import AgentThread, MiB
from tests.nbdclient import NbdClient

BS = 64 * 1024


def lr(*args: str, password: Path | None = None) -> subprocess.CompletedProcess[str]:
    pw = ["--password-file", str(password)] if password else []
    return subprocess.run([sys.executable, "-m", "liverestore", *pw, *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def _backed_up(tmp_path: Path, size: int = 40 * MiB, password: Path | None = None) -> tuple[Path, bytes]:
    """A repository with one point of vm1 (half-compressible blocks: several packs)."""
    rnd = random.Random(7)
    content = b"".join(rnd.randbytes(BS // 2) * 2 for _ in range(size // BS))
    disk = tmp_path / "disk0.raw"
    disk.write_bytes(content)
    repo = tmp_path / "repo"
    enc = ["--encrypt"] if password else []
    assert lr("init", str(repo), "--block-size", "64K", *enc, password=password).returncode == 0
    r = lr("backup", "--repo", str(repo), "--vm", "vm1", str(disk), password=password)
    assert r.returncode == 0, r.stderr
    return repo, content


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(repo: Path, kind: str) -> list[Path]:
    return sorted(p for p in (repo / kind).rglob("*") if p.is_file())


def _served(repo_path: Path, cache: Path, password: str | None = None) -> bytes:
    """vm1's disk read whole over NBD from a fresh read-cache."""
    repo = Repository(repo_path, password)
    agent = AgentThread(repo, repo.get_point("vm1"), AgentConfig(cache_dir=cache))
    try:
        c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
        size = c.size
        got = b"".join(c.read(off, min(4 * MiB, size - off)) for off in range(0, size, 4 * MiB))
        c.close()
        return got
    finally:
        agent.close()
        repo.close()


def test_a_lost_index_is_rebuilt_from_the_packs_and_prune_deletes_nothing_meanwhile(tmp_path: Path) -> None:
    repo, content = _backed_up(tmp_path)
    packs = _objects(repo, "packs")
    assert len(packs) >= 2
    for index in _objects(repo, "index"):
        index.unlink()  # a lifecycle rule, or a hand cleaning up

    r = lr("verify", "--repo", str(repo))
    assert r.returncode == 1 and "is missing from the repository" in r.stderr
    assert f"{len(packs)} pack(s) are named by no readable index object: 'liverestore repair-index'" in r.stderr

    # every pack now looks like one a dead backup left; prune must not take the backup with it
    before = _files(repo / "packs")
    r = lr("prune", "--repo", str(repo))
    assert r.returncode == 1 and "prune stopped, nothing deleted" in r.stderr and "repair-index" in r.stderr
    assert "Traceback" not in r.stderr and _files(repo / "packs") == before

    stored = [_files(repo / kind) for kind in ("packs", "index", "locks")]
    r = lr("repair-index", "--repo", str(repo), "--dry-run")
    assert r.returncode == 0 and f"would index {len(packs)} pack(s) holding {len(content) // BS} chunk(s)" in r.stdout
    assert [_files(repo / kind) for kind in ("packs", "index", "locks")] == stored  # no object, not even a lease

    r = lr("repair-index", "--repo", str(repo))
    assert r.returncode == 0, r.stderr
    assert f"indexed {len(packs)} pack(s) holding {len(content) // BS} chunk(s)" in r.stdout
    assert lr("verify", "--repo", str(repo)).returncode == 0
    assert _served(repo, tmp_path / "cache") == content
    r = lr("prune", "--repo", str(repo))
    assert r.returncode == 0 and "deleted 0 chunk" in r.stdout, r.stdout + r.stderr
    assert lr("repair-index", "--repo", str(repo)).stdout.startswith("indexed 0 pack(s)")  # nothing left to do


def test_a_damaged_index_object_is_replaced_then_removed(tmp_path: Path) -> None:
    repo, content = _backed_up(tmp_path)
    (damaged,) = _objects(repo, "index")
    damaged.write_bytes(bytes(len(damaged.read_bytes())))
    r = lr("prune", "--repo", str(repo))
    assert r.returncode == 1 and "is unreadable" in r.stderr and "repair-index" in r.stderr

    r = lr("repair-index", "--repo", str(repo))
    assert r.returncode == 0 and "removed 1 of 1 damaged index object(s)" in r.stdout, r.stdout + r.stderr
    (rebuilt,) = _objects(repo, "index")
    assert rebuilt.name != damaged.name and not damaged.exists()
    assert lr("verify", "--repo", str(repo)).returncode == 0
    assert _served(repo, tmp_path / "cache") == content


def _strip_trailers(repo: Path) -> int:
    """Rewrite every pack as packs were before they had a trailer (chunks only, named by their
    hash); the number of packs."""
    backend = LocalBackend(repo)
    packs = list(backend.list("packs"))
    for pack in packs:
        data = backend.load(Handle("packs", pack))
        length = int.from_bytes(data[-12:-8], "little")
        assert data[-8:] == b"LRPACKT1"
        old = data[: len(data) - 12 - length]
        backend.save(Handle("packs", chunk_id(old)), old)
        backend.remove(Handle("packs", pack))
    return len(packs)


def test_packs_from_before_trailers_are_split_by_their_frames(tmp_path: Path) -> None:
    repo, content = _backed_up(tmp_path)
    n = _strip_trailers(repo)
    for index in _objects(repo, "index"):
        index.unlink()
    junk = b"not a pack" * 100  # a stray object among the packs: said, and every other pack indexed
    LocalBackend(repo).save(Handle("packs", chunk_id(junk)), junk)
    r = lr("repair-index", "--repo", str(repo))
    assert r.returncode == 1 and f"indexed {n} pack(s) holding {len(content) // BS} chunk(s)" in r.stdout, r.stderr
    assert f"UNREADABLE: pack {chunk_id(junk)}: no chunk can be read at offset 0" in r.stderr
    assert "1 pack(s) could not be read (UNREADABLE above); every other pack is indexed" in r.stderr
    assert lr("verify", "--repo", str(repo)).returncode == 0
    assert _served(repo, tmp_path / "cache") == content
    r = lr("prune", "--repo", str(repo))  # no point uses the stray object, and no index names it
    assert r.returncode == 0 and "1 pack(s) removed" in r.stdout, r.stdout + r.stderr
    assert lr("repair-index", "--repo", str(repo)).returncode == 0


def test_encrypted_packs_are_rebuilt_from_their_sealed_trailers_and_without_one_nothing_is_removed(
    tmp_path: Path,
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    repo, content = _backed_up(tmp_path, size=24 * MiB, password=pw)
    for index in _objects(repo, "index"):
        index.unlink()
    r = lr("repair-index", "--repo", str(repo), password=pw)
    assert r.returncode == 0 and f"holding {len(content) // BS} chunk(s)" in r.stdout, r.stderr
    assert lr("verify", "--repo", str(repo), password=pw).returncode == 0
    assert _served(repo, tmp_path / "cache", "correct horse battery staple") == content

    # a pack without a trailer in an encrypted repository: its sealed chunks carry no length
    (index,) = _objects(repo, "index")
    index.write_bytes(b"damaged")
    backend = LocalBackend(repo)
    pack = next(iter(backend.list("packs")))
    data = backend.load(Handle("packs", pack))
    backend.remove(Handle("packs", pack))
    backend.save(Handle("packs", pack), data[: len(data) - 12])  # its tail lost: no trailer to be found
    r = lr("repair-index", "--repo", str(repo), password=pw)
    assert r.returncode == 1 and f"UNREADABLE: pack {pack}:" in r.stderr and "cannot be told apart" in r.stderr
    assert "removed 0 of 1 damaged index object(s)" in r.stdout and "Traceback" not in r.stderr
    assert "the 1 damaged index object(s) stay until they can" in r.stderr
    assert index.exists()  # what it named may be in that pack: it stays
