"""NBD serving throughput from a warm cache: liverestore's agent vs qemu-nbd vs nbdkit, via nbdcopy."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import MiB, bar_chart, stop_process, write_results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int | None, sock: Path | None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock is not None:
                if sock.exists():
                    return
            else:
                with socket.create_connection(("127.0.0.1", port or 0), timeout=0.2):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not come up")


@contextmanager
def server(kind: str, raw: Path, repo: str | Path, tmp: Path, unix: bool, agent_args: Sequence[str] = ()) -> Iterator[str]:
    """The URI of a running ``kind`` server of the disk, stopped on exit."""
    with served(kind, raw, repo, tmp, unix, agent_args) as (uri, _pid):
        yield uri


@contextmanager
def served(kind: str, raw: Path, repo: str | Path, tmp: Path, unix: bool,
           agent_args: Sequence[str] = ()) -> Iterator[tuple[str, int]]:  # fmt: skip
    """``server``'s URI and the server's process id, for a benchmark that counts its CPU."""
    port = _free_port()
    sock = tmp / f"{kind}.sock"
    sock.unlink(missing_ok=True)
    if kind == "liverestore":
        listen = f"unix:{sock}" if unix else f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "liverestore", "serve", "--repo", str(repo), "--vm", "vm", "--listen", listen,
               "--control", f"127.0.0.1:{_free_port()}", "--cache-dir", str(tmp / "cache"), *agent_args]  # fmt: skip
        export = "vm/disk"
    elif kind == "qemu-nbd":
        cmd = ["qemu-nbd", "-r", "-f", "raw", "-x", "disk", "--shared=8", "--persistent"]
        cmd += ["-k", str(sock)] if unix else ["-b", "127.0.0.1", "-p", str(port)]
        cmd.append(str(raw))
        export = "disk"
    else:
        cmd = ["nbdkit", "-r", "-f", "-e", "disk"]
        cmd += ["-U", str(sock)] if unix else ["-i", "127.0.0.1", "-p", str(port)]
        cmd += ["file", f"file={raw}"]
        export = "disk"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, sock if unix else None)
        yield (f"nbd+unix:///{export}?socket={sock}" if unix else f"nbd://127.0.0.1:{port}/{export}"), proc.pid
    finally:
        stop_process(proc)


def run(quick: bool) -> dict[str, Any]:
    if not shutil.which("nbdkit") or not shutil.which("nbdcopy"):
        raise RuntimeError("nbdkit and nbdcopy are needed (./setup.sh installs them)")
    size = (256 if quick else 1024) * MiB
    repeat = 3
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmpd:
        tmp = Path(tmpd)
        raw = tmp / "disk.raw"
        with open(raw, "wb") as f:
            for _ in range(size // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        subprocess.run([sys.executable, "-m", "liverestore", "init", str(tmp / "repo")], check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "liverestore", "backup", "--repo", str(tmp / "repo"), "--vm", "vm",
                        str(raw)], check=True, capture_output=True)  # fmt: skip
        results: dict[str, Any] = {}
        for unix in (False, True):
            for req in (MiB, 4096):
                key = f"{'unix' if unix else 'tcp'} {req // 1024} KiB"
                results[key] = {}
                kinds = ("liverestore", "qemu-nbd", "nbdkit")
                with contextlib.ExitStack() as servers:  # all three up at once: their runs interleave
                    copies = {}
                    for kind in kinds:
                        uri = servers.enter_context(server(kind, raw, tmp / "repo", tmp, unix))
                        copies[kind] = ["nbdcopy", f"--request-size={req}", "--requests=16", uri, "null:"]
                        # Two warm-ups: the first fills our read-cache, and drop-behind lets those pages
                        # go once read (a relocation reads each block once); the second brings them back
                        # into the page cache, where the other servers' file is. With one, our "warm"
                        # 1 MiB reads came from the disk (1 GiB: 0.27x nbdkit instead of 0.90x).
                        for _ in range(2):
                            subprocess.run(copies[kind], check=True, capture_output=True)
                    # Round by round, each server in turn: this host's speed drifts over a minute, and
                    # servers measured one after the other took that drift into their ratio.
                    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
                    for _ in range(repeat):
                        for kind in kinds:
                            t0 = time.monotonic()
                            subprocess.run(copies[kind], check=True, capture_output=True)
                            runs[kind].append(time.monotonic() - t0)
                for kind in kinds:
                    results[key][kind] = round(size / MiB / statistics.median(runs[kind]), 1)
                    print(f"nbd {key} {kind}: {results[key][kind]} MiB/s", flush=True)
                results[key]["ratio_vs_nbdkit"] = round(
                    results[key]["liverestore"] / results[key]["nbdkit"], 2
                )
                results[key]["ratio_vs_qemu_nbd"] = round(
                    results[key]["liverestore"] / results[key]["qemu-nbd"], 2
                )
        rows = [[k, v["liverestore"], v["qemu-nbd"], v["nbdkit"], v["ratio_vs_nbdkit"], v["ratio_vs_qemu_nbd"]]
                for k, v in results.items()]  # fmt: skip
        notes = (
            f"nbdcopy of a {size // MiB} MiB random raw disk to null:, 16 requests in flight, median of "
            f"{repeat} runs after two warm-up copies (liverestore's read-cache full, page cache warm for all); "
            "the three servers run at once and are read in turn, round by round."
        )
        write_results("nbd", {"rows": results}, rows,
                      ["transport / request", "liverestore MiB/s", "qemu-nbd MiB/s", "nbdkit MiB/s",
                       "vs nbdkit", "vs qemu-nbd"], notes)  # fmt: skip
        bar_chart("nbd", "NBD throughput from a warm cache (MiB/s)", list(results),
                  {k: [v[k] for v in results.values()] for k in ("liverestore", "qemu-nbd", "nbdkit")},
                  "MiB/s")  # fmt: skip
        return results
