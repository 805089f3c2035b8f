"""QEMU driver: launch from NBD through a qcow2 overlay, relocate with blockdev-mirror, pivot.

Node graph per disk ``d`` before the pivot::

    device (id dev-d, on the disk's bus) → qcow2 overlay (node ovl-d, guest writes) → nbd (src-d)

Relocation mirrors ``ovl-d`` (overlay + backing, so guest writes are carried over) into a sparse
file ``<final>.partial`` (node dst-d over file node dstf-d). After ``block-job-complete`` the
device sits on dst-d; ovl-d and src-d are ``blockdev-del``'d so QEMU closes its NBD connection
and the agent can be released; the file is renamed to its final name and dst-d is reopened on it,
so QEMU's view and the directory agree.
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
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import GreetingError

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment, JobProgress, wait_until_stopped
from liverestore.hypervisor.console import read_serial_log, wait_for_marker
from liverestore.hypervisor.vmspec import DiskSpec, VmSpec

log = logging.getLogger("liverestore.qemu")

NBD_RECONNECT_DELAY_S = 15  # QEMU retries a lost agent this long before failing guest I/O
_QMP_CONNECT_ATTEMPTS = 5


class QemuVM:
    """A QEMU process of our own, driven over QMP. It runs the stored VM's vCPUs, memory, machine,
    firmware, disk buses and NICs (user networking: QEMU alone has no host networks to join)."""

    kind = "qemu"

    def __init__(self, workdir: Path, accel: str = "tcg") -> None:
        self.workdir = workdir.absolute()
        self.accel = accel
        self.qmp_path = self.workdir / "qmp.sock"
        self.serial_sock = self.workdir / "serial.sock"
        self.serial_log = self.workdir / "serial.log"
        self.pidfile = self.workdir / "qemu.pid"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.spec: VmSpec | None = None
        self.disks: list[DiskAttachment] = []
        self.destinations: dict[str, Path] = {}
        self.dest_format = "raw"
        self._stderr_path = self.workdir / "qemu.stderr"
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

    def describe(self) -> str:
        name = self.spec.name if self.spec else "?"
        return f"VM {name}: QEMU pid {self.pid}, QMP {self.qmp_path}, serial {self.serial_sock} (log {self.serial_log})"

    def state(self) -> dict[str, Any]:
        return {"pid": self.pid, "workdir": str(self.workdir), "dest_format": self.dest_format,
                "destinations": {n: str(p) for n, p in self.destinations.items()}}  # fmt: skip

    @classmethod
    def adopt(cls, st: dict[str, Any], spec: VmSpec, disks: list[DiskAttachment]) -> QemuVM:
        """Find the QEMU an earlier (dead) orchestrator started; a clear error if it is gone."""
        vm = cls(Path(st["workdir"]))
        if not vm.attach(int(st["pid"]), disks):
            raise LiverestoreError(f"the VM of the interrupted restore (QEMU pid {st['pid']}) is gone; "
                                   "start a new restore")  # fmt: skip
        vm.spec = spec
        vm.destinations = {n: Path(p) for n, p in st.get("destinations", {}).items()}
        vm.dest_format = st.get("dest_format", "raw")
        return vm

    async def persist(self) -> None:
        """Plain QEMU keeps no definitions: the running process is all there is."""

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

    def check(self, spec: VmSpec, destinations: dict[str, Path]) -> None:
        binary = shutil.which(_EMULATORS.get(spec.arch, f"qemu-system-{spec.arch}"))
        if binary is None:
            raise LiverestoreError(f"no QEMU for {spec.arch} guests is installed (run ./setup.sh)")
        if spec.machine:
            r = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, check=False)
            if spec.machine.split(",")[0] not in r.stdout.split():
                raise LiverestoreError(f"this host's QEMU has no machine type {spec.machine!r} "
                                       f"(needed by {spec.name})")  # fmt: skip
        if spec.loader and not Path(spec.loader).exists():
            raise LiverestoreError(f"{spec.name} needs firmware {spec.loader}, which this host lacks")
        for path in destinations.values():
            if path.exists():
                raise LiverestoreError(f"{path} already exists; refusing to overwrite a disk (move it away first)")

    async def launch(self, spec: VmSpec, disks: list[DiskAttachment], nvram: Path | None = None) -> None:
        binary = shutil.which(_EMULATORS.get(spec.arch, f"qemu-system-{spec.arch}"))
        if binary is None:
            raise LiverestoreError(f"no QEMU for {spec.arch} guests is installed (run ./setup.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_path, self.serial_sock, self.serial_log, self.pidfile):
            p.unlink(missing_ok=True)
        self.spec, self.disks = spec, disks
        args = [
            binary, "-name", f"{spec.name},process=qemu:{spec.name}", "-accel", self.accel,
            "-machine", spec.machine or "pc", "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-pidfile", str(self.pidfile),
            "-S",  # paused until QMP is up: see _connect_qmp
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
        if spec.uuid:
            args += ["-uuid", spec.uuid]
        if spec.loader:
            args += ["-drive", f"if=pflash,format=raw,readonly={'on' if spec.loader_readonly else 'off'},"
                               f"file={spec.loader}"]  # fmt: skip
            if nvram is not None:
                args += ["-drive", f"if=pflash,format=raw,file={nvram}"]
        args += _disk_args(spec, disks)
        for i, nic in enumerate(spec.nics):
            model = _NIC_MODELS.get(nic.model, nic.model)
            args += ["-netdev", f"user,id=net{i}", "-device", f"{model},netdev=net{i},mac={nic.mac},id=nic{i}"]
        log.info("launching %s", " ".join(args))
        with open(self._stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        await self._connect_qmp()
        await self.execute("cont")
        log.info("%s", self.describe())

    async def _connect_qmp(self) -> None:
        """Connect and negotiate, tolerating QEMU 7.2's greeting race.

        QEMU's monitor handles a new connection in its I/O thread while the main loop may emit an
        event on it before the greeting is out (a data race fixed upstream only in 2025), and
        qemu.qmp then fails on a first line with no ``QMP`` member. A VM we launch is paused (-S)
        until we are connected, so its guest raises no events; a running one we adopt may, and a
        fresh connection gets a fresh greeting."""
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if not self.running:
                raise LiverestoreError(f"QEMU failed to start: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise LiverestoreError("QEMU did not open its QMP socket within 30 s")
            await asyncio.sleep(0.02)
        for attempt in range(1, _QMP_CONNECT_ATTEMPTS + 1):
            self.qmp = QMPClient("liverestore")
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except ConnectError as e:
                with contextlib.suppress(Exception):
                    await self.qmp.disconnect()
                self.qmp = None
                if not isinstance(e.exc, GreetingError) or attempt == _QMP_CONNECT_ATTEMPTS:
                    # it opened its socket, then refused an option and quit
                    if self.proc is not None and await wait_until_stopped(lambda: self.running, 2.0):
                        raise LiverestoreError(f"QEMU failed to start: {self._stderr_tail()}") from None
                    raise LiverestoreError(f"cannot talk to QEMU over {self.qmp_path}: {e}") from None
                log.info("QEMU's QMP greeting was garbled (%s); reconnecting", e.exc)
                await asyncio.sleep(0.1 * attempt)

    def _stderr_tail(self) -> str:
        """QEMU's own error: the first line it prefixes with its name ("qemu-system-x86_64: -m -5:
        Parameter 'size' expects ..."), not the last line of a message that wraps, nor a warning
        printed before it; else the last line."""
        try:
            lines = self._stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        if not lines:
            return f"exit code {self.proc.returncode if self.proc else '?'}"
        errors = (line for line in lines if line.startswith("qemu-system-") and ": warning: " not in line)
        return next(errors, lines[-1])

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

    async def shutdown(self, timeout: float) -> bool:
        """ACPI power button first (the guest flushes its journal); forced only after ``timeout``."""
        if self.running and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("system_powerdown"), 5)
        obeyed = await wait_until_stopped(lambda: self.running, timeout)
        if not obeyed:
            log.warning("%s did not power off within %.0f s of the ACPI request; forcing it off",
                        self.spec.name if self.spec else "the VM", timeout)  # fmt: skip
        await self.stop()
        return obeyed

    async def close(self) -> None:
        """Hang up QMP; QEMU keeps running (started in its own session, it outlives us)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None

    async def guest_agent_ready(self) -> bool | None:
        return None  # the plain driver wires no guest-agent channel

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
        return read_serial_log(self.serial_log)

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
        return await wait_for_marker(self.serial_log, marker, timeout, start, lambda: self.running,
                                     f" ({self._stderr_tail()})")  # fmt: skip

    # -- relocation ----------------------------------------------------------------------------
    def _from_backup(self) -> list[DiskAttachment]:
        """The disks read from the agent: what relocation moves (CD-ROMs were copied before launch)."""
        return [d for d in self.disks if d.local_path is None]

    def _staging(self, name: str) -> Path:
        """Mirrors write to ``<final>.partial``: a file with a final name is always complete."""
        final = self.destinations[name]
        return final.with_name(final.name + ".partial")

    async def start_relocation(self, destinations: dict[str, Path], fmt: str = "raw") -> None:
        self.destinations, self.dest_format = dict(destinations), fmt
        for d in self._from_backup():
            dest = self._staging(d.name)
            r = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(dest), str(d.size)],
                               capture_output=True, text=True, check=False)  # fmt: skip
            if r.returncode != 0:
                raise LiverestoreError(f"cannot create destination {dest}: {r.stderr.strip()}")
            await self.execute("blockdev-add", {
                "driver": "file", "node-name": f"dstf-{d.name}", "filename": str(dest), "discard": "unmap",
            })  # fmt: skip
            await self.execute("blockdev-add", {
                "driver": fmt, "node-name": f"dst-{d.name}", "discard": "unmap", "detect-zeroes": "unmap",
                "file": f"dstf-{d.name}",
            })  # fmt: skip
        for d in self._from_backup():
            await self.execute("blockdev-mirror", {
                "job-id": f"reloc-{d.name}", "device": f"ovl-{d.name}", "target": f"dst-{d.name}",
                "sync": "full", "auto-finalize": True, "auto-dismiss": False,
            })  # fmt: skip

    def relocation_targets(self) -> list[Path]:
        return [self._staging(d.name) for d in self._from_backup() if d.name in self.destinations]

    async def _block_jobs(self) -> dict[str, Any]:
        """QEMU's block jobs by id."""
        return {j["device"]: j for j in await self.execute("query-block-jobs")}

    async def relocation_progress(self, raise_on_failure: bool = True) -> list[JobProgress]:
        by_id = await self._block_jobs()
        out = []
        for d in self._from_backup():
            j = by_id.get(f"reloc-{d.name}")
            if j is None:
                raise LiverestoreError(f"the relocation job of disk {d.name} disappeared")
            failed = j.get("status") == "concluded" and bool(j.get("error"))
            if failed and raise_on_failure:
                raise LiverestoreError(f"relocation of disk {d.name} failed: {j['error']}")
            out.append(JobProgress(d.name, int(j["offset"]), int(j["len"]), bool(j["ready"]), failed))
        return out

    async def pivot(self) -> None:
        """Switch every disk to its destination together, drop the NBD-backed nodes and overlays,
        then give each destination its final name — in QEMU's node too, not only on disk."""
        for d in self._from_backup():
            await self.execute("block-job-complete", {"device": f"reloc-{d.name}"})
        deadline = time.monotonic() + 60
        pending = {f"reloc-{d.name}" for d in self._from_backup()}
        while pending:
            jobs = await self._block_jobs()
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
        for d in self._from_backup():
            await self.execute("blockdev-del", {"node-name": f"ovl-{d.name}"})
            await self.execute("blockdev-del", {"node-name": f"src-{d.name}"})
            if d.overlay is not None:
                d.overlay.unlink(missing_ok=True)
        for d in self._from_backup():
            final = self.destinations[d.name]
            os.replace(self._staging(d.name), final)
            # Two hops: a second locked open of the same file would conflict with the first one's
            # image locks, so the intermediate node opens it unlocked, and the last one locked.
            await self._swap_file_node(d.name, f"dstf-{d.name}", f"dstg-{d.name}", final, locking=False)
            await self._swap_file_node(d.name, f"dstg-{d.name}", f"dstl-{d.name}", final, locking=True)

    async def _swap_file_node(self, disk: str, old: str, new: str, filename: Path, locking: bool) -> None:
        """Put the destination's format node dst-<disk> on a freshly opened file node."""
        await self.execute("blockdev-add", {
            "driver": "file", "node-name": new, "filename": str(filename), "discard": "unmap",
            "locking": "on" if locking else "off",
        })  # fmt: skip
        await self.execute("blockdev-reopen", {"options": [{
            "driver": self.dest_format, "node-name": f"dst-{disk}", "discard": "unmap",
            "detect-zeroes": "unmap", "file": new,
        }]})  # fmt: skip
        await self.execute("blockdev-del", {"node-name": old})

    async def paused_on_io_error(self) -> bool:
        if not self.running or self.qmp is None:
            return False
        status = await self.execute("query-status")
        return bool(status.get("status") == "io-error")

    async def resume_after_io_error(self) -> bool:
        if not await self.paused_on_io_error():
            return False
        await self.execute("cont")
        return True

    async def abort_relocation(self) -> None:
        """Cancel mirrors; the VM keeps running from the agent and the destinations are removed."""
        for d in self._from_backup():
            with contextlib.suppress(LiverestoreError):
                await self.execute("block-job-cancel", {"device": f"reloc-{d.name}", "force": True})
        # A cancel takes effect later: a job still running holds its target nodes, and deleting
        # them fails (a relocation started again then met "Duplicate nodes"). One mirror failing
        # (its disk's copy hit a full destination) leaves the others running until then.
        ids = {f"reloc-{d.name}" for d in self._from_backup()}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(LiverestoreError):
                jobs = await self._block_jobs()
                if all(jobs.get(i) is None or jobs[i]["status"] == "concluded" for i in ids):
                    break
            await asyncio.sleep(0.1)
        for d in self._from_backup():
            with contextlib.suppress(LiverestoreError):
                await self.execute("job-dismiss", {"id": f"reloc-{d.name}"})
            for node in (f"dst-{d.name}", f"dstf-{d.name}"):
                with contextlib.suppress(LiverestoreError):
                    await self.execute("blockdev-del", {"node-name": node})
        for name in self.destinations:
            self._staging(name).unlink(missing_ok=True)


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


