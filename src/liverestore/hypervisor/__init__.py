"""Hypervisor drivers. QEMU over QMP today; the orchestrator only sees ``Hypervisor``."""

from liverestore.hypervisor.base import DiskAttachment, Hypervisor, JobProgress

__all__ = ["DiskAttachment", "Hypervisor", "JobProgress"]
