"""What VM to run: a hypervisor-neutral description read from a stored libvirt domain XML.

A restore point may carry the VM's libvirt definition (``libvirt-domain.xml``). Both drivers
launch *that* VM — its vCPUs, memory, machine type, firmware, disk buses and NICs — and the
libvirt driver keeps the definition itself, rewriting only what a restore must change: the disk
sources, and on request the name, UUID, MACs and networks. A bare-disk backup has no definition
and gets ``default_spec``.
"""

from __future__ import annotations

import random
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

from liverestore.errors import LiverestoreError

DOMAIN_CONFIG_NAME = "libvirt-domain.xml"
NVRAM_CONFIG_NAME = "nvram.fd"
METADATA_NS = "https://liverestore.dev/xmlns/restore/1"

_MEMORY_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
                 "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40}  # fmt: skip


@dataclass(frozen=True)
class DiskSpec:
    """One guest disk as the guest sees it: its target name (``vda``, ``sdb``) is also the name it
    is backed up under."""

    target: str
    bus: str = "virtio"
    device: str = "disk"  # disk | cdrom
    boot_order: int | None = None
    source: str | None = None  # the file it came from (backup side only)
    source_type: str = "file"


@dataclass(frozen=True)
class NicSpec:
    mac: str
    model: str = "virtio"
    kind: str = "network"  # network | bridge | user | direct | ...
    source: str = ""  # the network or bridge name


@dataclass(frozen=True)
class VmSpec:
    name: str
    uuid: str | None = None
    vcpus: int = 1
    memory_mib: int = 512
    machine: str | None = None
    arch: str = "x86_64"
    domain_type: str = "qemu"
    emulator: str | None = None
    loader: str | None = None
    loader_readonly: bool = True
    nvram: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    has_serial: bool = True
    has_guest_agent: bool = False
    domain_xml: str | None = field(default=None, repr=False)  # the libvirt definition, when there is one

    def disk(self, target: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.target == target), None)


def default_spec(name: str, disk_names: list[str], memory_mib: int = 512, vcpus: int = 1) -> VmSpec:
    """A bare-disk backup: one virtio disk per stored disk, the first one boots, no NIC."""
    disks = tuple(DiskSpec(target=n, boot_order=i + 1) for i, n in enumerate(disk_names))
    return VmSpec(name=name, vcpus=vcpus, memory_mib=memory_mib, disks=disks)


def _parse_xml(text: str) -> ET.Element:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise LiverestoreError(f"the stored domain XML is not valid XML: {e}") from None
    if root.tag != "domain":
        raise LiverestoreError(f"the stored configuration is a <{root.tag}>, not a libvirt <domain>")
    return root


def _memory_mib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 512
    unit = el.get("unit", "KiB").lower()
    if unit not in _MEMORY_UNITS:
        raise LiverestoreError(f"the domain's memory unit {unit!r} is unknown")
    return int(el.text or "0") * _MEMORY_UNITS[unit] // (1 << 20)


def parse_domain(xml: str) -> VmSpec:
    try:
        return _parse_domain(xml)
    except ValueError as e:  # a vCPU count, boot order or memory size that is not a number
        raise LiverestoreError(f"the stored domain XML holds an invalid number ({e})") from None


