"""Retention: ``forget`` drops restore points a policy no longer keeps; ``prune`` deletes the
manifests and chunks no point references.

Both run under the maintenance lease (never beside a backup, whose fresh chunks no point names
yet, nor beside each other). A point an agent is serving cannot be forgotten, and what a serving
agent reads survives a prune. Prune decides from what it can read: a point object or manifest it
cannot read stops it, because it cannot know what that one references. It deletes only what is
unreferenced, so a prune killed at any moment leaves a repository that verifies; the next one
finishes the job.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from liverestore.errors import LiverestoreError, RepositoryError
from liverestore.repository import Repository, RestorePoint
from liverestore.repository.backend import Handle
from liverestore.repository.catalog import DiskRecord
from liverestore.repository.chunkstore import prune_packs
from liverestore.repository.leases import MAINTENANCE, SERVE, Lease, live_leases


@dataclass
class ForgetPlan:
    keep: list[tuple[RestorePoint, str]] = field(default_factory=list)  # (point, why kept)
    forget: list[RestorePoint] = field(default_factory=list)


def plan_forget(points: list[RestorePoint], keep_last: int, keep_daily: int, keep_weekly: int,
                in_use: dict[str, str]) -> ForgetPlan:  # fmt: skip
    """Which of one VM's points a policy keeps: the newest ``keep_last``; the newest of each of
    the last ``keep_daily`` days and ``keep_weekly`` ISO weeks that have points; any in use."""
    newest_first = sorted(points, key=lambda p: p.record.created, reverse=True)
    why: dict[str, list[str]] = {}
    for p in newest_first[:keep_last]:
        why.setdefault(p.id, []).append("last")
    for label, limit, bucket in (
        ("daily", keep_daily, lambda d: d.date().isoformat()),
        ("weekly", keep_weekly, lambda d: f"{d.isocalendar()[0]}-W{d.isocalendar()[1]:02d}"),
    ):
        seen: set[str] = set()
        for p in newest_first:
            b = bucket(datetime.datetime.fromtimestamp(p.record.created, datetime.UTC))
            if b not in seen and len(seen) < limit:
                seen.add(b)
                why.setdefault(p.id, []).append(label)
    for p in newest_first:
        if p.id in in_use:
            why.setdefault(p.id, []).append(f"in use ({in_use[p.id]})")
    plan = ForgetPlan()
    for p in newest_first:
        if p.id in why:
            plan.keep.append((p, ", ".join(why[p.id])))
        else:
            plan.forget.append(p)
    return plan


def forget(repo: Repository, vm: str, keep_last: int, keep_daily: int, keep_weekly: int,
           apply: bool) -> ForgetPlan:  # fmt: skip
    if keep_last < 0 or keep_daily < 0 or keep_weekly < 0:
        raise LiverestoreError("--keep-* counts must not be negative")
    if not (keep_last or keep_daily or keep_weekly):
        raise LiverestoreError("give at least one of --keep-last, --keep-daily, --keep-weekly (forgetting "
                               "every point is not a retention policy)")  # fmt: skip
    repo.get_point(vm)  # the usual error for an unknown VM
    lease = Lease(repo, MAINTENANCE).take() if apply else None
    try:
        repo.sync_catalog()  # points committed since this process opened the repository
        in_use = {pid: x.describe() for x in live_leases(repo) if x.kind == SERVE for pid in x.points}
        plan = plan_forget(repo.points(vm), keep_last, keep_daily, keep_weekly, in_use)
        if apply:
            for p in plan.forget:
                repo.backend.remove(Handle("points", p.id))
                repo.catalog.remove_point(p.id)
        return plan
    finally:
        if lease is not None:
            lease.release()


@dataclass
class PruneReport:
    points: int = 0
    manifests_kept: int = 0
    chunks_kept: int = 0
    manifests_deleted: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    held_by_leases: int = 0  # manifests kept only because an agent is serving them
    packs_deleted: int = 0
    packs_repacked: int = 0  # mostly dead packs whose live chunks were copied to new ones


def _lease_manifests(repo: Repository) -> list[DiskRecord]:
    out = []
    for lease in live_leases(repo):
        for entry in lease.manifests:
            mid, _, size = entry.partition(":")
            out.append(DiskRecord(name=f"(served by {lease.holder})", manifest_id=mid, manifest_size=int(size),
                                  virtual_size=0, allocated=0))  # fmt: skip
    return out


def prune(repo: Repository, apply: bool = True) -> PruneReport:
    report = PruneReport()
    with Lease(repo, MAINTENANCE):
        manifests: dict[str, DiskRecord] = {}
        chunks: set[str] = set()
        for pid in repo.backend.list("points"):
            try:
                rec = repo.load_point_object(pid)
            except RepositoryError as e:  # it may reference anything: delete nothing
                raise LiverestoreError(f"prune stopped, nothing deleted: {e}") from None
            report.points += 1
            manifests.update({d.manifest_id: d for d in rec.disks})
            chunks.update(c.chunk_id for c in rec.configs)
        for d in _lease_manifests(repo):
            if d.manifest_id not in manifests:
                report.held_by_leases += 1
                manifests[d.manifest_id] = d
        for d in manifests.values():
            try:
                chunks.update(repo.load_manifest(d).chunk_ids())
            except RepositoryError as e:
                raise LiverestoreError(f"prune stopped, nothing deleted: {e}") from None
        report.manifests_kept, report.chunks_kept = len(manifests), len(chunks)
        # packs first: it reads the index once and stops, deleting nothing, on an unreadable index
        packs = prune_packs(repo.chunks, chunks, apply)
        report.chunks_deleted += packs.chunks_deleted
        report.bytes_deleted += packs.bytes_deleted
        report.packs_deleted, report.packs_repacked = packs.packs_deleted, packs.packs_repacked
        for cid in list(repo.backend.list("chunks")):  # loose chunks of a repository from before packs
            if cid in chunks:
                continue
            h = Handle("chunks", cid)
            report.chunks_deleted += 1
            report.bytes_deleted += repo.backend.stat(h) or 0
            if apply:
                repo.backend.remove(h)
        for mid in list(repo.backend.list("manifests")):
            if mid not in manifests:
                report.manifests_deleted += 1
                if apply:
                    repo.backend.remove(Handle("manifests", mid))
    return report
