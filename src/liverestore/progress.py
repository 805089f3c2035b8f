"""Progress display: a rich bar on a terminal, silence otherwise (logs and --json stay clean)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn


@contextmanager
def byte_progress(label: str) -> Iterator[Callable[[str, int, int], None]]:
    if not sys.stderr.isatty():
        yield lambda name, done, total: None
        return
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn(f"{label} [bold]{{task.description}}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=False,
    ) as prog:

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=total)
            prog.update(tasks[name], completed=done)

        yield update
