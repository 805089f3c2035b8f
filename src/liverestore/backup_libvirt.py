"""Backing up a libvirt domain: its definition, its file-backed disks by target, its NVRAM.

The domain's inactive XML becomes the point's ``libvirt-domain.xml``: a restore launches that VM,
not a stand-in. Each disk is stored under its target name (``vda``, ``sdb``), so the definition
and the disks meet again by name. Only a shut-off domain is read here (its files are not
changing underneath); a running one is backed up live (``liverestore.livebackup``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.libvirt_driver import libvirt_module, open_connection
from liverestore.hypervisor.vmspec import DOMAIN_CONFIG_NAME, NVRAM_CONFIG_NAME, parse_domain


@dataclass(frozen=True)
class DomainBackupPlan:
    vm: str
    disk_names: list[str]
    disk_paths: list[Path]
    configs: dict[str, bytes]
    skipped: list[str]  # what is deliberately not stored, for the operator to see


def find_domain(conn: Any, uri: str, domain: str) -> Any:
    """The domain named ``domain``; one line naming the ones that exist when it does not."""
    lv = libvirt_module()
    try:
        return conn.lookupByName(domain)
    except lv.libvirtError:
        known = ", ".join(sorted(d.name() for d in conn.listAllDomains(0))) or "none"
        raise LiverestoreError(f"no domain {domain!r} on {uri} (domains: {known})") from None


def plan_domain_backup(uri: str, domain: str) -> DomainBackupPlan:
    lv = libvirt_module()
    conn = open_connection(uri)
    try:
        dom = find_domain(conn, uri, domain)
        if dom.isActive():  # it started after the caller chose the offline path
            raise LiverestoreError(f"domain {domain} started while its backup was being planned: run the "
                                   "backup again (a running domain is backed up live)")  # fmt: skip
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    spec = parse_domain(xml)
    names, paths, skipped = [], [], []
    for d in spec.disks:
        if d.source is None:
            skipped.append(f"{d.target} (empty {d.device})")
            continue
        if d.source_type != "file":
            raise LiverestoreError(f"disk {d.target} of {domain} is a {d.source_type} disk ({d.source}); "
                                   "only file-backed disks can be backed up")  # fmt: skip
        if not Path(d.source).is_file():
            raise LiverestoreError(f"disk {d.target} of {domain}: {d.source} does not exist")
        names.append(d.target)
        paths.append(Path(d.source))
    if not paths:
        raise LiverestoreError(f"domain {domain} has no file-backed disks to back up")
    configs = {DOMAIN_CONFIG_NAME: xml.encode()}
    if spec.nvram:
        nvram = Path(spec.nvram)
        if not nvram.is_file():
            raise LiverestoreError(f"the NVRAM of {domain} ({nvram}) does not exist; boot it once or remove it")
        configs[NVRAM_CONFIG_NAME] = nvram.read_bytes()
    return DomainBackupPlan(spec.name, names, paths, configs, skipped)
