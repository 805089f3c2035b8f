"""Encrypted repositories: nothing of the disks (or the VM's name) is readable in the stored
objects, a wrong passphrase is one line, a changed passphrase rewrites no data, and a flipped byte
anywhere is named by ``verify`` and is EIO on read, never wrong data."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from liverestore.repository import Repository
from tests.conftest import AgentFactory
from tests.helpers import MiB, tree_digest
from tests.nbdclient import NbdClient, NbdError
from tests.packs import flip_chunk_byte

VM = "payroll-db-7"  # a name that must not show in the bucket


def lr(*args: str, password: Path | None = None) -> subprocess.CompletedProcess[str]:
    pw = ["--password-file", str(password)] if password else []
    return subprocess.run([sys.executable, "-m", "liverestore", *pw, *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def _stored_files(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file()]


@pytest.fixture
def encrypted(tmp_path: Path) -> tuple[Path, Path, bytes, Path]:
    """(repository, password file, the 1 MiB pattern, the disk) after one backup."""
    pattern = random.Random(11).randbytes(MiB)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB + 4096)  # unaligned: the pattern straddles blocks
        f.write(pattern)
        f.seek(11 * MiB + 4096)
        f.write(pattern)  # and again, alike in its blocks: dedup still works inside the repository
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    repo = tmp_path / "repo"
    r = lr("init", str(repo), "--block-size", "64K", "--encrypt", password=pw)
    assert r.returncode == 0 and "encrypted repository" in r.stdout, r.stderr
    r = lr("backup", "--repo", str(repo), "--vm", VM, str(disk), password=pw)
    assert r.returncode == 0, r.stderr
    return repo, pw, pattern, disk


def test_objects_reveal_nothing_and_the_disk_comes_back(encrypted: tuple[Path, Path, bytes, Path],
                                                        start_agent: AgentFactory) -> None:  # fmt: skip
    repo_path, pw, pattern, disk = encrypted
    probes = [pattern[i : i + 32] for i in range(0, MiB, 64 * 1024 - 7)]
    for f in _stored_files(repo_path):
        blob = f.read_bytes()
        assert not any(p in blob for p in probes), f"{f} holds plaintext of the disk"
        assert VM.encode() not in blob, f"{f} names the VM"
    repo = Repository(repo_path, "correct horse battery staple")
    point = repo.get_point(VM)
    stored = sum(repo.chunks.stored_size(c) for c in repo.chunks.iter_ids())
    assert stored < 1.2 * MiB, "the second copy of the pattern must dedup"
    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, f"{VM}/disk")
    assert c.read(0, 32 * MiB) == disk.read_bytes()
    c.close()
    v = lr("verify", "--repo", str(repo_path), password=pw)
    assert v.returncode == 0, v.stdout + v.stderr


def test_wrong_or_missing_passphrase_is_one_line_and_passwd_rewrites_no_data(
    encrypted: tuple[Path, Path, bytes, Path], tmp_path: Path
) -> None:
    repo_path, pw, _, _ = encrypted
    wrong = tmp_path / "wrong"
    wrong.write_text("Tr0ub4dor&3")
    for r in (lr("list", "--repo", str(repo_path), password=wrong), lr("list", "--repo", str(repo_path))):
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "wrong passphrase" in lr("list", "--repo", str(repo_path), password=wrong).stderr
    assert "is encrypted: give its passphrase" in lr("list", "--repo", str(repo_path)).stderr

    data = {k: v for k, v in tree_digest(repo_path).items() if not k.endswith("key.json")}
    new = tmp_path / "new"
    new.write_text("a much longer passphrase for the new quarter")
    r = lr("passwd", "--repo", str(repo_path), "--new-password-file", str(new), password=pw)
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in tree_digest(repo_path).items() if not k.endswith("key.json")} == data
    assert "wrong passphrase" in lr("list", "--repo", str(repo_path), password=pw).stderr
    r = lr("list", "--repo", str(repo_path), "--json", password=new)
    assert r.returncode == 0 and VM in json.loads(r.stdout)["vms"], r.stderr


def test_a_flipped_byte_anywhere_is_named_and_reads_fail(encrypted: tuple[Path, Path, bytes, Path],
                                                        start_agent: AgentFactory) -> None:  # fmt: skip
    repo_path, pw, pattern, _ = encrypted
    repo = Repository(repo_path, "correct horse battery staple")
    point = repo.get_point(VM)
    manifest = repo.load_manifest(point.record.disks[0])
    block = (3 * MiB + 4096) // (64 * 1024) + 1  # a block inside the pattern
    cid = manifest.blocks[block]
    assert cid is not None
    flip_chunk_byte(repo, cid, mask=0x01)
    obj = repo_path / "points" / point.id
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    obj.write_bytes(bytes(raw))
    v = lr("verify", "--repo", str(repo_path), password=pw)
    assert v.returncode == 1
    assert f"chunk {cid} failed authentication" in v.stdout + v.stderr
    assert f"restore point object {point.id} is unreadable" in v.stdout + v.stderr

    agent = start_agent(repo, point)
    c = NbdClient("127.0.0.1", agent.port, f"{VM}/disk")
    with pytest.raises(NbdError) as e:
        c.read(block * 64 * 1024, 4096)
    assert e.value.errno == 5  # EIO: never the wrong bytes
    assert c.read((block + 2) * 64 * 1024, 4096) == pattern[(block + 2) * 64 * 1024 - 3 * MiB - 4096:][:4096]
    c.close()
