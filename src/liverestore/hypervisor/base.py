"""The small interface between restore orchestration and a hypervisor (QEMU now, libvirt later)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class DiskAttachment:
    """A guest disk: read from an NBD export with writes going to a local overlay, or (for the
    classic restore path and the local-disk baseline) a plain local raw file."""

    name: str
    size: int
    nbd_host: str = ""
    nbd_port: int = 0
    export: str = ""
    overlay: Path | None = None
    local_path: Path | None = None


@dataclass(frozen=True)
class JobProgress:
    disk: str
    offset: int
    length: int
    ready: bool
    failed: bool = False


class Hypervisor(Protocol):
    """What restore orchestration needs from a hypervisor: one running VM and its relocation."""

    workdir: Path
    disks: list[DiskAttachment]
    serial_log: Path

    @property
    def pid(self) -> int | None: ...

    async def launch(self, disks: list[DiskAttachment]) -> None: ...

    async def wait_for_console(self, marker: str, timeout: float, start: int = 0) -> float: ...

    async def start_relocation(self, destinations: dict[str, Path]) -> None: ...

    async def relocation_progress(self, raise_on_failure: bool = True) -> list[JobProgress]: ...

    async def pivot(self) -> None: ...

    async def abort_relocation(self) -> None: ...

    def serial_output(self) -> str: ...

    async def send_console(self, line: str) -> None: ...

    async def stop(self, graceful_timeout: float = 0) -> None: ...

    @property
    def running(self) -> bool: ...