_EMULATORS = {"x86_64": "qemu-system-x86_64", "i686": "qemu-system-i386"}
_NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}


def _disk_args(spec: VmSpec, disks: list[DiskAttachment]) -> list[str]:
    """-blockdev/-device arguments putting each disk on the bus its definition names."""
    args: list[str] = []
    controllers: set[str] = set()
    unit: dict[str, int] = {}
    any_boot = any(d.boot_order for d in spec.disks)
    for i, d in enumerate(disks):
        ds = spec.disk(d.name) or DiskSpec(target=d.name)
        args += _blockdev_args(d, readonly=ds.device == "cdrom")
        bootindex = ds.boot_order if any_boot else (i + 1 if i == 0 else None)
        props = f"drive=ovl-{d.name},id=dev-{d.name}" + (f",bootindex={bootindex}" if bootindex else "")
        n = unit[ds.bus] = unit.get(ds.bus, -1) + 1
        kind = "cd" if ds.device == "cdrom" else "hd"
        if ds.bus == "virtio":
            args += ["-device", f"virtio-blk-pci,{props}"]
        elif ds.bus == "sata":
            if "ahci" not in controllers:
                controllers.add("ahci")
                args += ["-device", "ahci,id=ahci0"]
            args += ["-device", f"ide-{kind},bus=ahci0.{n},{props}"]
        elif ds.bus == "ide":
            args += ["-device", f"ide-{kind},bus=ide.{n // 2},unit={n % 2},{props}"]
        elif ds.bus == "scsi":
            if "scsi" not in controllers:
                controllers.add("scsi")
                args += ["-device", "virtio-scsi-pci,id=scsi0"]
            args += ["-device", f"scsi-{kind},bus=scsi0.0,scsi-id={n},{props}"]
        else:
            raise LiverestoreError(f"disk {d.name} is on a {ds.bus} bus, which the QEMU driver cannot attach")
    return args


