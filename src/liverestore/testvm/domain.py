"""A libvirt definition for the test VM, as an operator would write it: the demo, tests and
benchmarks define it, back it up with ``backup --libvirt``, and restore it."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr


def make_domain_xml(
    name: str,
    boot_disk: Path,
    data_disk: Path | None = None,
    *,
    vcpus: int = 2,
    memory_mib: int = 768,
    network: str | None = None,
    mac: str = "52:54:00:4c:52:01",
) -> str:
    """BIOS boot from ``vda`` (virtio); an optional SATA data disk ``sda``; a virtio NIC on
    ``network``; a pty serial console the guest prints its markers on; reboot stays a reboot."""
    data = "" if data_disk is None else f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(data_disk))}/>
      <target dev='sda' bus='sata'/>
    </disk>"""
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
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(boot_disk))}/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>{data}{nic}
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"""
