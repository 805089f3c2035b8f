"""Test helpers: real disks, real repositories, a real agent on a real socket."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from liverestore.agent.agent import AgentConfig, MediaAgent
from liverestore.repository import Repository, RestorePoint

T = TypeVar("T")
MiB = 1 << 20


def make_disk(path: Path, size: int = 64 * MiB, seed: int = 1) -> bytes:
    """A raw disk with holes, random data, explicit zeros and a repeated (dedupable) pattern."""
    rnd = random.Random(seed)
    pieces = [
        (1 * MiB, rnd.randbytes(3 * MiB + 12345)),  # crosses block boundaries unaligned
        (10 * MiB, bytes(2 * MiB)),  # written zeros: must not be stored
        (20 * MiB + 4096, b"liverestore" * 50000),  # compressible
        (size - 100_000, rnd.randbytes(100_000)),  # data up to the very end
    ]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            if offset + len(data) <= size:
                f.seek(offset)
                f.write(data)
    return path.read_bytes()


class AgentThread:
    """A MediaAgent on its own event loop in a thread, so blocking clients can run in the test."""

    def __init__(self, repo: Repository, point: RestorePoint | list[RestorePoint], config: AgentConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> MediaAgent:
            return MediaAgent(repo, point, config)

        self.agent = self.call(make())
        self.port = self.call(self.agent.listen("127.0.0.1", 0))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        async def wrap() -> Any:
            return fn(*args)

        return self.call(wrap())

    def uri(self, disk: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.agent.point.vm}/{disk}"

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.agent.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file: enough to prove a repository was not touched."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out
