"""The backup command: disks + config files → chunks, manifests and one atomically committed point."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from liverestore.diskimage import iter_blocks, open_as_raw
from liverestore.errors import LiverestoreError
from liverestore.names import check_name
from liverestore.repository import DiskManifest, Repository, RestorePoint
from liverestore.repository.catalog import ConfigRecord, DiskRecord
from liverestore.repository.leases import BACKUP, Lease

ProgressFn = Callable[[str, int, int], None]
"""(disk name, bytes done, bytes total) — called as blocks complete."""


@dataclass
class BackupStats:
    bytes_read: int = 0
    bytes_virtual: int = 0
    bytes_new_stored: int = 0
    blocks_zero: int = 0
    blocks_new: int = 0


def disk_name_of(path: Path) -> str:
    return check_name("disk", path.stem or path.name)  # "web01-root.qcow2" → "web01-root"


class _BlockStorer:
    """Hash + compress in a small thread pool (blake3 and zstd drop the GIL, so two cores help);
    the chunks are added to packs afterwards, in disk order (see ``ChunkStore.add``)."""

    def __init__(self, repo: Repository, known: set[str]) -> None:
        self.repo = repo
        self.known = known
        self.zero = bytes(repo.block_size)

    def prepare(self, data: bytes) -> tuple[str | None, bytes | None]:
        """The block's chunk id (None: a zero block) and its stored bytes if it is new."""
        if data == self.zero[: len(data)]:
            return None, None
        cid = self.repo.chunks.id_of(data)
        if cid in self.known:  # incremental: unchanged since the previous point, skip even the stat
            return cid, None
        return self.repo.chunks.pack_ready(data, cid)


def store_disk(
    repo: Repository,
    name: str,
    size: int,
    reads: Iterator[tuple[int, bytes]],
    blocks: list[str | None],
    known: set[str],
    stats: BackupStats,
    progress: ProgressFn | None,
    source_format: str,
) -> DiskManifest:
    """Chunk the blocks ``reads`` yields (index, data) into ``blocks`` and make the manifest.

    ``blocks`` arrives holding what is known without reading: ``None`` (zero) everywhere for a
    full backup, the previous point's ids for an incremental one; each block read replaces its
    entry. ``known`` (the previous point's ids) lets an unchanged block skip even the existence
    check."""
    bs = repo.block_size
    count = -(-size // bs)
    storer = _BlockStorer(repo, known)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        inflight: deque[tuple[int, int, Future[tuple[str | None, bytes | None]]]] = deque()

        def drain(limit: int) -> None:
            while len(inflight) > limit:  # oldest first: chunks go into packs in disk order
                idx, length, fut = inflight.popleft()
                cid, blob = fut.result()
                written = repo.chunks.add(cid, blob) if cid is not None and blob is not None else 0
                blocks[idx] = cid
                stats.bytes_new_stored += written
                stats.blocks_new += written > 0
                stats.bytes_read += length
                if progress:
                    progress(name, (idx + 1) * bs if idx + 1 < count else size, size)

        for idx, data in reads:
            inflight.append((idx, len(data), pool.submit(storer.prepare, data)))
            drain(16)
        drain(0)
    stats.blocks_zero += sum(1 for c in blocks if c is None)  # zero blocks and holes alike
    stats.bytes_virtual += size
    if progress:
        progress(name, size, size)
    return DiskManifest(name=name, virtual_size=size, block_size=bs, blocks=tuple(blocks), source_format=source_format)


def backup_disk(
    repo: Repository,
    path: Path,
    name: str,
    previous: DiskManifest | None,
    stats: BackupStats,
    progress: ProgressFn | None,
    declared_format: str | None = None,
) -> DiskManifest:
    """A disk file read whole: every allocated block is read and hashed again (the ids of the
    previous point only spare the writes)."""
    bs = repo.block_size
    known = previous.chunk_ids() if previous and previous.block_size == bs else set()
    with open_as_raw(path, declared_format) as (raw, fmt, size):
        fd = os.open(raw, os.O_RDONLY)
        try:
            reads = ((i, d) for i, d in iter_blocks(fd, size, bs) if d is not None)
            blocks: list[str | None] = [None] * -(-size // bs)
            return store_disk(repo, name, size, reads, blocks, known, stats, progress, fmt)
        finally:
            os.close(fd)


def run_backup(
    repo: Repository,
    vm: str,
    disks: list[Path],
    configs: list[Path],
    progress: ProgressFn | None = None,
    *,
    disk_names: list[str] | None = None,
    extra_configs: dict[str, bytes] | None = None,
    disk_format: str | None = None,
) -> tuple[RestorePoint, BackupStats]:
    """Back up ``disks`` (named by ``disk_names``, else by file stem) and config files; commit
    one restore point. ``extra_configs`` are configs given as bytes (a libvirt domain XML)."""
    check_name("VM", vm)
    if not disks:
        raise LiverestoreError("give at least one disk to back up")
    names = [check_name("disk", n) for n in disk_names] if disk_names else [disk_name_of(d) for d in disks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LiverestoreError(f"two disks would share the name {dupes[0]!r}: rename one of them")
    for c in configs:
        if not c.is_file():
            raise LiverestoreError(f"config file {c} does not exist")

    with Lease(repo, BACKUP):  # its chunks are unreferenced until the commit: no prune meanwhile
        prev_manifests: dict[str, DiskManifest] = {}
        if repo.catalog.points(vm):
            prev = repo.get_point(vm)
            for rec in prev.record.disks:
                prev_manifests[rec.name] = repo.load_manifest(rec)

        stats = BackupStats()
        records: list[DiskRecord] = []
        for path, name in zip(disks, names, strict=True):
            manifest = backup_disk(repo, path, name, prev_manifests.get(name), stats, progress, disk_format)
            records.append(repo.store_manifest(manifest))

        blobs = [(c.name, c.read_bytes()) for c in configs] + sorted((extra_configs or {}).items())
        return commit_backup(repo, vm, records, blobs, stats), stats


def commit_backup(
    repo: Repository, vm: str, records: list[DiskRecord], configs: list[tuple[str, bytes]], stats: BackupStats
) -> RestorePoint:
    """Store the config files, then commit the point: the last write of every backup."""
    cfg_records = []
    for filename, data in configs:
        cid, written = repo.chunks.put(data)
        stats.bytes_new_stored += written
        cfg_records.append(ConfigRecord(filename=filename, chunk_id=cid, size=len(data)))
    return repo.commit_point(vm, records, cfg_records, stats.bytes_new_stored)
