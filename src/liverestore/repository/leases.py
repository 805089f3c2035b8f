"""Leases: who is using a repository right now, so retention never pulls data from under them.

A lease is one object (``locks/<id>``) naming its kind, holder and expiry, refreshed by a thread
while held; a holder that dies (``kill -9``, a lost host) stops refreshing and its lease expires.

- ``backup``: its fresh chunks are not referenced by any point until the commit. Backups and
  maintenance (forget, prune) exclude each other.
- ``serve``: an agent serving a point (instant restore, ``serve``). Its point cannot be forgotten,
  and its manifests and their chunks survive a prune even if the point is gone.
- ``maintenance``: forget and prune; one at a time, and never beside a backup.

Exclusion is "write your lease, then look": of two that start together at least one sees the
other and steps back, so both may refuse but never both proceed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from liverestore.errors import LiverestoreError, RepositoryError
from liverestore.repository.backend import Handle, ObjectMissing

if TYPE_CHECKING:
    from liverestore.repository.repo import Repository

BACKUP, SERVE, MAINTENANCE = "backup", "serve", "maintenance"
CONFLICTS = {BACKUP: {MAINTENANCE}, MAINTENANCE: {BACKUP, MAINTENANCE}, SERVE: set[str]()}


def lease_ttl() -> float:
    """Seconds a lease lives without a refresh (tests shorten it with LIVERESTORE_LEASE_TTL)."""
    return float(os.environ.get("LIVERESTORE_LEASE_TTL", "600"))


@dataclass
class LeaseDoc:
    id: str
    kind: str
    holder: str
    expires: float
    points: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind} by {self.holder}"


def live_leases(repo: Repository) -> list[LeaseDoc]:
    """Leases not yet expired. An unreadable one counts as live until its object is old news:
    its holder may be writing it right now."""
    now, out = time.time(), []
    for lid in repo.backend.list("locks"):
        try:
            doc = json.loads(repo.open_object(repo.backend.load(Handle("locks", lid)), f"lease {lid}"))
            lease = LeaseDoc(id=lid, kind=doc["kind"], holder=doc["holder"], expires=float(doc["expires"]),
                             points=list(doc.get("points", [])), manifests=list(doc.get("manifests", [])))  # fmt: skip
        except ObjectMissing:
            continue  # released meanwhile
        except (RepositoryError, ValueError, KeyError, TypeError):
            lease = LeaseDoc(id=lid, kind="unknown", holder="an unreadable lease", expires=now + 1)
        if lease.expires > now:
            out.append(lease)
    return out


class Lease:
    """A held lease; ``release`` (or the context manager's exit) deletes it."""

    def __init__(self, repo: Repository, kind: str, points: list[str] | None = None,
                 manifests: list[str] | None = None) -> None:  # fmt: skip
        self.repo, self.kind = repo, kind
        self.id = f"{int(time.time())}-{secrets.token_hex(6)}"
        self.body = {"kind": kind, "holder": f"pid {os.getpid()} on {socket.gethostname()}",
                     "points": points or [], "manifests": manifests or []}  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        doc = {**self.body, "expires": time.time() + lease_ttl()}
        h = Handle("locks", self.id)
        self.repo.backend.save(h, self.repo.seal_object(json.dumps(doc).encode(), f"lease {self.id}"))

    def _refresh(self) -> None:
        while not self._stop.wait(lease_ttl() / 3):
            with contextlib.suppress(RepositoryError):  # an outage: the lease lapses only if it lasts a TTL
                self._write()

    def take(self) -> Lease:
        """Write the lease, then step back if a conflicting one is live."""
        self._write()
        clash = [x for x in live_leases(self.repo) if x.id != self.id and x.kind in CONFLICTS[self.kind]]
        if clash:
            self.release()
            what = ", ".join(x.describe() for x in clash)
            raise LiverestoreError(f"the repository is busy ({what}); try again when it is done"
                                   f"{'' if self.kind == SERVE else ' (a dead holder lapses within ' + str(int(lease_ttl())) + ' s)'}")  # fmt: skip
        self._thread = threading.Thread(target=self._refresh, name=f"lease-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with contextlib.suppress(RepositoryError):  # else it lapses on its own
            self.repo.backend.remove(Handle("locks", self.id))

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc: Any) -> None:
        self.release()
