"""Booting the test VM from a local copy: the floor an instant restore's time-to-boot is held to."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from liverestore.hypervisor.base import DiskAttachment
from liverestore.hypervisor.qemu import QemuVM
from liverestore.hypervisor.vmspec import default_spec
from liverestore.testvm.builder import MARKER_BOOT


async def boot_local_copy(image: Path, workdir: Path, timeout: float = 600) -> float:
    """Seconds from launch to the boot marker, booting a sparse copy (the image stays pristine)."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / "local.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    vm = QemuVM(workdir / "localvm")
    t0 = time.monotonic()
    await vm.launch(default_spec("localboot", ["boot"]),
                    [DiskAttachment(name="boot", size=copy.stat().st_size, local_path=copy)])  # fmt: skip
    try:
        return await vm.wait_for_console(MARKER_BOOT, timeout) - t0
    finally:
        await vm.stop()
        copy.unlink()
