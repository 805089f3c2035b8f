"""``liverestore demo``: build a test VM, back it up, instant-restore it twice, compare.

Run 1 has no boot profile: every block the guest needs is fetched on demand from a (deliberately
slow, emulated) repository, and the boot reads are recorded. Run 2 prefetches that profile before
launch. Both runs relocate the disk live to primary storage, pivot, and have the guest re-verify
all of its files from the relocated disk.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click

from liverestore.backup import run_backup
from liverestore.commands_restore import render_report, run_cancellable
from liverestore.errors import LiverestoreError
from liverestore.progress import restore_display
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport
from liverestore.testvm import build_test_vm

MiB = 1 << 20


def echo(msg: str) -> None:
    click.echo(msg, err=True)


async def restore_and_check(repo: Repository, opts: RestoreOptions, live: bool) -> RestoreReport:
    with restore_display(live) as show:
        job = InstantRestore(repo, opts, show)
        try:
            report = await job.run()
            assert job.vm is not None
            mark = len(job.vm.serial_output())
            await job.vm.send_console("verify")  # the guest re-reads every file from the relocated disk
            await job.vm.wait_for_console("VERIFY-OK", 120, start=mark)
            await job.vm.send_console("halt")
            await job.vm.wait_for_console("HALTED", 60, start=mark)
        finally:
            await job.close(stop_vm=True)
    return report


@click.command()
@click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Where the demo keeps its files."
)
@click.option("--repo-latency-ms", type=float, default=10.0, show_default=True,
              help="Emulated repository latency per fetch.")  # fmt: skip
@click.option("--repo-mbps", type=float, default=0.0, help="Emulated repository bandwidth (Mbit/s).")
@click.option("--block-size", default="64K", show_default=True, help="Repository block size.")
@click.option("--disk-size", default="1G", show_default=True, help="Virtual size of the test VM's disk.")
@click.option("--accel", default="tcg", show_default=True)
def demo(
    data_dir: Path | None,
    repo_latency_ms: float,
    repo_mbps: float,
    block_size: str,
    disk_size: str,
    accel: str,
) -> None:
    """Build, back up and instantly restore a test VM twice (without, then with its boot profile)."""
    from liverestore.cli import default_data_dir, parse_size

    base = data_dir or default_data_dir() / "demo"
    bs, size = parse_size(block_size), parse_size(disk_size)
    for stale in ("repo", "cache", "dest-1", "dest-2"):
        shutil.rmtree(base / stale, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)

    t = time.monotonic()
    image = build_test_vm(base / "demo-vm.raw", size=size, payload_mb=90, cold_mb=100)
    echo(f"[1/4] built test VM {image.path} ({size // MiB} MiB virtual, {image.payload_files} files / "
         f"{image.payload_bytes / 1e6:.0f} MB checked at boot, 100 MB cold data) in {time.monotonic() - t:.1f} s")  # fmt: skip
    cfg = base / "demo-vm.json"
    cfg.write_text('{"name": "demo-vm", "memory_mb": 512, "disks": ["demo-vm"]}\n')
    repo = Repository.init(base / "repo", bs)
    t = time.monotonic()
    point, stats = run_backup(repo, "demo-vm", [image.path], [cfg])
    echo(f"[2/4] backed up to {repo.root} as point {point.id}: {stats.bytes_read / MiB:.0f} MiB read, "
         f"{stats.bytes_new_stored / MiB:.0f} MiB stored in {time.monotonic() - t:.1f} s")  # fmt: skip

    def opts(run: int) -> RestoreOptions:
        return RestoreOptions(
            vm="demo-vm", dest=base / f"dest-{run}", cache_dir=base / "cache" / f"run-{run}",
            repo_latency_ms=repo_latency_ms, repo_mbps=repo_mbps, accel=accel,
        )  # fmt: skip

    reports: list[RestoreReport] = []
    for run, label in ((1, "no profile yet: every boot read goes to the repository"),
                       (2, "with the boot profile recorded by run 1")):  # fmt: skip
        echo(
            f"[{run + 2}/4] instant restore #{run} ({label}), repository latency {repo_latency_ms:g} ms/fetch"
        )
        report = run_cancellable(restore_and_check(repo, opts(run), live=True))
        echo(render_report(report))
        echo("  guest re-verified all files from the relocated disk: VERIFY-OK")
        reports.append(report)
    click.echo(comparison(reports))


def comparison(reports: list[RestoreReport]) -> str:
    a, b = reports
    rows: list[tuple[str, Any, Any]] = [
        ("time to boot (s)", a.time_to_boot_s, b.time_to_boot_s),
        ("  of which profile prefetch (s)", a.phases.get("prefetch", 0), b.phases.get("prefetch", 0)),
        ("boot reads served from cache", f"{a.boot_reads_from_cache}/{a.boot_reads}",
         f"{b.boot_reads_from_cache}/{b.boot_reads}"),
        ("relocation (s)", a.phases.get("relocate", 0), b.phases.get("relocate", 0)),
        ("launch to pivot (s)", round(sum(a.phases.get(p, 0) for p in ("launch", "run", "relocate", "pivot")), 2),
         round(sum(b.phases.get(p, 0) for p in ("launch", "run", "relocate", "pivot")), 2)),
        ("repository fetches (blocks)", a.blocks_fetched, b.blocks_fetched),
        ("read latency p99 (ms, bucket)", a.read_latency_p99_ms, b.read_latency_p99_ms),
    ]  # fmt: skip
    if b.time_to_boot_s <= 0:
        raise LiverestoreError("run 2 reported no boot time")
    out = ["", f"{'':34}{'run 1 (no profile)':>20}{'run 2 (profile)':>18}"]
    out += [f"{name:34}{x!s:>20}{y!s:>18}" for name, x, y in rows]
    out.append(f"\ntime-to-boot speed-up from the profile: {a.time_to_boot_s / b.time_to_boot_s:.2f}x")
    return "\n".join(out)
