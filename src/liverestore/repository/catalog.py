"""SQLite catalog: a local cache of the repository's restore points (and, in repositories from
before profiles were objects, their boot profiles), so listing and lookups need no round trips.
The point objects in the backend are the truth; ``Repository.sync_catalog`` rebuilds this.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    created REAL NOT NULL,
    bytes_new INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS points_vm ON points (vm, created);
CREATE TABLE IF NOT EXISTS point_disks (
    point_id TEXT NOT NULL REFERENCES points (id),
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    manifest_id TEXT NOT NULL,
    manifest_size INTEGER NOT NULL,
    virtual_size INTEGER NOT NULL,
    allocated INTEGER NOT NULL,
    PRIMARY KEY (point_id, name)
);
CREATE TABLE IF NOT EXISTS point_configs (
    point_id TEXT NOT NULL REFERENCES points (id),
    filename TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (point_id, filename)
);
CREATE TABLE IF NOT EXISTS profiles (
    vm TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DiskRecord:
    name: str
    manifest_id: str
    manifest_size: int
    virtual_size: int
    allocated: int


@dataclass(frozen=True)
class ConfigRecord:
    filename: str
    chunk_id: str
    size: int


@dataclass(frozen=True)
class PointRecord:
    id: str
    vm: str
    created: float
    bytes_new: int
    disks: tuple[DiskRecord, ...]
    configs: tuple[ConfigRecord, ...]


class Catalog:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_record(self, rec: PointRecord) -> None:
        """Cache one restore point (idempotent: two processes may sync the same point)."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM points WHERE id = ?", (rec.id,)).fetchone():
                return
            db.execute(
                "INSERT INTO points (id, vm, created, bytes_new) VALUES (?, ?, ?, ?)",
                (rec.id, rec.vm, rec.created, rec.bytes_new),
            )
            db.executemany(
                "INSERT INTO point_disks VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (rec.id, i, d.name, d.manifest_id, d.manifest_size, d.virtual_size, d.allocated)
                    for i, d in enumerate(rec.disks)
                ],
            )
            db.executemany(
                "INSERT INTO point_configs VALUES (?, ?, ?, ?)",
                [(rec.id, c.filename, c.chunk_id, c.size) for c in rec.configs],
            )

    def remove_point(self, point_id: str) -> None:
        with self._transaction() as db:
            for table in ("point_disks", "point_configs"):
                db.execute(f"DELETE FROM {table} WHERE point_id = ?", (point_id,))
            db.execute("DELETE FROM points WHERE id = ?", (point_id,))

    def _point(self, row: tuple[Any, ...]) -> PointRecord:
        pid = row[0]
        disks = tuple(
            DiskRecord(*r)
            for r in self._db.execute(
                "SELECT name, manifest_id, manifest_size, virtual_size, allocated FROM point_disks "
                "WHERE point_id = ? ORDER BY position",
                (pid,),
            )
        )
        configs = tuple(
            ConfigRecord(*r)
            for r in self._db.execute(
                "SELECT filename, chunk_id, size FROM point_configs WHERE point_id = ? ORDER BY filename",
                (pid,),
            )
        )
        return PointRecord(id=pid, vm=row[1], created=row[2], bytes_new=row[3], disks=disks, configs=configs)

    def points(self, vm: str | None = None) -> list[PointRecord]:
        sql = "SELECT id, vm, created, bytes_new FROM points"
        args: tuple[str, ...] = ()
        if vm is not None:
            sql += " WHERE vm = ?"
            args = (vm,)
        rows = self._db.execute(sql + " ORDER BY vm, created, rowid", args).fetchall()
        return [self._point(r) for r in rows]

    def vms(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT vm FROM points ORDER BY vm")]

    def get_profile(self, vm: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM profiles WHERE vm = ?", (vm,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def delete_profile(self, vm: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM profiles WHERE vm = ?", (vm,)).rowcount > 0