def _parse_domain(xml: str) -> VmSpec:
    root = _parse_xml(xml)
    name = (root.findtext("name") or "").strip()
    if not name:
        raise LiverestoreError("the stored domain XML has no <name>")
    os_el = root.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    loader = os_el.find("loader") if os_el is not None else None
    nvram = os_el.find("nvram") if os_el is not None else None
    devices = root.find("devices")
    disks, nics = [], []
    for d in devices.findall("disk") if devices is not None else []:
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        src = d.find("source")
        boot = d.find("boot")
        disks.append(DiskSpec(
            target=target.get("dev", ""), bus=target.get("bus", "virtio"), device=d.get("device", "disk"),
            boot_order=int(boot.get("order", "0")) or None if boot is not None else None,
            source=(src.get("file") or src.get("dev") or src.get("name")) if src is not None else None,
            source_type=d.get("type", "file"),
        ))  # fmt: skip
    for i in devices.findall("interface") if devices is not None else []:
        mac, model, src = i.find("mac"), i.find("model"), i.find("source")
        nics.append(NicSpec(
            mac=mac.get("address", "") if mac is not None else "",
            model=model.get("type", "virtio") if model is not None else "virtio",
            kind=i.get("type", "network"),
            source=(src.get("network") or src.get("bridge") or src.get("dev") or "") if src is not None else "",
        ))  # fmt: skip
    vcpu = root.findtext("vcpu")
    has_agent = any(
        (t := c.find("target")) is not None and t.get("name") == "org.qemu.guest_agent.0"
        for c in (devices.findall("channel") if devices is not None else [])
    )
    return VmSpec(
        name=name, uuid=(root.findtext("uuid") or "").strip() or None,
        vcpus=int(vcpu.strip()) if vcpu and vcpu.strip() else 1,
        memory_mib=_memory_mib(root.find("memory")),
        machine=type_el.get("machine") if type_el is not None else None,
        arch=type_el.get("arch", "x86_64") if type_el is not None else "x86_64",
        domain_type=root.get("type", "qemu"),
        emulator=(devices.findtext("emulator") or "").strip() or None if devices is not None else None,
        loader=(loader.text or "").strip() or None if loader is not None else None,
        loader_readonly=loader.get("readonly", "yes") == "yes" if loader is not None else True,
        nvram=(nvram.text or "").strip() or None if nvram is not None else None,
        disks=tuple(disks), nics=tuple(nics),
        has_serial=devices is not None and (devices.find("serial") is not None or devices.find("console") is not None),
        has_guest_agent=has_agent, domain_xml=xml,
    )  # fmt: skip


def random_mac(rnd: random.Random | None = None) -> str:
    r = rnd or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))


def retarget(
    spec: VmSpec, *, name: str | None = None, network_map: dict[str, str] | None = None, no_network: bool = False
) -> VmSpec:
    """The VM a restore will create: ``name`` (a new one gets a new UUID and new MACs, so it can
    run beside the original), networks renamed by ``network_map``, or no NICs at all."""
    network_map = network_map or {}
    new_identity = name is not None and name != spec.name
    nics = [] if no_network else list(spec.nics)
    if new_identity:
        nics = [replace(n, mac=random_mac()) for n in nics]
    nics = [replace(n, source=network_map.get(n.source, n.source)) if n.kind in ("network", "bridge") else n
            for n in nics]  # fmt: skip
    unknown = set(network_map) - {n.source for n in spec.nics}
    if unknown:
        raise LiverestoreError(f"--network-map names {sorted(unknown)[0]!r}, which no NIC of {spec.name} uses")
    out = replace(spec, name=name or spec.name, uuid=str(uuidlib.uuid4()) if new_identity else spec.uuid,
                  nics=tuple(nics))  # fmt: skip
    if spec.domain_xml is None:
        return out
    root = _parse_xml(spec.domain_xml)
    _set_text(root, "name", out.name)
    if new_identity:
        _set_text(root, "uuid", out.uuid or "")
    devices = root.find("devices")
    if devices is not None:
        ifaces = devices.findall("interface")
        for el in ifaces:
            devices.remove(el)
        kept = [] if no_network else ifaces
        for el, nic in zip(kept, nics, strict=True):
            mac = el.find("mac")
            if mac is None:
                mac = ET.SubElement(el, "mac")
            mac.set("address", nic.mac)
            src = el.find("source")
            if src is not None and nic.kind in ("network", "bridge"):
                src.set(nic.kind, nic.source)
            devices.append(el)
    return replace(out, domain_xml=ET.tostring(root, encoding="unicode"))


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(0 if tag == "name" else 1, el)
    el.text = text


@dataclass(frozen=True)
class DiskSource:
    """Where a guest disk reads from when the domain is rendered: a local file, or a qcow2 overlay
    whose backing store is an NBD export (guest writes stay in the overlay)."""

    path: Path
    fmt: str = "raw"
    nbd_host: str = ""
    nbd_port: int = 0
    nbd_export: str = ""
    readonly: bool = False


