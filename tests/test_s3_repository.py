"""The repository on a real S3 server (SeaweedFS): every command works on it, a second machine
with only the URL and credentials sees and restores the same points, damage is named, and an
outage of the server makes reads wait — then resume with the right bytes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from liverestore.agent.agent import AgentConfig
from liverestore.backup import run_backup
from liverestore.repository import Repository
from tests.helpers import AgentThread, MiB, make_disk
from tests.nbdclient import NbdClient
from tests.s3fixtures import BUCKET, SeaweedFS
from tests.vmfixtures import VmBackup


def lr(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI as another machine would run it: its own data dir (catalog cache, read-cache)."""
    env = {**os.environ, "XDG_DATA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def _url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def test_every_command_works_on_s3_and_a_second_machine_sees_the_same(
    s3: SeaweedFS, tmp_path: Path
) -> None:
    url = _url()
    content = make_disk(tmp_path / "disk0.raw", 16 * MiB)
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    assert lr("init", url, "--block-size", "64K", home=a).returncode == 0
    r = lr("backup", "--repo", url, "--vm", "vm1", str(tmp_path / "disk0.raw"), home=a)
    assert r.returncode == 0, r.stderr
    point_id = r.stdout.strip()
    doc = json.loads(lr("list", "--repo", url, "--json", home=b).stdout)  # host b: empty catalog
    assert [p["id"] for p in doc["vms"]["vm1"]] == [point_id] and doc["repository"] == url
    assert lr("verify", "--repo", url, home=b).returncode == 0

    # host b serves the point over NBD from its own fresh cache: byte for byte the disk
    repo = Repository.open(url)
    _served_equals(repo, b / "cache", content)

    # a second backup from another process at the same time: both points commit
    make_disk(tmp_path / "disk1.raw", 8 * MiB, seed=5)
    procs = [subprocess.Popen([sys.executable, "-m", "liverestore", "backup", "--repo", url, "--vm", vm,
                               str(tmp_path / disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "XDG_DATA_HOME": str(home)})
             for vm, disk, home in (("vm1", "disk0.raw", a), ("vm2", "disk1.raw", b))]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    doc = json.loads(lr("list", "--repo", url, "--json", home=tmp_path / "host-c").stdout)
    assert len(doc["vms"]["vm1"]) == 2 and len(doc["vms"]["vm2"]) == 1

    # damage in the bucket is named by verify, never served
    client = s3.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    victim = next(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/packs/")["Contents"])
    body = bytearray(client.get_object(Bucket=BUCKET, Key=victim)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=victim, Body=bytes(body))
    r = lr("verify", "--repo", url, home=b)
    assert r.returncode == 1 and victim.rsplit("/", 1)[1] in r.stderr, r.stderr

    bad = lr("list", "--repo", f"s3://{BUCKET}/no-such-repo", home=b)
    assert bad.returncode == 1 and "not a liverestore repository" in bad.stderr and "Traceback" not in bad.stderr


def test_an_s3_outage_makes_reads_wait_then_resume_with_the_right_bytes(
    s3: SeaweedFS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    content = make_disk(tmp_path / "disk0.raw", 16 * MiB)
    repo = Repository.init(_url(), 64 * 1024)
    point, _ = run_backup(repo, "vm1", [tmp_path / "disk0.raw"], [])
    agent = AgentThread(repo, point, AgentConfig(cache_dir=tmp_path / "cache"))
    got: dict[str, bytes] = {}
    try:
        c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
        assert c.read(0, 64 * 1024) == content[: 64 * 1024]
        s3.kill()  # the object store goes away mid-restore
        reader = threading.Thread(target=lambda: got.setdefault("data", c.read(1 * MiB, 3 * MiB)))
        reader.start()
        time.sleep(3)
        assert reader.is_alive(), "reads must wait for the store, not fail"
        assert agent.run(agent.agent.status)["repository"]["available"] is False
        s3.start()  # back, on the same data
        reader.join(120)
        assert not reader.is_alive()
        assert got["data"] == content[1 * MiB : 4 * MiB]
        c.close()
    finally:
        agent.close()
        if s3.proc is None:
            s3.start()
    messages = [r.getMessage() for r in caplog.records]
    assert any("repository unavailable" in m for m in messages)
    assert any("repository is back" in m for m in messages)


def test_instant_restore_from_s3_by_a_second_machine(s3: SeaweedFS, vm_backup: VmBackup, tmp_path: Path) -> None:
    """The test VM backed up to S3 by host a; host b, with only the URL, restores it: boots
    (the guest checks its files), relocates, pivots; the data disk comes back bit for bit."""
    url = _url()
    repo = Repository.init(url, 64 * 1024)
    run_backup(repo, "testvm", [vm_backup.image.path, vm_backup.data_disk], [])
    repo.close()
    r = lr("restore", "--repo", url, "--vm", "testvm", "--dest", str(tmp_path / "primary"), "--hypervisor", "qemu",
           "--boot-marker", "BOOT-OK", "--stop-after", "--shutdown-timeout", "30", "--json",
           home=tmp_path / "host-b")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["relocated"] and doc["time_to_boot_s"] > 0
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(vm_backup.data_disk),
                          doc["destinations"]["data"]], capture_output=True, text=True)  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    serial = Path(doc["serial_log"]).read_text()
    assert "BOOT-OK" in serial and "ACPI-POWERDOWN" in serial


def test_encrypted_repository_on_s3(s3: SeaweedFS, tmp_path: Path) -> None:
    """Encryption sits above the backend: the same sealed objects in a bucket, and a second host
    needs the passphrase, not a local key file."""
    url = _url()
    content = make_disk(tmp_path / "disk0.raw", 16 * MiB)
    pw = tmp_path / "pw"
    pw.write_text("s3 passphrase for the test")
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    assert lr("--password-file", str(pw), "init", url, "--block-size", "64K", "--encrypt", home=a).returncode == 0
    r = lr("--password-file", str(pw), "backup", "--repo", url, "--vm", "vm1", str(tmp_path / "disk0.raw"), home=a)
    assert r.returncode == 0, r.stderr
    assert "is encrypted: give its passphrase" in lr("list", "--repo", url, home=b).stderr
    r = lr("--password-file", str(pw), "verify", "--repo", url, home=b)
    assert r.returncode == 0, r.stdout + r.stderr
    repo = Repository(url, "s3 passphrase for the test")
    _served_equals(repo, b / "cache", content)
    repo.close()


def _served_equals(repo: Repository, cache: Path, content: bytes) -> None:
    """The latest point of vm1, served over NBD from a fresh cache, is ``content`` byte for byte."""
    agent = AgentThread(repo, repo.get_point("vm1"), AgentConfig(cache_dir=cache))
    try:
        c = NbdClient("127.0.0.1", agent.port, "vm1/disk0")
        assert c.read(0, len(content)) == content
        c.close()
    finally:
        agent.close()


def test_forget_and_prune_on_s3(s3: SeaweedFS, tmp_path: Path) -> None:
    url = _url()
    home = tmp_path / "host"
    assert lr("init", url, "--block-size", "64K", home=home).returncode == 0
    for seed in (1, 2, 3):
        content = make_disk(tmp_path / "disk0.raw", 8 * MiB, seed=seed)
        assert lr("backup", "--repo", url, "--vm", "vm1", str(tmp_path / "disk0.raw"), home=home).returncode == 0
    r = lr("forget", "--repo", url, "--vm", "vm1", "--keep-last", "1", "--apply", home=home)
    assert r.returncode == 0 and r.stdout.count("forgot") == 2, r.stdout + r.stderr
    r = lr("prune", "--repo", url, home=home)
    assert r.returncode == 0 and "deleted 0 chunk" not in r.stdout, r.stdout + r.stderr
    assert "deleted 0 chunk" in lr("prune", "--repo", url, home=home).stdout  # nothing left to free
    assert lr("verify", "--repo", url, home=home).returncode == 0
    repo = Repository.open(url)
    try:
        _served_equals(repo, home / "cache", content)
    finally:
        repo.close()


def test_a_lost_index_on_s3_is_rebuilt_from_the_packs_trailers(s3: SeaweedFS, tmp_path: Path) -> None:
    """A lifecycle rule or a hand deleted the index objects: the packs' trailers are read with
    ranged GETs, the index is written again, and the point is served whole."""
    url = _url()
    home = tmp_path / "host"
    assert lr("init", url, "--block-size", "64K", home=home).returncode == 0
    content = make_disk(tmp_path / "disk0.raw", 24 * MiB, seed=5)
    assert lr("backup", "--repo", url, "--vm", "vm1", str(tmp_path / "disk0.raw"), home=home).returncode == 0
    client = s3.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    lost = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/index/")["Contents"]]
    for key in lost:
        client.delete_object(Bucket=BUCKET, Key=key)
    assert lr("verify", "--repo", url, home=tmp_path / "other").returncode == 1
    r = lr("repair-index", "--repo", url, home=home)
    assert r.returncode == 0 and r.stdout.startswith("indexed ") and "indexed 0 pack" not in r.stdout, r.stderr
    assert lr("verify", "--repo", url, home=tmp_path / "other").returncode == 0
    repo = Repository.open(url)
    try:
        _served_equals(repo, home / "cache", content)
    finally:
        repo.close()


def test_s3_reads_sort_their_failures_as_the_repository_expects(s3: SeaweedFS) -> None:
    """The read path (obstore) sorts what goes wrong the way the boto3 calls do: a missing object
    is missing, a missing bucket is named, a range past the end comes back short (for the chunk
    checks to call damage), and a store that is away is unavailable, which the agent retries."""
    from liverestore.errors import RepositoryError, RepositoryUnavailable
    from liverestore.repository.backend import Handle, ObjectMissing, open_backend

    backend = open_backend(_url())
    h = Handle("packs", "ab" * 32)
    backend.save(h, b"0123456789")
    assert backend.load(h) == b"0123456789"
    assert backend.load(h, 3, 4) == b"3456" and backend.load(h, 7) == b"789"
    assert backend.load(h, 6, 100) == b"6789", "a range past the end comes back short, not padded"
    with pytest.raises(ObjectMissing, match="is missing from"):
        backend.load(Handle("packs", "cd" * 32), 0, 4)
    with pytest.raises(RepositoryError, match="bucket nosuchbucket does not exist"):
        open_backend("s3://nosuchbucket/x").load(h, 0, 4)
    s3.kill()
    try:
        t0 = time.monotonic()
        with pytest.raises(RepositoryUnavailable, match=r"packs/abab.* in s3://"):
            backend.load(h, 0, 4)
        assert time.monotonic() - t0 < 15, "one retry, not the client's own long outage handling"
    finally:
        s3.start()
    assert backend.load(h, 0, 4) == b"0123", "the store is back: so are its reads"
