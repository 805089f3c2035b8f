"""Read-cache retention: which cache directories exist, which are in use, and pruning the rest.

Each agent holds an ``flock`` on its cache directory (``agent.lock_cache_dir``); a directory whose
lock can be taken is not in use and can go. A restore removes its own cache after the pivot; this
is for caches left by ``--no-relocate`` runs, ``serve``, ``--keep-cache`` or crashes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from liverestore.agent.agent import CACHE_LOCK_NAME
from liverestore.errors import LiverestoreError


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    bytes: int  # allocated on disk (the cache files are sparse)
    idle_s: float  # since its newest file changed
    in_use: bool


def parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    unit = t[-1] if t[-1:] in units else "h"
    try:
        value = float(t.rstrip("smhd"))
    except ValueError:
        raise LiverestoreError(f"invalid age {text!r}: use e.g. 12h or 7d") from None
    if value < 0:
        raise LiverestoreError(f"invalid age {text!r}: must not be negative")
    return value * units[unit]


def _in_use(path: Path) -> bool:
    lock = path / CACHE_LOCK_NAME
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def list_caches(root: Path) -> list[CacheEntry]:
    if not root.is_dir():
        return []
    out = []
    now = time.time()
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in d.iterdir() if f.is_file()]
        newest = max((f.stat().st_mtime for f in files), default=d.stat().st_mtime)
        out.append(CacheEntry(d, sum(f.stat().st_blocks * 512 for f in files), now - newest, _in_use(d)))
    return out


def prune_caches(root: Path, older_than_s: float) -> tuple[list[Path], int, int]:
    """(removed, in use and kept, bytes freed). Each removal holds the directory's lock, so an
    agent starting at the same moment either gets it first (and is kept) or finds it gone."""
    removed, in_use, freed = [], 0, 0
    for e in list_caches(root):
        if e.idle_s < older_than_s:
            continue
        lock = e.path / CACHE_LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                in_use += 1
                continue
            shutil.rmtree(e.path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(e.path)
        freed += e.bytes
    return removed, in_use, freed