def render_domain(
    spec: VmSpec,
    sources: dict[str, DiskSource],
    *,
    nvram: Path | None = None,
    serial_log: Path | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """The libvirt XML of ``spec`` with every disk in ``sources`` pointed at its new source; disks
    not in ``sources`` (an empty CD-ROM tray) are kept as they are."""
    root = _parse_xml(spec.domain_xml or bare_domain_xml(spec))
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for disk in devices.findall("disk"):
        target = disk.find("target")
        src = sources.get(target.get("dev", "") if target is not None else "")
        if src is None:
            continue
        for child in [c for c in disk if c.tag in ("source", "driver", "backingStore")]:
            disk.remove(child)
        disk.set("type", "file")
        driver = ET.Element("driver", {"name": "qemu", "type": src.fmt})
        source = ET.Element("source", {"file": str(src.path)})
        new: list[ET.Element] = [driver, source]
        if src.nbd_export:
            backing = ET.Element("backingStore", {"type": "network"})
            ET.SubElement(backing, "format", {"type": "raw"})
            bsrc = ET.SubElement(backing, "source", {"protocol": "nbd", "name": src.nbd_export})
            ET.SubElement(bsrc, "host", {"name": src.nbd_host, "port": str(src.nbd_port)})
            new.append(backing)
        for i, el in enumerate(new):
            disk.insert(i, el)
        if src.readonly and disk.find("readonly") is None:
            ET.SubElement(disk, "readonly")
    os_el = root.find("os")
    if nvram is not None and os_el is not None and os_el.find("nvram") is not None:
        nv = os_el.find("nvram")
        assert nv is not None
        nv.text = str(nvram)
        nv.attrib.pop("template", None)
    if serial_log is not None:
        serial = devices.find("serial")
        if serial is None:
            serial = ET.SubElement(devices, "serial", {"type": "pty"})
            ET.SubElement(serial, "target", {"port": "0"})
        for old in serial.findall("log"):
            serial.remove(old)
        ET.SubElement(serial, "log", {"file": str(serial_log), "append": "off"})
    md = root.find("metadata")
    if md is not None:
        for el in md.findall(f"{{{METADATA_NS}}}restore"):
            md.remove(el)
    if metadata:
        if md is None:
            md = ET.SubElement(root, "metadata")
        ET.register_namespace("liverestore", METADATA_NS)
        entry = ET.SubElement(md, f"{{{METADATA_NS}}}restore", dict(sorted(metadata.items())))
        entry.text = None
    return ET.tostring(root, encoding="unicode")


def restore_metadata(xml: str) -> dict[str, str] | None:
    """The liverestore marker of a (running) domain, if it has one: proof that we started it."""
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{METADATA_NS}}}restore")
    return dict(el.attrib) if el is not None else None


def bare_domain_xml(spec: VmSpec) -> str:
    """A minimal libvirt definition for a VM known only by its disks (bare-disk backups)."""
    root = ET.Element("domain", {"type": spec.domain_type})
    ET.SubElement(root, "name").text = spec.name
    if spec.uuid:
        ET.SubElement(root, "uuid").text = spec.uuid
    ET.SubElement(root, "memory", {"unit": "MiB"}).text = str(spec.memory_mib)
    ET.SubElement(root, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", {"arch": spec.arch, **({"machine": spec.machine} if spec.machine else {})}).text = "hvm"
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(root, "devices")
    for d in spec.disks:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": d.device})
        ET.SubElement(disk, "target", {"dev": d.target, "bus": d.bus})
        if d.boot_order:
            ET.SubElement(disk, "boot", {"order": str(d.boot_order)})
    for n in spec.nics:
        iface = ET.SubElement(devices, "interface", {"type": n.kind})
        ET.SubElement(iface, "mac", {"address": n.mac})
        if n.source:
            ET.SubElement(iface, "source", {n.kind: n.source})
        ET.SubElement(iface, "model", {"type": n.model})
    serial = ET.SubElement(devices, "serial", {"type": "pty"})
    ET.SubElement(serial, "target", {"port": "0"})
    return ET.tostring(root, encoding="unicode")
