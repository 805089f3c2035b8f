"""QEMU driver: launch from NBD through a qcow2 overlay, relocate with blockdev-mirror, pivot.

Node graph per disk ``d`` before the pivot::

    virtio-blk (id dev-d) → qcow2 overlay (node ovl-d, guest writes) → nbd (node src-d, read-only)

Relocation mirrors ``ovl-d`` (overlay + backing, so guest writes are carried over) into a sparse
raw file (node dst-d). After ``block-job-complete`` the device sits on dst-d; ovl-d and src-d are
``blockdev-del``'d so QEMU closes its NBD connection and the agent can be released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment, JobProgress

log = logging.getLogger("liverestore.qemu")

NBD_RECONNECT_DELAY_S = 15  # QEMU retries a lost agent this long before failing guest I/O


class QemuVM:
    def __init__(self, workdir: Path, memory_mb: int = 512, accel: str = "tcg", cpus: int = 1) -> None:
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.accel = accel
        self.cpus = cpus
        self.qmp_path = workdir / "qmp.sock"
        self.serial_sock = workdir / "serial.sock"
        self.serial_log = workdir / "serial.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.disks: list[DiskAttachment] = []
        self.destinations: dict[str, Path] = {}
        self._stderr_path = workdir / "qemu.stderr"
        self._attached_pid: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self._attached_pid

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self._attached_pid is not None and _alive(self._attached_pid)

    def attach(self, pid: int, disks: list[DiskAttachment]) -> bool:
        """Adopt a QEMU started by an earlier (dead) orchestrator; False if it is gone."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if str(self.qmp_path).encode() not in b" ".join(cmdline):
            return False  # the pid was reused by something else
        self._attached_pid = pid
        self.disks = disks
        return True

    async def connect(self) -> None:
        await self._connect_qmp()

    async def launch(self, disks: list[DiskAttachment]) -> None:
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            raise LiverestoreError("qemu-system-x86_64 is not installed (run ./setup.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_path, self.serial_sock, self.serial_log):
            p.unlink(missing_ok=True)
        self.disks = disks
        args = [
            binary, "-name", "liverestore", "-accel", self.accel, "-m", str(self.memory_mb),
            "-smp", str(self.cpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
        for i, d in enumerate(disks):
            args += _blockdev_args(d)
            args += ["-device", f"virtio-blk-pci,drive=ovl-{d.name},id=dev-{d.name},bootindex={i + 1}"]
        log.info("launching %s", " ".join(args))
        with open(self._stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        await self._connect_qmp()

    async def _connect_qmp(self) -> None:
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if not self.running:
                raise LiverestoreError(f"QEMU failed to start: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise LiverestoreError("QEMU did not open its QMP socket within 30 s")
            await asyncio.sleep(0.02)
        self.qmp = QMPClient("liverestore")
        await self.qmp.connect(str(self.qmp_path))

    def _stderr_tail(self) -> str:
        try:
            lines = self._stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1] if lines else f"exit code {self.proc.returncode if self.proc else '?'}"

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if self.qmp is None:
            raise LiverestoreError("QEMU is not running")
        try:
            return await self.qmp.execute(cmd, args)
        except QMPError as e:
            raise LiverestoreError(f"QEMU refused {cmd}: {e}") from None

    async def stop(self, graceful_timeout: float = 0) -> None:
        """Stop QEMU: a guest-initiated poweroff is awaited up to ``graceful_timeout``, then quit/kill."""
        if self.proc is None:
            await self._stop_attached(graceful_timeout)
            return
        if graceful_timeout and self.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), graceful_timeout)
        if self.running and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        if self.running:
            self.proc.kill()
            await self.proc.wait()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None

    async def _stop_attached(self, graceful_timeout: float) -> None:
        pid = self._attached_pid
        if pid is None:
            return
        deadline = time.monotonic() + graceful_timeout
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if _alive(pid) and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
        for _ in range(100):
            if not _alive(pid):
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None

    # -- console -------------------------------------------------------------------------------
    def serial_output(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def send_console(self, line: str) -> None:
        _reader, writer = await asyncio.open_unix_connection(str(self.serial_sock))
        writer.write(line.encode() + b"\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # let QEMU pass it to the UART before we hang up
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def wait_for_console(self, marker: str, timeout: float, start: int = 0) -> float:
        """Wait until ``marker`` appears in the serial log after byte ``start``; returns when it did."""
        deadline = time.monotonic() + timeout
        while True:
            if marker in self.serial_output()[start:]:
                return time.monotonic()
            if not self.running:
                raise LiverestoreError(f"the VM stopped before printing {marker} ({self._stderr_tail()})")
            if time.monotonic() > deadline:
                raise LiverestoreError(f"the VM did not print {marker} within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    # -- relocation ----------------------------------------------------------------------------
    async def start_relocation(self, destinations: dict[str, Path]) -> None:
        self.destinations = destinations
        for d in self.disks:
            dest = destinations[d.name]
            r = subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(dest), str(d.size)],
                               capture_output=True, text=True, check=False)  # fmt: skip
            if r.returncode != 0:
                raise LiverestoreError(f"cannot create destination {dest}: {r.stderr.strip()}")
            await self.execute("blockdev-add", {
                "driver": "raw", "node-name": f"dst-{d.name}", "discard": "unmap", "detect-zeroes": "unmap",
                "file": {"driver": "file", "filename": str(dest), "discard": "unmap"},
            })  # fmt: skip
        for d in self.disks:
            await self.execute("blockdev-mirror", {
                "job-id": f"reloc-{d.name}", "device": f"ovl-{d.name}", "target": f"dst-{d.name}",
                "sync": "full", "auto-finalize": True, "auto-dismiss": False,
            })  # fmt: skip

    async def relocation_progress(self, raise_on_failure: bool = True) -> list[JobProgress]:
        jobs = await self.execute("query-block-jobs")
        by_id = {j["device"]: j for j in jobs}
        out = []
        for d in self.disks:
            j = by_id.get(f"reloc-{d.name}")
            if j is None:
                raise LiverestoreError(f"the relocation job of disk {d.name} disappeared")
            failed = j.get("status") == "concluded" and bool(j.get("error"))
            if failed and raise_on_failure:
                raise LiverestoreError(f"relocation of disk {d.name} failed: {j['error']}")
            out.append(JobProgress(d.name, int(j["offset"]), int(j["len"]), bool(j["ready"]), failed))
        return out

    async def pivot(self) -> None:
        """Switch every disk to its destination together, then drop the NBD-backed nodes."""
        for d in self.disks:
            await self.execute("block-job-complete", {"device": f"reloc-{d.name}"})
        deadline = time.monotonic() + 60
        pending = {f"reloc-{d.name}" for d in self.disks}
        while pending:
            jobs = {j["device"]: j for j in await self.execute("query-block-jobs")}
            for job_id in list(pending):
                j = jobs.get(job_id)
                if j is None or j["status"] == "concluded":
                    if j is not None and j.get("error"):
                        raise LiverestoreError(f"pivot of {job_id} failed: {j['error']}")
                    pending.discard(job_id)
                    if j is not None:
                        await self.execute("job-dismiss", {"id": job_id})
            if time.monotonic() > deadline:
                raise LiverestoreError("the pivot did not finish within 60 s")
            await asyncio.sleep(0.05)
        for d in self.disks:
            await self.execute("blockdev-del", {"node-name": f"ovl-{d.name}"})
            await self.execute("blockdev-del", {"node-name": f"src-{d.name}"})

    async def abort_relocation(self) -> None:
        """Cancel mirrors; the VM keeps running from the agent and the destinations are removed."""
        for d in self.disks:
            with contextlib.suppress(LiverestoreError):
                await self.execute("block-job-cancel", {"device": f"reloc-{d.name}", "force": True})
        await asyncio.sleep(0.2)
        for d in self.disks:
            with contextlib.suppress(LiverestoreError):
                await self.execute("job-dismiss", {"id": f"reloc-{d.name}"})
            with contextlib.suppress(LiverestoreError):
                await self.execute("blockdev-del", {"node-name": f"dst-{d.name}"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _blockdev_args(d: DiskAttachment) -> list[str]:
    if d.local_path is not None:
        node = {"driver": "raw", "node-name": f"ovl-{d.name}", "discard": "unmap",
                "file": {"driver": "file", "filename": str(d.local_path), "discard": "unmap"}}  # fmt: skip
        return ["-blockdev", json.dumps(node)]
    assert d.overlay is not None, "an NBD disk needs an overlay for guest writes"
    _create_overlay(d.overlay, d.size)
    src = {
        "driver": "nbd", "node-name": f"src-{d.name}", "read-only": True,
        "server": {"type": "inet", "host": d.nbd_host, "port": str(d.nbd_port)},
        "export": d.export, "reconnect-delay": NBD_RECONNECT_DELAY_S,
    }  # fmt: skip
    ovl = {
        "driver": "qcow2", "node-name": f"ovl-{d.name}", "backing": f"src-{d.name}",
        "file": {"driver": "file", "filename": str(d.overlay)}, "discard": "unmap",
    }  # fmt: skip
    return ["-blockdev", json.dumps(src), "-blockdev", json.dumps(ovl)]


def _create_overlay(path: Path, size: int) -> None:
    """An empty qcow2 whose backing node is given at -blockdev time (no backing path recorded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise LiverestoreError(f"cannot create overlay {path}: {r.stderr.strip()}")
