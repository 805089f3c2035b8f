"""A real libvirtd for the tests: used when one answers, else started here and stopped by pid.

Also: an isolated libvirt network (no DHCP, so no dnsmasq) for the test domains' NICs, a work
directory the ``libvirt-qemu`` user can traverse (pytest's own is 0700), and domain clean-up.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from liverestore.hypervisor.console import type_into_pty

URI = "qemu:///system"
NETWORK = "lrtest"


def virsh(*args: str, check: bool = True) -> str:
    r = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def _answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """The URI of a running libvirtd; one started here is stopped at the end (only that one)."""
    if shutil.which("libvirtd") is None:
        pytest.fail("libvirtd is not installed: run ./setup.sh")
    started: list[int] = []
    if not _answers():
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            subprocess.run([daemon, "-d", "--pid-file", pidfile], check=True, timeout=30)
            deadline = time.monotonic() + 15
            while not Path(pidfile).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            started.append(int(Path(pidfile).read_text().strip()))
        deadline = time.monotonic() + 30
        while not _answers():
            if time.monotonic() > deadline:
                pytest.fail("libvirtd did not answer within 30 s of starting")
            time.sleep(0.2)
    yield URI
    for pid in reversed(started):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


@pytest.fixture(scope="session")
def lrnet(libvirtd: str) -> Iterator[str]:
    """An isolated network (a bridge, no IP, no DHCP) for the test domains' NICs."""
    created = False
    if NETWORK not in virsh("net-list", "--all", "--name").split():
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
            f.write(f"<network><name>{NETWORK}</name><bridge name='lrtest0' stp='off'/></network>")
            f.flush()
            virsh("net-define", f.name)
        created = True
    if NETWORK not in virsh("net-list", "--name").split():
        virsh("net-start", NETWORK)
    yield NETWORK
    if created:
        virsh("net-destroy", NETWORK, check=False)
        virsh("net-undefine", NETWORK, check=False)


@pytest.fixture
def vmdir() -> Iterator[Path]:
    """A directory libvirt's QEMU (user libvirt-qemu) can reach: disks, overlays, destinations."""
    base = Path("/var/tmp/liverestore-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=base))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def domains(libvirtd: str) -> Iterator[list[str]]:
    """Names of domains a test creates; each is destroyed and undefined afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        virsh("destroy", n, check=False)
        virsh("undefine", n, "--nvram", "--checkpoints-metadata", check=False)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def domain_state(name: str) -> str:
    r = subprocess.run(["virsh", "-c", URI, "domstate", name], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else "absent"


def read_console_until(name: str, marker: str, timeout: float) -> str:
    """Read a running domain's pty serial console until ``marker`` shows (no log file needed)."""
    xml = virsh("dumpxml", name)
    pty = xml.split("<source path='", 1)[1].split("'", 1)[0]
    fd = os.open(pty, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while marker.encode() not in out:
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker} did not appear on {name}'s console; got {out[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    out += os.read(fd, 65536)
    finally:
        os.close(fd)
    return out.decode(errors="replace")


def type_into_console(name: str, line: str) -> None:
    """Type a line into a running domain's pty serial console."""
    xml = virsh("dumpxml", name)
    type_into_pty(xml.split("<source path='", 1)[1].split("'", 1)[0], line)


def wait_for_log(log: Path, marker: str, timeout: float) -> str:
    """The serial log once ``marker`` is in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{marker} did not appear in {log}; last: {text[-400:]!r}")
        time.sleep(0.2)
