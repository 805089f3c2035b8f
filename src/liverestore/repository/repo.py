"""A repository: its config, chunks, manifests, restore points and profiles, all in one backend.

Everything a restore needs lives in the backend (a directory or an S3 bucket), so a second
machine with only the location and credentials can list, verify and restore. Each restore point
is one object (``points/<id>``) written after its chunks and manifests are durable: that write is
the commit, so two backups into one repository never lose each other's point. The SQLite catalog
is a local cache of those objects for fast listing, rebuilt from the backend when it lags behind.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3

from liverestore.errors import IntegrityError, RepositoryError
from liverestore.repository.backend import Backend, Handle, LocalBackend, ObjectMissing, open_backend
from liverestore.repository.catalog import Catalog, ConfigRecord, DiskRecord, PointRecord
from liverestore.repository.chunkstore import ChunkStore
from liverestore.repository.crypto import MasterKey
from liverestore.repository.manifest import DEFAULT_BLOCK_SIZE, DiskManifest, check_block_size

FORMAT_NAME = "liverestore-repository"
FORMAT_VERSION = 2  # 2: chunks in packs with an index; 1 (loose chunk objects) is still read and written to
READABLE_VERSIONS = (1, 2)
CONFIG = Handle("config", "repository.json")
KEY = Handle("config", "key.json")  # the wrapped master key of an encrypted repository


def read_passphrase_file(path: Path) -> str:
    """A passphrase file's text without its trailing newline; one line when unreadable or empty."""
    try:
        text = path.read_text().rstrip("\n")
    except OSError as e:
        raise RepositoryError(f"cannot read the password file {path}: {e.strerror}") from None
    if not text:
        raise RepositoryError(f"the password file {path} is empty")
    return text


def passphrase_for(where: str) -> str:
    """An encrypted repository's passphrase: ``LIVERESTORE_PASSWORD``, the file named by
    ``LIVERESTORE_PASSWORD_FILE`` (``--password-file``), or a prompt on a terminal."""
    if os.environ.get("LIVERESTORE_PASSWORD"):
        return os.environ["LIVERESTORE_PASSWORD"]
    path = os.environ.get("LIVERESTORE_PASSWORD_FILE")
    if path:
        return read_passphrase_file(Path(path))
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase for {where}: ")
    raise RepositoryError(f"repository {where} is encrypted: give its passphrase (--password-file FILE, "
                          "LIVERESTORE_PASSWORD_FILE or LIVERESTORE_PASSWORD)")  # fmt: skip


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


