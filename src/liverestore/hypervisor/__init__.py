"""Hypervisor drivers behind one interface; the orchestrator only sees ``Hypervisor``.

``open_hypervisor`` is the one place that maps a choice (``auto``, ``qemu``, ``libvirt[:URI]``)
to a driver, and ``adopt_hypervisor`` the one place that finds a running VM again from a restore's
saved state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liverestore.errors import LiverestoreError
from liverestore.hypervisor.base import DiskAttachment, Hypervisor, JobProgress
from liverestore.hypervisor.vmspec import VmSpec

__all__ = ["DiskAttachment", "Hypervisor", "JobProgress", "adopt_hypervisor", "open_hypervisor",
           "resolve_choice"]  # fmt: skip


def resolve_choice(choice: str, spec: VmSpec) -> tuple[str, str]:
    """(driver, libvirt URI). ``auto``: libvirt when the point holds a libvirt definition and
    libvirt answers, else plain QEMU."""
    from liverestore.hypervisor.libvirt_driver import DEFAULT_URI, libvirt_reachable

    kind, _, uri = choice.partition(":")
    uri = uri or DEFAULT_URI
    if kind == "auto":
        if spec.domain_xml is not None and libvirt_reachable(uri):
            return "libvirt", uri
        return "qemu", ""
    if kind not in ("qemu", "libvirt"):
        raise LiverestoreError(f"unknown hypervisor {choice!r}: use auto, qemu or libvirt[:URI]")
    return kind, uri if kind == "libvirt" else ""


def open_hypervisor(kind: str, uri: str, workdir: Path, accel: str = "tcg") -> Hypervisor:
    if kind == "libvirt":
        from liverestore.hypervisor.libvirt_driver import LibvirtVM

        return LibvirtVM(workdir, uri)
    from liverestore.hypervisor.qemu import QemuVM

    return QemuVM(workdir, accel=accel)


def adopt_hypervisor(kind: str, state: dict[str, Any], spec: VmSpec, disks: list[DiskAttachment]) -> Hypervisor:
    if kind == "libvirt":
        from liverestore.hypervisor.libvirt_driver import LibvirtVM

        return LibvirtVM.adopt(state, spec, disks)
    from liverestore.hypervisor.qemu import QemuVM

    return QemuVM.adopt(state, spec, disks)
