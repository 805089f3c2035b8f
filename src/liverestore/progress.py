"""Progress display: a rich bar on a terminal, silence otherwise (logs and --json stay clean)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)


@contextmanager
def byte_progress(label: str, counts: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A bar per name; ``counts``: done and total are things (packs), not bytes."""
    if not sys.stderr.isatty():
        yield lambda name, done, total: None
        return
    tasks: dict[str, TaskID] = {}
    amounts = (MofNCompleteColumn(),) if counts else (DownloadColumn(), TransferSpeedColumn())
    with Progress(TextColumn(f"{label} [bold]{{task.description}}"), BarColumn(), *amounts, transient=False) as prog:

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=total)
            prog.update(tasks[name], completed=done)

        yield update


@contextmanager
def restore_display(enabled: bool) -> Iterator[Callable[[Any], None] | None]:
    """Live view of restores, a row per VM: phase, % relocated, cache hit rate, repository MB/s."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    latest: dict[str, Any] = {}  # the newest status of each VM, in the order they first reported

    def render() -> Table:
        t = Table.grid(padding=(0, 2))
        for s in latest.values():
            t.add_row(
                *([s.name] if len(latest) > 1 else []),
                f"[bold]{s.phase}[/bold]",
                f"{s.elapsed_s:6.1f} s",
                f"relocated {100 * s.relocated_fraction:5.1f} %",
                f"cache hit {100 * s.hit_rate:5.1f} %",
                f"cached {s.cached_blocks}/{s.allocated_blocks} blocks",
                f"repo {s.fetched_bytes / 2**20:7.1f} MiB ({s.fetch_mbps:5.1f} MB/s)",
            )
        return t

    def update(s: Any) -> None:
        latest[s.name] = s
        live.update(render())

    with Live(console=Console(stderr=True), refresh_per_second=4, transient=False) as live:
        yield update
