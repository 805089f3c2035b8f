"""NBD over TLS (x509, client certificates verified) on a real ``liverestore serve``, checked by
clients nobody here wrote: nbdinfo and nbdcopy (libnbd, GnuTLS) and qemu-img (QEMU's TLS); and
the control endpoint's token."""

from __future__ import annotations

import json
import re
import secrets
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from liverestore.agent.nbd import protocol as p
from liverestore.repository import Repository, RestorePoint
from tests.tlsfixtures import Credentials, make_credentials
from tests.vmfixtures import VmBackup


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@dataclass
class TlsAgent:
    port: int
    creds: Credentials

    def uri(self, certs: Path | None) -> str:
        query = f"?tls-certificates={certs}" if certs else ""
        return f"nbds://127.0.0.1:{self.port}/vm1/disk0{query}"


def _serve(repo: Repository, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "liverestore", "serve", "--repo", str(repo.root), "--vm", "vm1",
                             "--cache-dir", str(tmp_path / "cache"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture
def tls_agent(repo: Repository, point: RestorePoint, tmp_path: Path) -> Iterator[TlsAgent]:
    creds = make_credentials(tmp_path / "pki")
    proc = _serve(repo, tmp_path, "--listen", "127.0.0.1:0", "--tls-creds", str(creds.server))
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"serving nbds://127\.0\.0\.1:(\d+)/", line)
    assert m, line + proc.stderr.read()
    try:
        yield TlsAgent(int(m.group(1)), creds)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _qemu_img_compare(raw: Path, agent: TlsAgent, creds_dir: Path) -> subprocess.CompletedProcess[str]:
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={agent.port},export=vm1/disk0,tls-creds=tls0"
    return run("qemu-img", "compare", "--object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client",
               "--image-opts", f"driver=file,filename={raw}", opts)  # fmt: skip


def test_clients_with_a_certificate_from_the_ca_read_the_disk(
    tls_agent: TlsAgent, disk: tuple[Path, bytes], tmp_path: Path
) -> None:
    raw, data = disk
    info = run("nbdinfo", "--size", tls_agent.uri(tls_agent.creds.client))
    assert info.returncode == 0 and int(info.stdout) == len(data), info.stderr
    out = tmp_path / "copy.raw"
    r = run("nbdcopy", tls_agent.uri(tls_agent.creds.client), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    r = _qemu_img_compare(raw, tls_agent, tls_agent.creds.client)
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_the_right_certificate_nothing_is_read(tls_agent: TlsAgent, disk: tuple[Path, bytes]) -> None:
    raw, _ = disk
    plain = run("nbdinfo", "--size", f"nbd://127.0.0.1:{tls_agent.port}/vm1/disk0")
    assert plain.returncode != 0 and not plain.stdout
    for certs in (tls_agent.creds.anonymous, tls_agent.creds.stranger):
        r = run("nbdinfo", "--size", tls_agent.uri(certs))
        assert r.returncode != 0 and not r.stdout, (certs, r.stdout)
        r = run("nbdcopy", tls_agent.uri(certs), "null:")
        assert r.returncode != 0, certs
    r = _qemu_img_compare(raw, tls_agent, tls_agent.creds.stranger)
    assert r.returncode not in (0, 1), r.stdout  # 0 identical, 1 differs: either means it read

    # byte by byte: before STARTTLS every option but STARTTLS and ABORT is refused with TLS_REQD,
    # and asking for an export the old way (no error reply exists for it) hangs up
    with socket.create_connection(("127.0.0.1", tls_agent.port), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.read(18)[:8] == p.NBDMAGIC
        sock.sendall(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))
        name = b"vm1/disk0"
        go = struct.pack(">I", len(name)) + name + b"\0\0"
        for opt, payload in ((p.OPT_LIST, b""), (p.OPT_GO, go), (p.OPT_INFO, go), (p.OPT_STRUCTURED_REPLY, b"")):
            sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(payload)) + payload)
            _magic, _opt, rtype, length = struct.unpack(">QIII", f.read(20))
            f.read(length)
            assert rtype == p.REP_ERR_TLS_REQD, (opt, hex(rtype))
        sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name)
        assert f.read(100) == b"", "an export asked for in the clear must get nothing but a hang-up"


