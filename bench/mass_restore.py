"""Mass restore: 16 guests booting from one agent at once, and one booting beside 15 relocations.

The test VM's real boot trace is recorded once; 16 VMs are backed up from the same image, and
one ``liverestore serve`` process serves all 16 restore points behind an emulated link (10 ms per
fetch, 1 Gbit/s). Each simulated guest is its own process replaying the trace over NBD, one read
at a time as a booting guest reads; all start on one signal. "Booted" is the end of the trace.
Relocations are ``nbdcopy`` reading whole exports (bulk reads, as QEMU's mirror makes them).
Every setting runs from cold caches; FIFO is the scheduler with no priorities, for contrast.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.common import MiB, bar_chart, stop_process, write_results
from bench.latency import traced_test_vm
from liverestore.backup import run_backup
from tests.test_cli import free_port

ROOT = Path(__file__).resolve().parent.parent
GUESTS = 16
LATENCY_MS, LINK_MBPS = 10.0, 1000.0

DEADLINE_S = 120.0  # a guest not booted by then is reported as not booted (FIFO behind bulk copies)
SHORT_TRACE = 300  # reads replayed beside the relocations: under FIFO each waits behind all their reads

# a simulated guest: connect, say ready, wait for the start signal, replay until done or the
# deadline, print its time and how many reads it finished
REPLAY = """
import json, sys, time
from tests.nbdclient import NbdClient
port, export, trace, deadline = int(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3])), float(sys.argv[4])
c = NbdClient("127.0.0.1", port, export)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
worst, done = 0.0, 0
for off, length in trace:
    t = time.perf_counter()
    c.read(off, length)
    worst = max(worst, time.perf_counter() - t)
    done += 1
    if t - t0 > deadline:
        break
print(json.dumps({"s": time.perf_counter() - t0, "max_ms": 1000 * worst, "reads": done}), flush=True)
"""


def _serve(repo: Path, vms: list[str], cache: Path, mode: str, share: bool) -> tuple[subprocess.Popen[str], int, int]:
    """The agent serving ``vms``, its NBD port and its control port."""
    shutil.rmtree(cache, ignore_errors=True)
    port, control = free_port(), free_port()
    args = [sys.executable, "-m", "liverestore", "serve", "--repo", str(repo), "--listen", f"127.0.0.1:{port}",
            "--control", f"127.0.0.1:{control}", "--cache-dir", str(cache), "--mode", mode,
            "--repo-latency-ms", str(LATENCY_MS), "--repo-mbps", str(LINK_MBPS)]  # fmt: skip
    if not share:
        args.append("--no-chunk-sharing")
    for vm in vms:
        args += ["--vm", vm]
    log = cache.with_name(cache.name + ".log")
    with open(log, "w") as err:  # a file, not a pipe: nobody would drain the agent's warnings
        proc = subprocess.Popen(args, stderr=err, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while "status:" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not start: {log.read_text()[-500:]}")
        time.sleep(0.1)
    return proc, port, control


def _link_mib(control: int) -> float:
    """MiB of stored (compressed) bytes the agent's points brought over the link so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{control}/status", timeout=10) as r:
        status = json.loads(r.read())
    return float(sum(p["metrics"]["bytes_fetched_stored"] for p in status["points"])) / MiB