def _blockdev_args(d: DiskAttachment, readonly: bool = False) -> list[str]:
    if d.local_path is not None:
        node = {"driver": "raw", "node-name": f"ovl-{d.name}", "discard": "unmap", "read-only": readonly,
                "file": {"driver": "file", "filename": str(d.local_path), "discard": "unmap"}}  # fmt: skip
        return ["-blockdev", json.dumps(node)]
    assert d.overlay is not None, "an NBD disk needs an overlay for guest writes"
    create_overlay(d.overlay, d.size)
    src = {
        "driver": "nbd", "node-name": f"src-{d.name}", "read-only": True,
        "server": {"type": "inet", "host": d.nbd_host, "port": str(d.nbd_port)},
        "export": d.export, "reconnect-delay": NBD_RECONNECT_DELAY_S,
    }  # fmt: skip
    tls: list[str] = []
    if d.tls_creds is not None:
        src["tls-creds"] = f"tls-{d.name}"
        tls = ["-object", f"tls-creds-x509,id=tls-{d.name},dir={d.tls_creds},endpoint=client"]
    ovl = {
        "driver": "qcow2", "node-name": f"ovl-{d.name}", "backing": f"src-{d.name}",
        "file": {"driver": "file", "filename": str(d.overlay)}, "discard": "unmap",
    }  # fmt: skip
    return [*tls, "-blockdev", json.dumps(src), "-blockdev", json.dumps(ovl)]


def create_overlay(path: Path, size: int) -> None:
    """An empty qcow2 whose backing node is given at launch time (no backing path recorded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise LiverestoreError(f"cannot create overlay {path}: {r.stderr.strip()}")
