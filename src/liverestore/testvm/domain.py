"""A libvirt definition for the test VM, as an operator would write it: the demo, tests and
benchmarks define it, back it up with ``backup --libvirt``, and restore it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr


def _format_of(path: Path) -> str:
    """The driver type an operator would write: the file name says what the image holds."""
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def make_domain_xml(
    name: str,
    boot_disk: Path,
    data_disk: Path | None = None,
    *,
    more_disks: Sequence[Path] = (),
    vcpus: int = 2,
    memory_mib: int = 768,
    network: str | None = None,
    mac: str = "52:54:00:4c:52:01",
    serial_log: Path | None = None,
    data_bus: str = "sata",
    cdrom: Path | None = None,
) -> str:
    """BIOS boot from ``vda`` (virtio); optional SATA data disks ``sda`` (``data_disk``), ``sdb``,
    ... (``more_disks``), each raw or qcow2 by its suffix (on ``data_bus="virtio"``: ``vdb``, ...); a virtio NIC on ``network``; a pty
    serial console the guest prints its markers on (also logged to ``serial_log``); reboot stays
    a reboot. ``cdrom``: an ISO as IDE ``hdc``."""
    data = ""
    for i, disk in enumerate([*([data_disk] if data_disk is not None else []), *more_disks]):
        data += f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{_format_of(disk)}'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='{"vd" if data_bus == "virtio" else "sd"}{chr(ord("b" if data_bus == "virtio" else "a") + i)}' bus='{data_bus}'/>
    </disk>"""
    if cdrom is not None:  # read-only media on IDE, as installer and cloud-init images come
        data += f"""
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(cdrom))}/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>"""
    log = "" if serial_log is None else f"\n      <log file={quoteattr(str(serial_log))} append='off'/>"
    nic = "" if network is None else f"""
    <interface type='network'>
      <mac address='{mac}'/>
      <source network={quoteattr(network)}/>
      <model type='virtio'/>
    </interface>"""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{_format_of(boot_disk)}'/>
      <source file={quoteattr(str(boot_disk))}/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>{data}{nic}
    <serial type='pty'>{log}
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"""
