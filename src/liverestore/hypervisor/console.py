"""The guest's serial console as both drivers see it: a log file QEMU (or virtlogd) appends to.

Boot markers and command answers are found by reading that file, so the console can be watched
whether the VM is a process of ours or a libvirt domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from liverestore.errors import LiverestoreError


def type_into_pty(pty: str, line: str, linger: float = 2.5) -> None:
    """Type a line into a serial console's pty (a libvirt domain's). QEMU notices a pty client by
    polling once a second, and reads what was typed only while one is connected: stay connected
    ``linger`` seconds, discarding the guest's output meanwhile (the log file has it)."""
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode() + b"\n")
        for _ in range(int(linger * 10)):
            time.sleep(0.1)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 65536)
    finally:
        os.close(fd)


def read_serial_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for_marker(
    path: Path, marker: str, timeout: float, start: int, running: Callable[[], bool], why_stopped: str = ""
) -> float:
    """When ``marker`` appeared in the log after byte ``start`` (monotonic); a clear error when the
    VM stops first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if marker in read_serial_log(path)[start:]:
            return time.monotonic()
        if not running():
            raise LiverestoreError(f"the VM stopped before printing {marker}{why_stopped}")
        if time.monotonic() > deadline:
            raise LiverestoreError(f"the VM did not print {marker} within {timeout:.0f} s{_last_words(path, start)}")
        await asyncio.sleep(0.05)


def _last_words(path: Path, start: int) -> str:
    """Where to look next, on one line: the console log and the guest's last line since ``start``
    (a late marker is told apart from a hung guest, or from a command it never received)."""
    lines = [ln.strip() for ln in read_serial_log(path)[start:].splitlines() if ln.strip()]
    last = repr(lines[-1][:80]) if lines else "nothing"
    return f" (console log {path}; its last line since then: {last})"
