"""Shared plumbing for the benchmarks: result files, tables, charts, timing helpers."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_results(
    name: str, data: dict[str, Any], table: list[list[Any]], headers: list[str], notes: str
) -> Path:
    """``results/<name>.json`` plus ``results/<name>.md`` (a table and what it means)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    md = [f"# {name}", "", notes.strip(), "", "| " + " | ".join(headers) + " |",
          "|" + "---|" * len(headers)]  # fmt: skip
    md += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in table]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def series(results: dict[str, dict[str, Any]], keys: dict[str, str]) -> dict[str, list[float]]:
    """Chart series from result rows: each label gets that key of every row, in row order."""
    return {label: [row[key] for row in results.values()] for label, key in keys.items()}


def bar_chart(
    name: str, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.4), 4))
    width = 0.8 / max(1, len(series))
    for i, (sname, values) in enumerate(series.items()):
        xs = [x + i * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=sname)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_spread(path: Path, size: int, allocated: int, extent: int, data: Callable[[], bytes]) -> None:
    """A sparse file of ``size`` bytes with ``allocated`` of them written, ``extent`` at a time
    (each from ``data()``), spread evenly: real disks are not written front to back."""
    extents = allocated // extent
    stride = size // extents
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(extents):
            f.seek(i * stride)
            f.write(data())


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGINT (a server's clean shutdown), then SIGKILL if it lingers."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``repeat`` runs: these machines are noisy, the median less so."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for (a finished ``subprocess.run``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def host_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat, summed over its cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(ticks[:8])  # guest time is already counted in user
    idle = ticks[3] + ticks[4]
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")