def _guests(port: int, exports: list[str], trace_file: Path) -> list[subprocess.Popen[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", REPLAY, str(port), e, str(trace_file), str(DEADLINE_S)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for e in exports]  # fmt: skip
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return procs


def _go(procs: list[subprocess.Popen[str]]) -> list[dict[str, float]]:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout: IO[str] | None = p.stdout
        assert stdout is not None
        out.append(json.loads(stdout.readline()))
        p.wait(30)
    return out


def _scenario(repo: Path, vms: list[str], cache: Path, trace_file: Path, mode: str, booting: int,
              bulk: int, share: bool) -> dict[str, Any]:  # fmt: skip
    """``booting`` guests replay the trace together while ``bulk`` others are copied whole."""
    serve, port, control = _serve(repo, vms, cache, mode, share)
    copies: list[subprocess.Popen[bytes]] = []
    try:
        guests = _guests(port, [f"{vm}/vm" for vm in vms[:booting]], trace_file)
        for vm in vms[booting : booting + bulk]:
            copies.append(subprocess.Popen(["nbdcopy", f"nbd://127.0.0.1:{port}/{vm}/vm", "null:"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        if copies:
            time.sleep(1.0)  # the copies' reads fill the queues before the guest starts
        t0 = time.monotonic()
        times = _go(guests)
        wall = time.monotonic() - t0
        still_copying = sum(c.poll() is None for c in copies)
        link_mib = _link_mib(control)
    finally:
        for c in copies:
            if c.poll() is None:
                c.send_signal(signal.SIGKILL)
            c.wait()
        stop_process(serve)
    secs = sorted(t["s"] for t in times)
    reads = len(json.loads(trace_file.read_text()))
    return {
        "guests": booting, "bulk_copies": bulk, "copies_running_at_end": still_copying,
        "reads_per_guest": reads, "guests_not_booted": sum(t["reads"] < reads for t in times),
        "boot_s_min": round(secs[0], 2), "boot_s_median": round(secs[len(secs) // 2], 2),
        "boot_s_max": round(secs[-1], 2), "all_booted_s": round(wall, 2),
        "worst_read_ms": round(max(t["max_ms"] for t in times), 1), "link_mib": round(link_mib, 1),
    }  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-mass-") as tmpd:
        tmp = Path(tmpd)
        repo, trace = traced_test_vm(tmp, quick)
        vms = [f"vm{i:02d}" for i in range(1, GUESTS + 1)]
        for vm in vms:  # the same image 16 times: the repository dedups it, each cache is its own
            run_backup(repo, vm, [tmp / "vm.raw"], [])
        repo.close()
        full, short = tmp / "trace.json", tmp / "trace-short.json"
        full.write_text(json.dumps(trace))
        short.write_text(json.dumps(trace[:SHORT_TRACE]))
        trace_mib = sum(length for _o, length in trace) / MiB
        # The fairness rows fetch per point (--no-chunk-sharing): with the clones sharing chunks, the
        # guest's reads would join the relocations' fetches and the rows would no longer say how
        # the scheduler shares the link between points.
        settings = {
            "1 guest alone": ("demand-first", 1, 0, full, True),
            f"{GUESTS} guests together": ("demand-first", GUESTS, 0, full, True),
            f"{GUESTS} guests together, no chunk sharing": ("demand-first", GUESTS, 0, full, False),
            f"{GUESTS} guests together, no chunk sharing, fifo": ("fifo", GUESTS, 0, full, False),
            f"1 guest alone, first {SHORT_TRACE} reads": ("demand-first", 1, 0, short, False),
            f"1 guest beside {GUESTS - 1} relocations": ("demand-first", 1, GUESTS - 1, short, False),
            f"1 guest beside {GUESTS - 1} relocations, fifo": ("fifo", 1, GUESTS - 1, short, False),
        }
        results: dict[str, Any] = {}
        for name, (mode, booting, bulk, trace_file, share) in settings.items():
            results[name] = _scenario(tmp / "repo", vms, tmp / "cache", trace_file, mode, booting, bulk, share)
            print(f"mass_restore {name}: {results[name]}", flush=True)
    alone = results["1 guest alone"]["boot_s_max"]
    alone_short = results[f"1 guest alone, first {SHORT_TRACE} reads"]["boot_s_max"]
    together, fifo = results[f"{GUESTS} guests together"], results[f"{GUESTS} guests together, no chunk sharing, fifo"]
    unshared = results[f"{GUESTS} guests together, no chunk sharing"]
    beside, beside_fifo = (results[f"1 guest beside {GUESTS - 1} relocations{s}"] for s in ("", ", fifo"))
    ratios = {
        "together_median_over_alone": round(together["boot_s_median"] / alone, 2),
        "together_max_over_alone": round(together["boot_s_max"] / alone, 2),
        "together_spread_max_over_min": round(together["boot_s_max"] / together["boot_s_min"], 2),
        "unshared_median_over_alone": round(unshared["boot_s_median"] / alone, 2),
        "unshared_spread_max_over_min": round(unshared["boot_s_max"] / unshared["boot_s_min"], 2),
        "link_unshared_over_shared": round(unshared["link_mib"] / together["link_mib"], 1),
        "fifo_spread_max_over_min": round(fifo["boot_s_max"] / fifo["boot_s_min"], 2),
        "beside_relocations_over_alone": round(beside["boot_s_max"] / alone_short, 2),
        "beside_relocations_fifo_over_alone": round(beside_fifo["boot_s_max"] / alone_short, 2),
    }
    rows = [[k, v["guests"], v["bulk_copies"], v["reads_per_guest"], v["boot_s_min"], v["boot_s_median"],
             v["boot_s_max"], v["guests_not_booted"], v["worst_read_ms"], v["link_mib"]]
            for k, v in results.items()]  # fmt: skip
    notes = (
        f"One `liverestore serve` process serves {GUESTS} restore points (the test VM backed up as {GUESTS} "
        f"VMs) behind an emulated link of {LATENCY_MS:g} ms per fetch and {LINK_MBPS:g} Mbit/s, 64 KiB blocks, "
        f"cold caches. A guest is a process replaying the recorded boot trace ({len(trace)} reads, "
        f"{trace_mib:.0f} MiB) one read at a time; relocations are nbdcopy reading whole exports, and beside "
        f"them the guest replays the first {SHORT_TRACE} reads (under FIFO each waits behind the copies' reads in "
        f"flight). A guest still reading after {DEADLINE_S:g} s counts as not booted. "
        f"The {GUESTS} VMs are clones of one image: by default the agent fetches a chunk they share once "
        "for all and copies it into each point's cache (link MiB: stored bytes over the link). With "
        f"--no-chunk-sharing each point fetches its own, {GUESTS}x the data through one link, and the "
        "fairness rows run that way: fairness is the spread between the guests and how little the "
        f"relocations slow a boot. Ratios: {ratios}."
    )
    write_results("mass_restore", {"rows": results, "ratios": ratios}, rows,
                  ["setting", "guests", "relocations", "reads each", "boot min s", "boot median s", "boot max s",
                   "not booted", "worst read ms", "link MiB"], notes)  # fmt: skip
    bar_chart("mass_restore", "time to booted (s)", ["min", "median", "max"],
              {k: [v["boot_s_min"], v["boot_s_median"], v["boot_s_max"]] for k, v in results.items()}, "s")
    return {"rows": results, "ratios": ratios}
