"""The guest's serial console as both drivers see it: a log file QEMU (or virtlogd) appends to.

Boot markers and command answers are found by reading that file, so the console can be watched
whether the VM is a process of ours or a libvirt domain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from liverestore.errors import LiverestoreError


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
            raise LiverestoreError(f"the VM did not print {marker} within {timeout:.0f} s")
        await asyncio.sleep(0.05)
