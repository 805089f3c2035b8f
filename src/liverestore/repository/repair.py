"""Rebuild the index from the packs, when an index object is lost or damaged.

Every restore point's chunks sit in packs, found through index objects. If an index object is
deleted (a bucket lifecycle rule, a hand that cleaned up) or its bytes are damaged, the packs it
named still hold every chunk, but nothing finds them: restores fail with "chunk is missing", and
``verify`` says so. Each pack names its own chunks in a trailer (``ChunkStore.pack_contents``), so
the index can be written again from the packs alone, as restic's ``repair index`` does.

Order makes a repair killed anywhere harmless: new index objects first, and only then, when every
pack is named by a readable index object again, the damaged ones are removed. It holds the
maintenance lease, so no backup is writing and no prune is deleting meanwhile. A backup that died
left packs no index names; they are indexed too, and a later prune deletes what no point uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from liverestore.errors import RepositoryError, RepositoryUnavailable
from liverestore.repository.backend import Handle, ObjectMissing
from liverestore.repository.chunkstore import INDEX_EVERY_PACKS
from liverestore.repository.leases import MAINTENANCE, Lease
from liverestore.repository.repo import Repository


@dataclass
class IndexRepair:
    """What a repair found, and did (or would do, in a dry run)."""

    packs_indexed: int = 0  # packs no readable index object named, now named by a new one
    chunks_indexed: int = 0
    damaged: list[str] = field(default_factory=list)  # index objects that could not be read
    damaged_removed: int = 0
    unreadable_packs: list[str] = field(default_factory=list)  # a line each: pack and why

    @property
    def ok(self) -> bool:
        return not self.unreadable_packs


def repair_index(repo: Repository, apply: bool, progress: Callable[[int, int], None] | None = None) -> IndexRepair:
    """Name in new index objects every pack no readable index object names; then remove the
    damaged index objects, unless some pack could not be read (what they named may be in it)."""
    with Lease(repo, MAINTENANCE) if apply else contextlib.nullcontext():  # a dry run only reads
        store = repo.chunks
        index = store.reload()
        report = IndexRepair(damaged=sorted(set(repo.backend.list("index")) - index.objects))
        unnamed = [p for p in repo.backend.list("packs") if not index.has_pack(p)]
        found: dict[str, list[tuple[str, int, int]]] = {}
        for n, pack in enumerate(unnamed, 1):
            try:
                found[pack] = store.pack_contents(pack)
            except ObjectMissing:
                continue  # deleted since the listing
            except RepositoryUnavailable:
                raise
            except (RepositoryError, ValueError) as e:
                report.unreadable_packs.append(f"pack {pack}: {e}")
            if pack in found:
                report.packs_indexed += 1
                report.chunks_indexed += len(found[pack])
            if progress is not None:
                progress(n, len(unnamed))
            if apply and len(found) >= INDEX_EVERY_PACKS:  # in parts: memory stays bounded at any size
                store.write_index(found)
                found = {}
        if apply and found:
            store.write_index(found)
        if apply and report.ok:
            for name in report.damaged:
                repo.backend.remove(Handle("index", name))
                report.damaged_removed += 1
        store.reload()
        return report

