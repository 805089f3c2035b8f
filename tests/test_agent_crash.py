"""kill -9 of the media agent while a real guest runs from it: restart it on the same cache and
port, QEMU's NBD client reconnects, the guest survives and re-verifies every file."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from liverestore.hypervisor.base import DiskAttachment
from liverestore.hypervisor.qemu import QemuVM
from liverestore.hypervisor.vmspec import default_spec
from tests.vmfixtures import VmBackup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(vm_backup: VmBackup, port: int, cache: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverestore", "serve", "--repo", str(vm_backup.repo_path), "--vm", "testvm",
         "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{port + 1}", "--cache-dir", str(cache),
         "--repo-latency-ms", "2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving nbd://" in line, line + proc.stderr.read()
    return proc


def _status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/status", timeout=5) as r:
        return dict(json.loads(r.read()))


def test_guest_survives_agent_kill9(vm_backup: VmBackup, tmp_path: Path) -> None:
    port = _free_port()
    cache = tmp_path / "cache"
    agent = _serve(vm_backup, port, cache)
    img = vm_backup.image
    disks = [
        DiskAttachment(name="testvm", size=img.size, nbd_host="127.0.0.1", nbd_port=port, export="testvm/testvm",
                       overlay=tmp_path / "vm" / "testvm.qcow2"),
        DiskAttachment(name="data", size=vm_backup.data_disk.stat().st_size, nbd_host="127.0.0.1", nbd_port=port,
                       export="testvm/data", overlay=tmp_path / "vm" / "data.qcow2"),
    ]  # fmt: skip

    async def go() -> str:
        nonlocal agent
        vm = QemuVM(tmp_path / "vm")
        await vm.launch(default_spec("testvm", [d.name for d in disks]), disks)
        try:
            await vm.wait_for_console("BOOT-OK", 300)
            before = _status(port)
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            await asyncio.sleep(1.0)  # the guest keeps running; QEMU holds its I/O and retries
            agent = _serve(vm_backup, port, cache)
            mark = len(vm.serial_output())
            await vm.send_console("verify")  # drops the guest's page cache: every file re-read over NBD
            await vm.wait_for_console("VERIFY-OK", 180, start=mark)
            after = _status(port)
            await vm.send_console("halt")
            await vm.wait_for_console("HALTED", 60, start=mark)
            await vm.stop(graceful_timeout=20)
            m0, m1 = before["metrics"], after["metrics"]
            assert isinstance(m0, dict) and isinstance(m1, dict)
            # the restarted agent found its cache: most of the re-read came from it. The bitmap is saved
            # every second, so blocks fetched in the last second before the kill are fetched again.
            assert m1["reads"] > 100 and m1["blocks_fetched"] < m0["blocks_fetched"] / 2, (m0, m1)
            return vm.serial_output()
        finally:
            await vm.stop()

    try:
        serial = asyncio.run(go())
        assert "VERIFY-FAIL" not in serial
        # cache bitmap and cache file agree: the export is still block-identical to the source
        uri = f"nbd://127.0.0.1:{port}/testvm/testvm"
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img.path), uri],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        agent.send_signal(signal.SIGINT)
        agent.wait(30)
        time.sleep(0)