def test_plaintext_beyond_loopback_needs_insecure(repo: Repository, point: RestorePoint, tmp_path: Path) -> None:
    creds = make_credentials(tmp_path / "pki")
    for args in (["--listen", "0.0.0.0:0"], ["--listen", "0.0.0.0:0", "--tls-creds", str(creds.server), "--tls",
                                              "allow"]):  # fmt: skip
        proc = _serve(repo, tmp_path, *args)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "refusing plaintext NBD on 0.0.0.0" in err, err
        assert "Traceback" not in err
    proc = _serve(repo, tmp_path, "--listen", "0.0.0.0:0", "--insecure")
    assert proc.stderr is not None
    try:
        assert "serving nbd://0.0.0.0:" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    # credentials that are not there, or not credentials, are one line each
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "server-cert.pem").write_text("not a certificate")
    (tmp_path / "bad" / "server-key.pem").write_text("not a key")
    (tmp_path / "bad" / "ca-cert.pem").write_text("not a CA")
    for d, why in ((tmp_path / "nowhere", "does not exist"), (creds.client, "lack server-cert.pem"),
                   (tmp_path / "bad", "are unusable")):  # fmt: skip
        proc = _serve(repo, tmp_path, "--listen", "127.0.0.1:0", "--tls-creds", str(d))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and why in err and "Traceback" not in err, err


def test_instant_restore_with_the_agent_on_tls(vm_backup: VmBackup, tmp_path: Path) -> None:
    """The agent refuses plaintext, so a guest that boots and relocates read every block over TLS."""
    creds = make_credentials(tmp_path / "pki")
    r = subprocess.run([sys.executable, "-m", "liverestore", "restore", "--repo", str(vm_backup.repo_path), "--vm",
                        "testvm", "--dest", str(tmp_path / "dest"), "--cache-dir", str(tmp_path / "cache"),
                        "--hypervisor", "qemu", "--agent-tls-creds", str(creds.both), "--boot-marker", "BOOT-OK",
                        "--no-profile", "--stop-after", "--json"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["relocated"] and doc["hypervisor"] == "qemu"
    serial = Path(doc["serial_log"]).read_text(errors="replace")
    assert "BOOT-OK" in serial and "VERIFY-FAIL" not in serial
    # the data disk the guest never writes came through TLS bit for bit
    cmp = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(vm_backup.data_disk),
              str(tmp_path / "dest" / "testvm-data.raw"))  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # credentials that do not work are refused before anything starts
    r = subprocess.run([sys.executable, "-m", "liverestore", "restore", "--repo", str(vm_backup.repo_path), "--vm",
                        "testvm", "--dest", str(tmp_path / "d2"), "--cache-dir", str(tmp_path / "c2"),
                        "--hypervisor", "qemu", "--agent-tls-creds", str(creds.client)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "lack server-cert.pem" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_control_endpoint_needs_its_token(repo: Repository, point: RestorePoint, tmp_path: Path) -> None:
    proc = _serve(repo, tmp_path, "--listen", "127.0.0.1:0", "--control", "0.0.0.0:0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "give --control-token-file" in err and "Traceback" not in err, err

    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text(secrets.token_hex(16) + "\n")
    wrong.write_text(secrets.token_hex(16))
    proc = _serve(repo, tmp_path, "--listen", "127.0.0.1:0", "--control", "0.0.0.0:0", "--control-token-file",
                  str(token))  # fmt: skip
    assert proc.stderr is not None
    try:
        proc.stderr.readline()  # serving ...
        m = re.search(r"status: http://0\.0\.0\.0:(\d+)/status", proc.stderr.readline())
        assert m
        port = int(m.group(1))

        def status(*args: str) -> subprocess.CompletedProcess[str]:
            return run(sys.executable, "-m", "liverestore", "status", "--control", f"127.0.0.1:{port}", *args)

        for args in ([], ["--token-file", str(wrong)]):
            r = status(*args)
            assert r.returncode == 1 and "refused: wrong or missing --token-file" in r.stderr and not r.stdout
        # nothing can be changed without it either
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/mode/fifo", method="POST"))
        assert e.value.code == 401
        r = status("--token-file", str(token))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["scheduler"]["mode"] == "demand-first"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
