"""The one interface between restore orchestration and a hypervisor (plain QEMU, libvirt).

The orchestrator never names a driver: it hands over *what* to run (a ``VmSpec`` read from the
restore point) and *where each disk reads from* (``DiskAttachment``), and gets back a running VM
it can watch, relocate and pivot. Drivers never reach into the agent: an NBD address is all they
know of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from liverestore.hypervisor.vmspec import VmSpec


@dataclass(frozen=True)
class DiskAttachment:
    """A guest disk (``name`` is its target, e.g. ``vda``): read from an NBD export with writes
    going to a local qcow2 overlay, or (classic restore, local baseline, CD-ROMs) a local file."""

    name: str
    size: int
    nbd_host: str = ""
    nbd_port: int = 0
    export: str = ""
    overlay: Path | None = None
    local_path: Path | None = None
    tls_creds: Path | None = None  # x509 client credentials (QEMU's layout) when the export needs TLS


async def wait_until_stopped(running: Callable[[], bool], timeout: float) -> bool:
    """Give a VM up to ``timeout`` seconds to stop on its own (after an ACPI request or a guest
    power-off); True if it did. Both drivers force it off only after this."""
    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return not running()


@dataclass(frozen=True)
class JobProgress:
    disk: str
    offset: int
    length: int
    ready: bool
    failed: bool = False


class Hypervisor(Protocol):
    """What restore orchestration needs from a hypervisor: one running VM and its relocation."""

    kind: str  # "qemu" | "libvirt": shown to the operator and kept in the restore state
    workdir: Path  # this VM's scratch files: overlays, sockets, serial log
    serial_log: Path

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    def check(self, spec: VmSpec, destinations: dict[str, Path]) -> None:
        """Refuse, before anything starts, what would fail or clobber something later."""
        ...

    async def launch(self, spec: VmSpec, disks: list[DiskAttachment], nvram: Path | None = None) -> None:
        """Start the VM; ``nvram`` is its restored firmware variable store, if it has one."""
        ...

    async def connect(self) -> None:
        """Reattach the control channel of an adopted VM."""
        ...

    def describe(self) -> str:
        """One line naming the running VM: domain or process, pid, sockets."""
        ...

    def state(self) -> dict[str, Any]:
        """What ``adopt`` needs to find this VM again from another process (absolute paths only)."""
        ...

    async def wait_for_console(self, marker: str, timeout: float, start: int = 0) -> float: ...

    async def guest_agent_ready(self) -> bool | None:
        """True when the guest agent answers, False when not yet, None when the VM has none."""
        ...

    async def start_relocation(self, destinations: dict[str, Path], fmt: str = "raw") -> None: ...

    async def relocation_progress(self, raise_on_failure: bool = True) -> list[JobProgress]: ...

    def relocation_targets(self) -> list[Path]:
        """The files the running copies write (after ``start_relocation``): the orchestrator
        starts their write-back while the copies run (see writeback.py)."""
        ...

    async def pivot(self) -> None:
        """Switch every disk to its destination, drop the NBD-backed nodes and the overlays, and
        leave the VM defined (where the hypervisor keeps definitions) on its new disks."""
        ...

    async def persist(self) -> None:
        """Make the VM, as it now runs on local disks, known to the host's VM manager."""
        ...

    async def abort_relocation(self) -> None:
        """Cancel the copies and remove every destination file this relocation created."""
        ...

    async def paused_on_io_error(self) -> bool:
        """Whether the hypervisor paused the guest on a write its disk refused (a full disk:
        QEMU's ``werror=enospc``); the guest waits there, nothing lost, until it is resumed."""
        ...

    async def resume_after_io_error(self) -> bool:
        """Let a guest that its hypervisor paused on a failed write (a full disk: QEMU's
        ``werror=enospc``) run again, once there is room; True if it was paused so."""
        ...

    def serial_output(self) -> str: ...

    async def send_console(self, line: str) -> None: ...

    async def shutdown(self, timeout: float) -> bool:
        """ACPI power-down, waited for up to ``timeout``; then forced. True if the guest obeyed."""
        ...

    async def stop(self, graceful_timeout: float = 0) -> None:
        """Stop the VM now (after waiting ``graceful_timeout`` for a guest-initiated power-off)."""
        ...

    async def close(self) -> None:
        """Let go of the VM without stopping it (it keeps running, managed or not)."""
        ...
