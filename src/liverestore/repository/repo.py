"""A repository directory: its format file, chunk store, manifests and catalog, opened together."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from liverestore.errors import RepositoryError
from liverestore.repository.catalog import Catalog, ConfigRecord, DiskRecord, PointRecord
from liverestore.repository.chunkstore import ChunkStore, write_atomically
from liverestore.repository.manifest import DEFAULT_BLOCK_SIZE, DiskManifest, check_block_size

FORMAT_NAME = "liverestore-repository"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RestorePoint:
    """A catalog record plus the repository it came from, so manifests can be loaded lazily."""

    record: PointRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def vm(self) -> str:
        return self.record.vm


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root
        cfg_path = root / "repository.json"
        if not root.is_dir():
            raise RepositoryError(f"repository {root} does not exist (create it with 'liverestore init')")
        try:
            cfg = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise RepositoryError(f"{root} is not a liverestore repository (no repository.json)") from None
        except (OSError, ValueError) as e:
            raise RepositoryError(f"{cfg_path} is unreadable: {e}") from None
        if cfg.get("format") != FORMAT_NAME or cfg.get("version") != FORMAT_VERSION:
            raise RepositoryError(f"{root} is not a liverestore repository of version {FORMAT_VERSION}")
        self.block_size = int(cfg["block_size"])
        self.chunks = ChunkStore(root / "chunks")
        self.manifest_dir = root / "manifests"
        self.catalog = Catalog(root / "catalog.sqlite")

    @classmethod
    def init(cls, root: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> Repository:
        try:
            check_block_size(block_size)
        except ValueError as e:
            raise RepositoryError(str(e)) from None
        if (root / "repository.json").exists():
            raise RepositoryError(f"{root} already holds a repository")
        if root.exists() and any(root.iterdir()):
            raise RepositoryError(f"{root} exists and is not empty")
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / "chunks").mkdir()
            (root / "manifests").mkdir()
            doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "block_size": block_size}
            write_atomically(root / "repository.json", json.dumps(doc, indent=2).encode(), fsync=True)
        except OSError as e:
            raise RepositoryError(f"cannot create repository at {root}: {e.strerror}") from None
        return cls(root)

    @classmethod
    def open(cls, root: Path) -> Repository:
        return cls(root)

    def close(self) -> None:
        self.catalog.close()

    # -- manifests -----------------------------------------------------------------------------
    def store_manifest(self, manifest: DiskManifest) -> DiskRecord:
        blob = manifest.to_bytes()
        mid = str(blake3.blake3(blob).hexdigest())
        path = self.manifest_dir / mid
        if not path.exists():
            write_atomically(path, blob, fsync=True)
        return DiskRecord(
            name=manifest.name,
            manifest_id=mid,
            manifest_size=len(blob),
            virtual_size=manifest.virtual_size,
            allocated=manifest.allocated_bytes,
        )

    def load_manifest(self, disk: DiskRecord) -> DiskManifest:
        label = f"{disk.manifest_id[:16]} (disk {disk.name})"
        try:
            blob = (self.manifest_dir / disk.manifest_id).read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"manifest {label} is missing") from None
        if len(blob) != disk.manifest_size or blake3.blake3(blob).hexdigest() != disk.manifest_id:
            raise RepositoryError(f"manifest {label} is corrupt (does not match its hash)")
        return DiskManifest.from_bytes(blob, label)

    # -- restore points ------------------------------------------------------------------------
    def commit_point(
        self, vm: str, disks: list[DiskRecord], configs: list[ConfigRecord], bytes_new: int
    ) -> RestorePoint:
        """Make a restore point visible. Call only once every chunk and manifest is durable."""
        os.sync()  # chunks are written without per-file fsync for speed; make them durable at once
        seed = f"{vm}\0{time.time_ns()}\0" + "\0".join(d.manifest_id for d in disks)
        point_id = str(blake3.blake3(seed.encode()).hexdigest())[:12]
        self.catalog.add_point(point_id, vm, bytes_new, disks, configs)
        return self.get_point(vm, point_id)

    def points(self, vm: str | None = None) -> list[RestorePoint]:
        return [RestorePoint(r) for r in self.catalog.points(vm)]

    def get_point(self, vm: str, point_id: str | None = None) -> RestorePoint:
        """The named restore point of ``vm``, or its latest one; a clear error when absent."""
        points = self.catalog.points(vm)
        if not points:
            known = ", ".join(self.catalog.vms()) or "none"
            raise RepositoryError(f"VM {vm!r} has no backups in {self.root} (known VMs: {known})")
        if point_id is None:
            return RestorePoint(points[-1])
        matches = [p for p in points if p.id.startswith(point_id)] if point_id else []
        if len(matches) != 1:
            what = "is ambiguous" if matches else "does not exist"
            raise RepositoryError(f"restore point {point_id!r} of VM {vm!r} {what}")
        return RestorePoint(matches[0])

    def read_config(self, cfg: ConfigRecord) -> bytes:
        return self.chunks.get(cfg.chunk_id, cfg.size)
