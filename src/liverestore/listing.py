"""What ``liverestore list`` shows: VMs, restore points, disks and how well dedup is working."""

from __future__ import annotations

import datetime
from typing import Any

from liverestore.repository import Repository


def describe_repository(repo: Repository) -> dict[str, Any]:
    chunk_ids = repo.chunks.iter_ids()
    stored = sum(repo.chunks.stored_size(c) for c in chunk_ids)
    logical = 0
    vms: dict[str, list[dict[str, Any]]] = {}
    for p in repo.points():
        disks = [
            {"name": d.name, "virtual_size": d.virtual_size, "allocated": d.allocated} for d in p.record.disks
        ]
        logical += sum(d.allocated for d in p.record.disks)
        vms.setdefault(p.vm, []).append(
            {
                "id": p.id,
                "created": datetime.datetime.fromtimestamp(p.record.created, datetime.UTC).isoformat(),
                "disks": disks,
                "configs": [c.filename for c in p.record.configs],
                "bytes_new": p.record.bytes_new,
            }
        )
    return {
        "repository": repo.location,
        "block_size": repo.block_size,
        "chunks": len(chunk_ids),
        "stored_bytes": stored,
        "logical_bytes": logical,
        "dedup_ratio": round(logical / stored, 2) if stored else 0.0,
        "vms": vms,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render_listing(doc: dict[str, Any]) -> str:
    lines = [
        f"repository {doc['repository']}: {doc['chunks']} chunks, {_mib(doc['stored_bytes'])} stored, "
        f"{_mib(doc['logical_bytes'])} logical, dedup+compression ratio {doc['dedup_ratio']}x"
    ]
    if not doc["vms"]:
        lines.append("  (no backups yet)")
    for vm, points in doc["vms"].items():
        lines.append(f"VM {vm}")
        for p in points:
            lines.append(f"  point {p['id']}  {p['created']}  new {_mib(p['bytes_new'])}")
            for d in p["disks"]:
                lines.append(
                    f"    disk {d['name']}: {_mib(d['virtual_size'])} virtual, {_mib(d['allocated'])} allocated"
                )
            if p["configs"]:
                lines.append(f"    configs: {', '.join(p['configs'])}")
    return "\n".join(lines)
