"""The README's main command, ``liverestore demo``, run as a new user would (plain QEMU here; the
libvirt domain it leaves behind under libvirt is covered by the libvirt restore tests): it exits
0, both restores re-verify every file from the relocated disk, the profile's speed-up is printed,
and no VM of its own is left running, since plain QEMU has nothing that would manage one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _vms_naming(text: str) -> list[str]:
    """QEMU processes whose command line names ``text`` (the demo's data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and text in cmdline:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def test_the_demo_runs_end_to_end_and_leaves_no_vm_behind(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "liverestore", "demo", "--hypervisor", "qemu", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=540, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("guest re-verified all files from the relocated disk: VERIFY-OK") == 2, r.stderr[-3000:]
    assert "time-to-boot speed-up from the profile:" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    assert "[5/5] the VM was stopped" in r.stderr
    left = _vms_naming(str(data))
    for line in left:  # do not leave it to the next test either
        os.kill(int(line.split(":")[0]), 9)
    assert not left, f"the demo left its VM running: {left}"
