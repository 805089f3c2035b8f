"""Access recorder: every client read, so boot profiles can be built from what the guest touched."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

MAX_EVENTS = 100_000  # the newest reads are kept (~15 MB at most); a boot is a few thousand


@dataclass(frozen=True, slots=True)
class AccessEvent:
    t: float  # time.monotonic()
    export: str
    offset: int
    length: int
    hit: bool


class AccessRecorder:
    def __init__(self, log_path: Path | None = None) -> None:
        self.events: deque[AccessEvent] = deque(maxlen=MAX_EVENTS)
        self.dropped = 0
        self._file: TextIO | None = open(log_path, "a", buffering=1 << 16) if log_path else None  # noqa: SIM115

    def record(self, export: str, offset: int, length: int, hit: bool) -> None:
        ev = AccessEvent(time.monotonic(), export, offset, length, hit)
        if len(self.events) == MAX_EVENTS:
            self.dropped += 1  # the oldest read falls out of the ring
        self.events.append(ev)
        if self._file:
            self._file.write(
                json.dumps(
                    {
                        "t": round(time.time(), 6),
                        "export": export,
                        "offset": offset,
                        "length": length,
                        "hit": hit,
                    }
                )
                + "\n"
            )

    def since(self, t: float, until: float | None = None, exports: Collection[str] | None = None) -> list[AccessEvent]:
        """Reads between ``t`` and ``until``; of ``exports`` only, when an agent serves several VMs."""
        return [e for e in self.events
                if e.t >= t and (until is None or e.t <= until) and (exports is None or e.export in exports)]  # fmt: skip

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
