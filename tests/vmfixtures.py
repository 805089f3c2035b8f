"""Shared, expensive fixtures for the end-to-end tests: one test VM image and repository per session."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from liverestore.testvm import BuiltImage, build_test_vm
from liverestore.testvm.localboot import boot_local_copy
from tests.helpers import MiB, make_disk
from tests.packs import stored_bytes


@dataclass
class VmBackup:
    image: BuiltImage
    data_disk: Path
    repo_path: Path
    point_id: str

    def open_repo(self) -> Repository:
        return Repository.open(self.repo_path)


@pytest.fixture(scope="session")
def vm_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmBackup]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: run ./setup.sh")
    base = tmp_path_factory.mktemp("vmbackup")
    image = build_test_vm(base / "testvm.raw", size=512 * MiB, payload_mb=90, cold_mb=32)
    data = base / "data.raw"
    make_disk(data, 64 * MiB, seed=9)
    repo = Repository.init(base / "repo", block_size=64 * 1024)
    point, _ = run_backup(repo, "testvm", [image.path, data], [])
    repo.close()
    yield VmBackup(image, data, base / "repo", point.id)


def backup_digest(repo: Repository, point: RestorePoint) -> dict[str, bytes]:
    """Every byte of the backup itself: manifests and the chunks they name."""
    out = {}
    for rec in point.record.disks:
        out[f"manifest/{rec.manifest_id}"] = (repo.manifest_dir / rec.manifest_id).read_bytes()
        for cid in repo.load_manifest(rec).blocks:
            if cid:
                out[cid] = stored_bytes(repo, cid)
    return out


def boot_local(image: Path, workdir: Path) -> float:
    return asyncio.run(boot_local_copy(image, workdir))


def extract(path: Path, offset: int, size: int, out: Path) -> Path:
    with open(path, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 8 * MiB))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    return out
