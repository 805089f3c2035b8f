"""Boot profiles: which blocks a VM reads while booting, learned from its runs from backup.

A profile keeps the block lists of the last few runs (per disk, in first-access order). The
prefetch order is the newest run's order followed by blocks only older runs read; a block no
recent run read drops out, so the profile follows the VM as it changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from liverestore.agent.recorder import AccessEvent

RUNS_KEPT = 3
PROFILE_VERSION = 1


def blocks_from_trace(events: Iterable[AccessEvent], block_sizes: dict[str, int]) -> dict[str, list[int]]:
    """Per export, the blocks touched by ``events`` in order of first access."""
    out: dict[str, list[int]] = {}
    seen: dict[str, set[int]] = {}
    for e in events:
        bs = block_sizes.get(e.export)
        if bs is None or e.length <= 0:
            continue
        lst, s = out.setdefault(e.export, []), seen.setdefault(e.export, set())
        for idx in range(e.offset // bs, (e.offset + e.length - 1) // bs + 1):
            if idx not in s:
                s.add(idx)
                lst.append(idx)
    return out


def merge_run(profile: dict[str, Any] | None, run: dict[str, list[int]], block_size: int) -> dict[str, Any]:
    """Add one run (disk name → ordered blocks) and recompute the prefetch order."""
    runs: list[dict[str, Any]] = []
    if profile and profile.get("version") == PROFILE_VERSION and profile.get("block_size") == block_size:
        runs = list(profile.get("runs", []))
    runs.append({"time": time.time(), "disks": run})
    runs = runs[-RUNS_KEPT:]
    disks: dict[str, list[int]] = {}
    for r in reversed(runs):  # newest first: its order wins, older runs append what it missed
        for disk, blocks in r["disks"].items():
            lst = disks.setdefault(disk, [])
            have = set(lst)
            lst.extend(b for b in blocks if b not in have)
    return {"version": PROFILE_VERSION, "block_size": block_size, "runs": runs, "disks": disks}


def profile_blocks(profile: dict[str, Any] | None, block_size: int) -> dict[str, list[int]]:
    """The prefetch order per disk; empty when there is no usable profile."""
    if not profile or profile.get("version") != PROFILE_VERSION or profile.get("block_size") != block_size:
        return {}
    return {d: [int(b) for b in blocks] for d, blocks in profile.get("disks", {}).items()}


def summarize(profile: dict[str, Any] | None) -> dict[str, Any]:
    if not profile:
        return {"runs": 0, "disks": {}}
    bs = int(profile.get("block_size", 0))
    return {
        "runs": len(profile.get("runs", [])),
        "block_size": bs,
        "disks": {d: {"blocks": len(b), "bytes": len(b) * bs} for d, b in profile.get("disks", {}).items()},
        "last_run": max((r["time"] for r in profile.get("runs", [])), default=None),
    }
