"""The CLI as an operator uses it: real processes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_disk

LR = [sys.executable, "-m", "liverestore"]


def lr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*LR, *args], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def assert_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_backup_list(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "web01-root.raw"
    make_disk(disk, 32 << 20)
    cfg = tmp_path / "web01.xml"
    cfg.write_text("<domain/>")
    lr("init", str(repo))
    first = lr("backup", "--repo", str(repo), "--vm", "web01", "--config", str(cfg), str(disk)).stdout.strip()
    second = lr("backup", "--repo", str(repo), "--vm", "web01", str(disk))
    assert "0.00 MiB new" in second.stderr
    doc = json.loads(lr("list", "--repo", str(repo), "--json").stdout)
    points = doc["vms"]["web01"]
    assert points[0]["id"] == first and len(points) == 2
    assert points[0]["disks"][0]["name"] == "web01-root" and points[0]["configs"] == ["web01.xml"]
    assert doc["dedup_ratio"] >= 2.0  # the same disk twice, stored once
    assert "VM web01" in lr("list", "--repo", str(repo)).stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list", "--repo", "/nonexistent/repo"], "does not exist"),
        (["init", "{tmp}/r", "--block-size", "3000"], "block size"),
        (["init", "{tmp}/r", "--block-size", "lots"], "invalid size"),
        (["backup", "--repo", "{tmp}/repo", "--vm", "x", "{tmp}/missing.raw"], "does not exist"),
        (["backup", "--repo", "{tmp}/repo", "--vm", "x", "{tmp}/notadisk.vmdk"], "only raw and qcow2"),
        (["serve", "--repo", "{tmp}/repo", "--vm", "ghost"], "has no backups"),
        (["serve", "--repo", "{tmp}/repo", "--vm", "vm1", "--point", "nope"], "does not exist"),
        (
            ["serve", "--repo", "{tmp}/repo", "--vm", "vm1", "--listen", "127.0.0.1:notaport"],
            "invalid address",
        ),
        (["status", "--control", "127.0.0.1:1"], "no agent answers"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    lr("init", str(tmp_path / "repo"))
    disk = tmp_path / "vm1.raw"
    make_disk(disk, 8 << 20)
    lr("backup", "--repo", str(tmp_path / "repo"), "--vm", "vm1", str(disk))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "notadisk.vmdk"), "8M"], check=True
    )
    r = lr(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
    assert_one_line_error(r, needle)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--accel", "bogus"), ("--memory", "0"), ("--memory", "-5"), ("--boot-window", "0"), ("--boot-quiet", "-1"),
     ("--shutdown-timeout", "-1"), ("--repo-latency-ms", "-1"), ("--repo-mbps", "-8")],
)  # fmt: skip
def test_bad_option_values_are_refused_before_anything_starts(tmp_path: Path, option: str, value: str) -> None:
    """A value QEMU or a boot check would choke on only later (``-m -5`` after launch, ``-m 0`` read
    as 128 MiB, a boot window of 0 s recorded as an empty profile run) fails at parse time:
    click's one line, exit 2, no destination made, no process started."""
    lr("init", str(tmp_path / "repo"))
    disk = tmp_path / "vm1.raw"
    make_disk(disk, 8 << 20)
    lr("backup", "--repo", str(tmp_path / "repo"), "--vm", "vm1", str(disk))
    dest = tmp_path / "primary"
    r = lr("restore", "--repo", str(tmp_path / "repo"), "--vm", "vm1", "--dest", str(dest), "--hypervisor", "qemu",
           "--cache-dir", str(tmp_path / "cache"), option, value, check=False)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and f"Invalid value for '{option}'" in errors[0], r.stderr
    assert not dest.exists() and not (tmp_path / "cache").exists()
    assert subprocess.run(["pgrep", "-f", str(dest)], capture_output=True).returncode == 1


def test_s3_repository_without_credentials_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_ENDPOINT_URL="http://127.0.0.1:1")  # no ~/.aws, nothing reached
    r = subprocess.run([*LR, "list", "--repo", "s3://lrbucket/p"], capture_output=True, text=True, timeout=60,
                       env=env)  # fmt: skip
    assert_one_line_error(r, "no S3 credentials for s3://lrbucket/p: set AWS_ACCESS_KEY_ID")


def test_demo_checks_its_block_size_before_building_the_vm(tmp_path: Path) -> None:
    r = lr("demo", "--hypervisor", "qemu", "--data-dir", str(tmp_path / "d"), "--block-size", "5K", check=False)
    assert_one_line_error(r, "block size 5120 is invalid")
    assert not (tmp_path / "d").exists()  # nothing built, nothing cleared


def test_serve_status_and_port_in_use(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "vm1.raw"
    content = make_disk(disk, 16 << 20)
    lr("init", str(repo))
    lr("backup", "--repo", str(repo), "--vm", "vm1", str(disk))
    port = free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            *LR,
            "serve",
            "--repo",
            str(repo),
            "--vm",
            "vm1",
            "--listen",
            f"127.0.0.1:{port}",
            "--control",
            f"127.0.0.1:{port + 1}" if port < 65535 else "127.0.0.1:0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        assert "serving nbd://" in proc.stderr.readline()
        out = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/vm1/vm1", str(out)], check=True, timeout=60)
        assert out.read_bytes() == content
        st = json.loads(lr("status", "--control", f"127.0.0.1:{port + 1}").stdout)
        assert st["metrics"]["blocks_fetched"] > 0 and st["scheduler"]["mode"] == "demand-first"
        busy = lr(
            "serve",
            "--repo",
            str(repo),
            "--vm",
            "vm1",
            "--listen",
            f"127.0.0.1:{port}",
            "--cache-dir",
            str(tmp_path / "cache2"),
            check=False,
        )
        assert_one_line_error(busy, "cannot listen")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"bytes_fetched"' in err  # counters printed on exit
    time.sleep(0)