def _catalog_path(backend: Backend, encrypted: bool = False, repo_id: str = "") -> Path:
    """Local repositories keep their catalog beside the data; remote and encrypted ones (whose
    catalog would list VM names in the clear) in the user's data dir, under the location and the
    repository's own id. The id matters: the data dir outlives the repository, and a repository
    made again at the same location (a bucket emptied, a directory deleted) must not inherit the
    old one's points and profiles. Repositories from before ids are keyed by location alone."""
    if isinstance(backend, LocalBackend) and not encrypted:
        return backend.root / "catalog.sqlite"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    key = backend.location + (f"\0{repo_id}" if repo_id else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(base) / "liverestore" / "catalogs" / digest / "catalog.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _point_doc(rec: PointRecord) -> bytes:
    return json.dumps(asdict(rec), indent=1).encode()


def _point_from_doc(blob: bytes) -> PointRecord:
    d = json.loads(blob)
    return PointRecord(id=d["id"], vm=d["vm"], created=d["created"], bytes_new=d["bytes_new"],
                       disks=tuple(DiskRecord(**x) for x in d["disks"]),
                       configs=tuple(ConfigRecord(**x) for x in d["configs"]))  # fmt: skip


class Repository:
    def __init__(self, location: str | Path, passphrase: str | None = None) -> None:
        self.backend = open_backend(str(location))
        self.location = self.backend.location
        if isinstance(self.backend, LocalBackend) and not self.backend.root.is_dir():
            raise RepositoryError(f"repository {location} does not exist (create it with 'liverestore init')")
        try:
            cfg = json.loads(self.backend.load(CONFIG))
        except ObjectMissing:
            raise RepositoryError(f"{location} is not a liverestore repository (no repository.json)") from None
        except ValueError as e:
            raise RepositoryError(f"{location}/repository.json is unreadable: {e}") from None
        if cfg.get("format") != FORMAT_NAME:
            raise RepositoryError(f"{location} is not a liverestore repository")
        if cfg.get("version") not in READABLE_VERSIONS:
            raise RepositoryError(f"{location} is a liverestore repository of version {cfg.get('version')}; "
                                  f"this liverestore reads versions {', '.join(map(str, READABLE_VERSIONS))}")  # fmt: skip
        self.block_size = int(cfg["block_size"])
        self.key: MasterKey | None = None
        if cfg.get("encrypted"):
            try:
                key_doc = self.backend.load(KEY)
            except ObjectMissing:
                raise RepositoryError(f"{location} is encrypted but its key.json is missing") from None
            self.key = MasterKey.unwrap(key_doc, passphrase or passphrase_for(self.location), self.location)
        self.chunks = ChunkStore(self.backend, self.key)
        self.repo_id = str(cfg.get("id", ""))  # empty for a repository made before ids
        # the catalog beside the data: the only place a repository from before point objects kept them
        self._legacy_catalog = isinstance(self.backend, LocalBackend) and self.key is None
        self.catalog = Catalog(_catalog_path(self.backend, self.key is not None, self.repo_id))
        self.sync_catalog()

    @property
    def root(self) -> Path:
        """The directory of a local repository (tests and tools that look at files)."""
        if not isinstance(self.backend, LocalBackend):
            raise RepositoryError(f"{self.location} is not a local directory")
        return self.backend.root

    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifests"

    @classmethod
    def init(cls, location: str | Path, block_size: int = DEFAULT_BLOCK_SIZE,
             passphrase: str | None = None) -> Repository:  # fmt: skip
        """A new repository; with ``passphrase`` an encrypted one (its key.json is written first,
        so a repository.json that says encrypted always has its key)."""
        try:
            check_block_size(block_size)
        except ValueError as e:
            raise RepositoryError(str(e)) from None
        backend = open_backend(str(location))
        if isinstance(backend, LocalBackend):
            root = backend.root
            if (root / "repository.json").exists():
                raise RepositoryError(f"{root} already holds a repository")
            if root.exists() and any(root.iterdir()):
                raise RepositoryError(f"{root} exists and is not empty")
            try:
                root.mkdir(parents=True, exist_ok=True)
                backend.create_layout()
            except OSError as e:
                raise RepositoryError(f"cannot create repository at {root}: {e.strerror}") from None
        doc: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "block_size": block_size,
                               "id": secrets.token_hex(16)}  # fmt: skip
        if passphrase is not None:
            if not passphrase:
                raise RepositoryError("an empty passphrase protects nothing")
            key = MasterKey.generate()
            if not backend.create_if_absent(KEY, key.wrap(passphrase)):
                raise RepositoryError(f"{backend.location} already holds a repository key")
            doc["encrypted"] = True
        if not backend.create_if_absent(CONFIG, json.dumps(doc, indent=2).encode()):
            raise RepositoryError(f"{backend.location} already holds a repository")
        return cls(location, passphrase)

    def change_passphrase(self, new: str) -> None:
        """Rewrap the master key under ``new``: one small object rewritten, no data touched."""
        if self.key is None:
            raise RepositoryError(f"{self.location} is not encrypted")
        if not new:
            raise RepositoryError("an empty passphrase protects nothing")
        self.backend.save(KEY, self.key.wrap(new))

    # -- sealing: identity for a plain repository --------------------------------------------------
    def seal_object(self, data: bytes, name: str) -> bytes:
        return self.key.seal(data, name) if self.key else data

    def open_object(self, blob: bytes, name: str) -> bytes:
        return self.key.open(blob, name) if self.key else blob

    def _profile_handle(self, vm: str) -> Handle:
        """Profiles are named by VM; an encrypted repository names them by keyed hash instead."""
        return Handle("profiles", self.key.object_id(vm.encode())[:32] if self.key else vm)

    def load_point_object(self, pid: str) -> PointRecord:
        """A restore point's object, opened and parsed; a clear error when damaged."""
        try:
            return _point_from_doc(self.open_object(self.backend.load(Handle("points", pid)), f"restore point {pid}"))
        except (ObjectMissing, IntegrityError, ValueError, KeyError, TypeError) as e:
            raise RepositoryError(f"restore point object {pid} is unreadable: {e}") from None

    @classmethod
    def open(cls, location: str | Path) -> Repository:
        return cls(location)

    def close(self) -> None:
        self.chunks.close()
        self.catalog.close()

    def sync_catalog(self) -> None:
        """Bring the local catalog in line with the point objects in the backend: the backend is
        the truth, the catalog a cache. A repository made before points were objects has them
        only in its catalog, beside its data (it was local and plain then): they are written out
        once. A catalog in the data dir is never written out: it may be a stale cache."""
        stored = set(self.backend.list("points"))
        cached = {p.id: p for p in self.catalog.points()}
        if not stored and cached and self._legacy_catalog:
            for rec in cached.values():
                self.backend.create_if_absent(Handle("points", rec.id), self.seal_object(_point_doc(rec), f"restore point {rec.id}"))
            return
        for pid in stored - set(cached):
            self.catalog.add_record(self.load_point_object(pid))
        for pid in set(cached) - stored:
            self.catalog.remove_point(pid)

    # -- manifests -----------------------------------------------------------------------------
    def store_manifest(self, manifest: DiskManifest) -> DiskRecord:
        blob = manifest.to_bytes()
        mid = self.chunks.id_of(blob)
        h = Handle("manifests", mid)
        if self.backend.stat(h) is None:
            self.backend.save(h, self.seal_object(blob, f"manifest {mid}"))
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
            blob = self.open_object(self.backend.load(Handle("manifests", disk.manifest_id)), f"manifest {disk.manifest_id}")
        except ObjectMissing:
            raise RepositoryError(f"manifest {label} is missing") from None
        except IntegrityError as e:
            raise RepositoryError(f"manifest {label}: {e}") from None
        digest = self.chunks.id_of(blob)
        if len(blob) != disk.manifest_size or digest != disk.manifest_id:
            raise RepositoryError(f"manifest {label} is corrupt (does not match its hash)")
        return DiskManifest.from_bytes(blob, label)

    # -- restore points ------------------------------------------------------------------------
    def commit_point(
        self, vm: str, disks: list[DiskRecord], configs: list[ConfigRecord], bytes_new: int
    ) -> RestorePoint:
        """Make a restore point visible: its chunks' packs and index first, then the point object."""
        self.chunks.flush()
        self.backend.flush()
        seed = f"{vm}\0{time.time_ns()}\0{os.getpid()}\0" + "\0".join(d.manifest_id for d in disks)
        point_id = str(blake3.blake3(seed.encode()).hexdigest())[:12]
        rec = PointRecord(point_id, vm, time.time(), bytes_new, tuple(disks), tuple(configs))
        if not self.backend.create_if_absent(Handle("points", point_id), self.seal_object(_point_doc(rec), f"restore point {point_id}")):
            raise RepositoryError(f"restore point id {point_id} collided; run the backup again")
        self.catalog.add_record(rec)
        return self.get_point(vm, point_id)

    def points(self, vm: str | None = None) -> list[RestorePoint]:
        return [RestorePoint(r) for r in self.catalog.points(vm)]

    def get_point(self, vm: str, point_id: str | None = None) -> RestorePoint:
        """The named restore point of ``vm``, or its latest one; a clear error when absent."""
        points = self.catalog.points(vm)
        if not points:
            known = ", ".join(self.catalog.vms()) or "none"
            raise RepositoryError(f"VM {vm!r} has no backups in {self.location} (known VMs: {known})")
        if point_id is None:
            return RestorePoint(points[-1])
        matches = [p for p in points if p.id.startswith(point_id)] if point_id else []
        if len(matches) != 1:
            what = "is ambiguous" if matches else "does not exist"
            raise RepositoryError(f"restore point {point_id!r} of VM {vm!r} {what}")
        return RestorePoint(matches[0])

    def read_config(self, cfg: ConfigRecord) -> bytes:
        return self.chunks.get(cfg.chunk_id, cfg.size)

    # -- boot profiles -------------------------------------------------------------------------
    def get_profile(self, vm: str) -> dict[str, Any] | None:
        try:
            return self.load_profile_object(self._profile_handle(vm).name)
        except ObjectMissing:
            # a repository from before profiles were objects kept them in its catalog beside the data
            return self.catalog.get_profile(vm) if self._legacy_catalog else None
        except (ValueError, IntegrityError):
            return None  # a damaged profile is only a slower boot: start learning again

    def load_profile_object(self, name: str) -> dict[str, Any]:
        h = Handle("profiles", name)
        return dict(json.loads(self.open_object(self.backend.load(h), f"profile {name}")))

    def put_profile(self, vm: str, data: dict[str, Any]) -> None:
        h = self._profile_handle(vm)
        self.backend.save(h, self.seal_object(json.dumps(data).encode(), f"profile {h.name}"))

    def delete_profile(self, vm: str) -> bool:
        h = self._profile_handle(vm)
        existed = self.backend.stat(h) is not None
        self.backend.remove(h)
        return self.catalog.delete_profile(vm) or existed
