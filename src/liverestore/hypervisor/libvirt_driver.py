"""libvirt driver: the restored VM is the user's domain, managed by libvirt before and after.

During the restore the domain is *transient* (``createXML``): if the restore is aborted, destroying
it leaves nothing defined. Its disks are qcow2 overlays in the destination whose backing store is
the agent's NBD export. Relocation is libvirt's block copy of each disk straight to its final file;
after the pivot the domain is defined persistently on those files, so once we exit it is an
ordinary libvirt domain that ``virsh shutdown`` / ``virsh start`` boot from local disks.

Every libvirt call blocks, so each runs in a worker thread. A ``<metadata>`` marker in the running
domain names the restore that started it: ``--resume`` adopts only a domain that carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree as ET

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment, JobProgress, wait_until_stopped
from liverestore.hypervisor.console import read_serial_log, type_into_pty, wait_for_marker
from liverestore.hypervisor.qemu import NBD_RECONNECT_DELAY_S, create_overlay
from liverestore.hypervisor.vmspec import DiskSource, VmSpec, render_domain, restore_metadata

log = logging.getLogger("liverestore.libvirt")

DEFAULT_URI = "qemu:///system"
PIVOT_READY_WAIT_S = 30.0  # how long a copy libvirt calls "not ready for pivot yet" may take to become ready
# QEMU 7.2 (Debian 12) sometimes leaves a failed copy's filter node hanging on the disk's top node,
# and refuses every later copy of that disk with this
STALE_COPY_NODE = "Need a root block node"
SAVE_DIR = Path("/var/lib/libvirt/qemu/save")  # libvirt's own place for saved guests
T = TypeVar("T")


def libvirt_module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LiverestoreError("the libvirt Python binding is not installed (run ./setup.sh)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come back as exceptions
    return libvirt


def open_connection(uri: str = DEFAULT_URI) -> Any:
    lv = libvirt_module()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise LiverestoreError(f"cannot reach libvirt at {uri}: {libvirt_message(e)} (is libvirtd running?)") from None


def libvirt_reachable(uri: str = DEFAULT_URI) -> bool:
    try:
        open_connection(uri).close()
    except LiverestoreError:
        return False
    return True


def libvirt_message(e: Exception) -> str:
    text = e.get_error_message() if hasattr(e, "get_error_message") else str(e)
    return str(text).strip().splitlines()[0] if text else type(e).__name__


def _lookup(conn: Any, by: str, key: str) -> Any | None:
    lv = libvirt_module()
    try:
        return conn.lookupByName(key) if by == "name" else conn.lookupByUUIDString(key)
    except lv.libvirtError:
        return None


class LibvirtVM:
    kind = "libvirt"

    def __init__(self, workdir: Path, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self.workdir = workdir.absolute()
        self.serial_log = self.workdir / "serial.log"
        self.conn: Any = None
        self.dom: Any = None
        self.spec: VmSpec | None = None
        self.disks: list[DiskAttachment] = []
        self.destinations: dict[str, Path] = {}
        self.dest_format = "raw"
        self.nvram: Path | None = None
        self.restore_id = ""

    async def _call(self, fn: Any, *args: Any) -> Any:
        lv = libvirt_module()
        try:
            return await asyncio.to_thread(fn, *args)
        except lv.libvirtError as e:
            raise LiverestoreError(f"libvirt: {libvirt_message(e)}") from None

    def _conn(self) -> Any:
        if self.conn is None:
            self.conn = open_connection(self.uri)
        return self.conn

    # -- before anything starts ----------------------------------------------------------------
    def check(self, spec: VmSpec, destinations: dict[str, Path]) -> None:
        lv = libvirt_module()
        conn = self._conn()
        if _lookup(conn, "name", spec.name) is not None:
            raise LiverestoreError(f"a domain named {spec.name!r} already exists on {self.uri} "
                                   "(undefine it, or restore under another --name)")  # fmt: skip
        if spec.uuid and (other := _lookup(conn, "uuid", spec.uuid)) is not None:
            raise LiverestoreError(f"domain {other.name()!r} on {self.uri} already has UUID {spec.uuid} "
                                   "(restore under another --name to get a new UUID)")  # fmt: skip
        for nic in spec.nics:
            if nic.kind == "network":
                net = _lookup_network(conn, nic.source)
                if net is None:
                    raise LiverestoreError(f"network {nic.source!r} of {spec.name} does not exist on {self.uri} "
                                           "(map it with --network-map OLD=NEW, or --no-network)")  # fmt: skip
                if not net.isActive():
                    raise LiverestoreError(f"network {nic.source!r} is not active (virsh net-start "
                                           f"{nic.source}, or --network-map / --no-network)")  # fmt: skip
            elif nic.kind == "bridge" and not Path("/sys/class/net", nic.source).exists():
                raise LiverestoreError(f"bridge {nic.source!r} of {spec.name} does not exist on this host "
                                       "(map it with --network-map OLD=NEW, or --no-network)")  # fmt: skip
        try:
            conn.getDomainCapabilities(spec.emulator, spec.arch, spec.machine, spec.domain_type, 0)
        except lv.libvirtError as e:
            what = f"{spec.domain_type} {spec.arch} guests" + (f" of machine type {spec.machine}" if spec.machine else "")
            raise LiverestoreError(f"this host cannot run {what} ({libvirt_message(e)})") from None
        if spec.loader and not Path(spec.loader).exists():
            raise LiverestoreError(f"{spec.name} needs firmware {spec.loader}, which this host lacks")
        for path in destinations.values():
            if path.exists():
                raise LiverestoreError(f"{path} already exists; refusing to overwrite a disk (move it away first)")
        for path in destinations.values():
            check_reachable_by_qemu(path.parent)

    # -- lifecycle -----------------------------------------------------------------------------
    async def launch(self, spec: VmSpec, disks: list[DiskAttachment], nvram: Path | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log.unlink(missing_ok=True)
        self.spec, self.disks, self.nvram = spec, disks, nvram
        self.restore_id = f"{spec.name}-{time.time_ns()}"
        sources = {}
        for d in disks:
            if d.local_path is not None:
                ds = spec.disk(d.name)
                sources[d.name] = DiskSource(d.local_path, readonly=ds is not None and ds.device == "cdrom")
            else:
                assert d.overlay is not None
                create_overlay(d.overlay, d.size)
                sources[d.name] = DiskSource(d.overlay, "qcow2", d.nbd_host, d.nbd_port, d.export)
        xml = render_domain(spec, sources, nvram=nvram, serial_log=self.serial_log,
                            metadata={"id": self.restore_id, "workdir": str(self.workdir)})  # fmt: skip
        log.info("creating transient domain %s on %s", spec.name, self.uri)
        lv = libvirt_module()
        self.dom = await self._call(self._conn().createXML, xml, lv.VIR_DOMAIN_START_PAUSED)
        try:
            await self._arm_nbd_reconnect()
            await self._call(self.dom.resume)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call(self.dom.destroy)
            raise
        log.info("%s", self.describe())

    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A QMP command through libvirt's monitor passthrough (libvirt marks the domain tainted)."""
        import libvirt_qemu

        msg = json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
        reply = json.loads(await self._call(libvirt_qemu.qemuMonitorCommand, self.dom, msg, 0))
        if "error" in reply:
            raise LiverestoreError(f"QEMU refused {cmd}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def _arm_nbd_reconnect(self) -> None:
        """libvirt 9.0 cannot give an NBD disk a ``reconnect-delay`` (its ``<reconnect>`` came
        later), and without one QEMU fails every read for good the moment the agent restarts — so
        ``--resume`` could never work. Before the guest runs, each overlay's backing is swapped
        for an NBD node of our own that waits for the agent to come back."""
        nodes = await self._qmp("query-named-block-nodes", {"flat": True})
        for d in self._from_backup():
            # the qcow2 node's "file" is a json: description naming the overlay when it has a backing
            top = next((n for n in nodes if n["drv"] == "qcow2" and json.dumps(str(d.overlay)) in n["file"]), None)
            child = next((n for n in nodes if n["drv"] == "file" and n["file"] == str(d.overlay)), None)
            if top is None or child is None:
                raise LiverestoreError(f"cannot find the overlay of disk {d.name} in QEMU's block graph")
            await self._qmp("blockdev-add", {
                "driver": "nbd", "node-name": f"lr-src-{d.name}", "read-only": True, "export": d.export,
                "server": {"type": "inet", "host": d.nbd_host, "port": str(d.nbd_port)},
                "reconnect-delay": NBD_RECONNECT_DELAY_S,
            })  # fmt: skip
            await self._qmp("blockdev-add", {"driver": "raw", "node-name": f"lr-bak-{d.name}", "read-only": True,
                                             "file": f"lr-src-{d.name}"})  # fmt: skip
            await self._qmp("blockdev-reopen", {"options": [{
                "driver": "qcow2", "node-name": top["node-name"], "read-only": False,
                "file": child["node-name"], "backing": f"lr-bak-{d.name}",
            }]})  # fmt: skip

    async def _disarm_nbd_reconnect(self) -> None:
        """After the pivot our NBD nodes hang on nothing: delete them so the agent is let go."""
        for d in self._from_backup():
            for node in (f"lr-bak-{d.name}", f"lr-src-{d.name}"):
                try:
                    await self._qmp("blockdev-del", {"node-name": node})
                except LiverestoreError as e:
                    log.warning("could not remove node %s after the pivot: %s", node, e)

    @property
    def pid(self) -> int | None:
        if self.spec is None:
            return None
        try:
            return int(Path(f"/run/libvirt/qemu/{self.spec.name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        if self.dom is None:
            return False
        try:
            return bool(self.dom.isActive())
        except Exception:
            return False

    def describe(self) -> str:
        name = self.spec.name if self.spec else "?"
        uuid = self.dom.UUIDString() if self.dom is not None else "?"
        return f"libvirt domain {name} (uuid {uuid}) on {self.uri}: QEMU pid {self.pid}, serial log {self.serial_log}"

    def state(self) -> dict[str, Any]:
        assert self.spec is not None and self.dom is not None
        return {
            "uri": self.uri, "name": self.spec.name, "uuid": self.dom.UUIDString(), "restore_id": self.restore_id,
            "workdir": str(self.workdir), "dest_format": self.dest_format,
            "destinations": {n: str(p) for n, p in self.destinations.items()},
            "nvram": str(self.nvram) if self.nvram else None,
        }  # fmt: skip

    @classmethod
    def adopt(cls, st: dict[str, Any], spec: VmSpec, disks: list[DiskAttachment]) -> LibvirtVM:
        """Find the domain an earlier (dead) orchestrator started: same UUID *and* our marker."""
        vm = cls(Path(st["workdir"]), st["uri"])
        dom = _lookup(vm._conn(), "uuid", st["uuid"])
        if dom is None or not dom.isActive():
            raise LiverestoreError(f"domain {st['name']} of the interrupted restore is no longer running; "
                                   "start a new restore")  # fmt: skip
        marker = restore_metadata(dom.XMLDesc(0)) or {}
        if marker.get("id") != st["restore_id"]:
            raise LiverestoreError(f"domain {st['name']} is not the one this restore started; leaving it alone")
        vm.dom, vm.spec, vm.disks, vm.restore_id = dom, spec, disks, st["restore_id"]
        vm.destinations = {n: Path(p) for n, p in st.get("destinations", {}).items()}
        vm.dest_format = st.get("dest_format", "raw")
        vm.nvram = Path(st["nvram"]) if st.get("nvram") else None
        return vm

    async def connect(self) -> None:
        """``adopt`` already holds the domain: nothing more to attach."""

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = self.dom = None

    async def shutdown(self, timeout: float) -> bool:
        if self.running:
            with contextlib.suppress(LiverestoreError):
                await self._call(self.dom.shutdown)
        obeyed = await wait_until_stopped(lambda: self.running, timeout)
        if not obeyed:
            log.warning("domain %s did not shut down within %.0f s of the ACPI request; forcing it off",
                        self.spec.name if self.spec else "?", timeout)  # fmt: skip
            await self.stop()
        return obeyed

    async def stop(self, graceful_timeout: float = 0) -> None:
        """Destroy the domain (a transient one disappears; a persistent one stays defined)."""
        if not await wait_until_stopped(lambda: self.running, graceful_timeout):
            with contextlib.suppress(LiverestoreError):
                await self._call(self.dom.destroy)

    # -- console -------------------------------------------------------------------------------
    def serial_output(self) -> str:
        return read_serial_log(self.serial_log)

    async def wait_for_console(self, marker: str, timeout: float, start: int = 0) -> float:
        return await wait_for_marker(self.serial_log, marker, timeout, start, lambda: self.running)

    async def send_console(self, line: str) -> None:
        """Type a line into the guest's serial console through its pty."""
        xml = await self._call(self.dom.XMLDesc, 0)
        src = ET.fromstring(xml).find("devices/serial/source")
        pty = src.get("path") if src is not None else None
        if not pty:
            raise LiverestoreError("the domain has no pty serial console to type into")
        await asyncio.to_thread(type_into_pty, pty, line)

    async def guest_agent_ready(self) -> bool | None:
        if self.spec is None or not self.spec.has_guest_agent:
            return None
        try:
            import libvirt_qemu
        except ImportError:
            return None

        def ping() -> bool:
            try:
                libvirt_qemu.qemuAgentCommand(self.dom, '{"execute":"guest-ping"}', 1, 0)
            except Exception:
                return False
            return True

        return await asyncio.to_thread(ping)

    # -- relocation ----------------------------------------------------------------------------
    async def start_relocation(self, destinations: dict[str, Path], fmt: str = "raw") -> None:
        """A block copy per disk. One that QEMU refuses because an earlier, failed copy left its
        node behind (``STALE_COPY_NODE``) can never start in this QEMU process: the guest moves
        to a fresh one (``_fresh_process``), and the copies start there."""
        self.destinations, self.dest_format = dict(destinations), fmt
        try:
            await self._copy_each_disk()
        except LiverestoreError as e:
            if STALE_COPY_NODE not in str(e):
                raise
            await self.abort_relocation()  # the copies that did start; a saved guest has none
            self.destinations = dict(destinations)
            await self._fresh_process()
            await self._copy_each_disk()

    async def _copy_each_disk(self) -> None:
        lv = libvirt_module()
        for d in self._from_backup():
            dest = self.destinations[d.name]
            dest_xml = f"<disk type='file'><driver type='{self.dest_format}'/><source file='{dest}'/></disk>"
            await self._call(self.dom.blockCopy, d.name, dest_xml, None, lv.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)

    async def _fresh_process(self) -> None:
        """Move the running guest into a new QEMU process: libvirt saves its state (memory and
        devices; its disk writes are in the overlays) and starts it again from that, within
        seconds, as a migration would. The new process opens the disks anew, with none of the
        failed copy's nodes, so the relocation can start. Without this the restore would retry
        forever, the VM running from the backup. If the save fails, libvirt leaves the guest
        running; if the start from the saved state fails, the state is kept and the error says
        how to start it."""
        assert self.spec is not None
        lv = libvirt_module()
        parent = SAVE_DIR if SAVE_DIR.is_dir() else Path(tempfile.gettempdir())
        need = self.spec.memory_mib * 2**20 + 64 * 2**20
        if shutil.disk_usage(parent).free < need:
            raise LiverestoreError(f"{STALE_COPY_NODE}: QEMU kept a failed copy's node on a disk of {self.spec.name}, "
                                   f"and moving the guest to a fresh QEMU needs {need >> 20} MiB free in {parent} to "
                                   "save its memory")  # fmt: skip
        image = Path(tempfile.mkdtemp(prefix=f"liverestore-{self.spec.name}-", dir=parent)) / "guest.save"
        log.warning("%s: QEMU kept a failed copy's node on its disk and refuses a new copy; moving the guest to a "
                    "fresh QEMU process (its state saved in %s, a pause of a few seconds)", self.spec.name, image)  # fmt: skip
        uuid = self.dom.UUIDString()
        await self._call(self.dom.save, str(image))
        try:
            await self._call(self._conn().restoreFlags, str(image), None, lv.VIR_DOMAIN_SAVE_PAUSED)
        except LiverestoreError as e:
            raise LiverestoreError(f"{self.spec.name} was saved to {image} to move it to a fresh QEMU, and could not "
                                   f"start from it ({e}); 'virsh restore {image}' starts it again") from None  # fmt: skip
        self.dom = await self._call(self._conn().lookupByUUIDString, uuid)
        try:
            await self._arm_nbd_reconnect()
        except LiverestoreError as e:  # it reads the backup as libvirt opened it: no reconnect after an agent restart
            log.warning("%s: %s; it runs on, but cannot outlive a restart of the agent", self.spec.name, e)
        await self._call(self.dom.resume)
        shutil.rmtree(image.parent, ignore_errors=True)
        log.warning("%s runs again, in QEMU pid %s", self.spec.name, self.pid)

    def _from_backup(self) -> list[DiskAttachment]:
        """The disks served by the agent (through overlays): what block copy relocates."""
        return [d for d in self.disks if d.local_path is None]

    def relocation_targets(self) -> list[Path]:
        return [self.destinations[d.name] for d in self._from_backup() if d.name in self.destinations]

    async def relocation_progress(self, raise_on_failure: bool = True) -> list[JobProgress]:
        out = []
        for d in self._from_backup():
            info = await self._call(self.dom.blockJobInfo, d.name, 0)
            if not info:
                if raise_on_failure:
                    raise LiverestoreError(f"the block copy of disk {d.name} stopped (see libvirtd's log)")
                out.append(JobProgress(d.name, 0, 0, False, True))
                continue
            cur, end = int(info["cur"]), int(info["end"])
            out.append(JobProgress(d.name, cur, end, end > 0 and cur == end))  # libvirt: cur == end once ready
        return out

    async def pivot(self) -> None:
        assert self.spec is not None
        for d in self._from_backup():
            await self._pivot_disk(d.name)
        await self._disarm_nbd_reconnect()
        for d in self._from_backup():
            if d.overlay is not None:
                d.overlay.unlink(missing_ok=True)
        await self.persist()

    async def _pivot_disk(self, disk: str) -> None:
        """Pivot one disk's copy. ``blockJobInfo`` says cur == end from QEMU's own job state, but
        libvirt accepts the pivot only once it has handled QEMU's BLOCK_JOB_READY event, which on
        a loaded host comes a moment later ("not ready for pivot yet"): wait for it, briefly."""
        lv = libvirt_module()
        deadline = time.monotonic() + PIVOT_READY_WAIT_S
        while True:
            try:
                await self._call(self.dom.blockJobAbort, disk, lv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return
            except LiverestoreError as e:
                if "not ready for pivot" not in str(e) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def persist(self) -> None:
        """Define the domain persistently on its local disks (the running one becomes persistent)."""
        assert self.spec is not None
        sources = {d.name: DiskSource(self.destinations[d.name], self.dest_format) for d in self._from_backup()
                   if d.name in self.destinations}  # fmt: skip
        for d in self.disks:
            if d.local_path is not None:
                ds = self.spec.disk(d.name)
                sources[d.name] = DiskSource(d.local_path, readonly=ds is not None and ds.device == "cdrom")
        await self._call(self._conn().defineXML, render_domain(self.spec, sources, nvram=self.nvram))
        log.info("domain %s is defined on its local disks and keeps running", self.spec.name)

    async def paused_on_io_error(self) -> bool:
        lv = libvirt_module()
        if not self.running:
            return False
        state, reason = await self._call(self.dom.state)
        return bool(state == lv.VIR_DOMAIN_PAUSED and reason == lv.VIR_DOMAIN_PAUSED_IOERROR)

    async def resume_after_io_error(self) -> bool:
        if not await self.paused_on_io_error():
            return False
        await self._call(self.dom.resume)
        return True

    async def abort_relocation(self) -> None:
        for d in self._from_backup():
            with contextlib.suppress(LiverestoreError):
                await self._call(self.dom.blockJobAbort, d.name, 0)
        for path in self.destinations.values():
            path.unlink(missing_ok=True)


def check_reachable_by_qemu(directory: Path) -> None:
    """libvirt runs QEMU as an unprivileged user (libvirt-qemu on Debian): it relabels the disk
    files, not the directories above them, so each of those must let others search it."""
    for p in [directory, *directory.parents]:
        if p.exists() and not p.stat().st_mode & 0o001:
            raise LiverestoreError(f"libvirt's QEMU cannot reach {directory}: {p} is not searchable by others "
                                   f"(chmod o+x {p}, or choose another --dest)")  # fmt: skip


def _lookup_network(conn: Any, name: str) -> Any | None:
    lv = libvirt_module()
    try:
        return conn.networkLookupByName(name)
    except lv.libvirtError:
        return None
