"""CLI commands for restoring: ``restore``, ``profile`` and ``demo``."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from liverestore import profile as profiles
from liverestore.cli_options import ACCELERATORS, GUEST_MEMORY_MIB, NOT_NEGATIVE, SECONDS
from liverestore.errors import LiverestoreError
from liverestore.mass_restore import MassRestore
from liverestore.names import check_name, vm_at_point
from liverestore.progress import restore_display
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport, classic_restore


def run_cancellable(coro: Any) -> Any:
    """Run ``coro``; SIGINT/SIGTERM cancel it so its cleanup (abort, remove partials) runs."""

    interrupted = False

    async def main() -> Any:
        nonlocal interrupted
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            interrupted = True  # raised outside the loop, once every cleanup has run
            return None

    result = asyncio.run(main())
    if interrupted:
        raise KeyboardInterrupt
    return result


def render_report(r: RestoreReport) -> str:
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in r.phases.items())
    renamed = f" as {r.name}" if r.name and r.name != r.vm else ""
    lines = [
        f"{r.mode} restore of {r.vm}{renamed} (point {r.point}, {r.hypervisor} driver): booted in "
        f"{r.time_to_boot_s:.2f} s ({r.boot_after_launch_s:.2f} s after launch; up by {r.boot_detected_by})",
        f"  {r.vm_identity}",
        f"  phases: {phases}",
        f"  repository: {r.blocks_fetched} blocks in {r.repository_requests} requests, "
        f"{r.bytes_fetched / 2**20:.1f} MiB fetched ({r.bytes_fetched_stored / 2**20:.1f} MiB transferred)",
    ]
    if r.mode == "instant":
        lines.append(
            f"  reads: {r.reads} ({r.reads_from_cache} from cache, {r.reads_from_repository} via repository, "
            f"hit rate {100 * r.hit_rate:.1f} %); boot reads from cache {r.boot_reads_from_cache}/{r.boot_reads}, "
            f"boot I/O stall {r.boot_io_stall_s:.2f} s; "
            f"profile {r.profile_prefetched}/{r.profile_blocks} blocks prefetched"
        )
        lines.append(
            f"  read-cache at start: {r.cache_start}"
            + (f" ({r.cache_blocks_at_start} blocks already cached: hit rates say little about the profile)"
               if r.cache_start == "warm" else "")
        )  # fmt: skip
    if r.relocation_failures:
        lines.append(f"  relocation failed {len(r.relocation_failures)} time(s) and started again; the VM ran on "
                     f"from the backup meanwhile (last: {r.relocation_failures[-1]})")  # fmt: skip
    for disk, path in r.destinations.items():
        lines.append(f"  disk {disk}: {path}")
    return "\n".join(lines)


def options_from(kw: dict[str, Any]) -> RestoreOptions:
    from liverestore.cli import default_data_dir

    if kw.get("name"):
        check_name("VM", kw["name"])
    return RestoreOptions(
        vm=kw["vm"], point=kw["point"], dest=kw["dest"],
        cache_dir=kw["cache_dir"] or default_data_dir() / "cache",
        relocate=not kw["no_relocate"], use_profile=not kw["no_profile"],
        repo_latency_ms=kw["repo_latency_ms"], repo_mbps=kw["repo_mbps"],
        boot_marker=kw["boot_marker"] or None, boot_window_s=kw["boot_window"], accel=kw["accel"],
        boot_quiet_s=kw.get("boot_quiet", 8.0), memory_mb=kw["memory"],
        hypervisor=kw.get("hypervisor", "auto"), name=kw.get("name") or None,
        network_map=parse_network_map(kw.get("network_map", ())), no_network=kw.get("no_network", False),
        dest_format=kw.get("dest_format", "raw"), keep_cache=kw.get("keep_cache", False),
        agent_tls_creds=kw.get("agent_tls_creds"),
    )  # fmt: skip


def parse_network_map(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise LiverestoreError(f"--network-map {pair!r}: expected OLD=NEW (network or bridge names)")
        out[old] = new
    return out


@click.command()
@click.option("--repo", "repo_path", required=True, metavar="DIR|s3://BUCKET/PREFIX")
@click.option("--vm", "vms", required=True, multiple=True,
              help="VM to restore, or VM@POINT; repeat it to restore several VMs at once from one agent.")  # fmt: skip
@click.option("--point", default=None, help="Restore point id (default: latest); with one --vm.")
@click.option("--instant/--classic", default=True, help="Boot from backup now (default) or copy first.")
@click.option("--dest", type=click.Path(path_type=Path), required=True, help="Primary storage directory.")
@click.option("--no-relocate", is_flag=True, help="Keep running from backup; do not move the disks.")
@click.option("--resume", is_flag=True, help="Finish an instant restore whose orchestrator was killed.")
@click.option("--no-profile", is_flag=True, help="Ignore the stored boot profile.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--repo-latency-ms", type=NOT_NEGATIVE, default=0.0, help="Emulated latency per repository fetch.")
@click.option("--repo-mbps", type=NOT_NEGATIVE, default=0.0, help="Emulated repository bandwidth (Mbit/s).")
@click.option(
    "--boot-marker", default="", help="Serial console text meaning the guest is up (test VM: BOOT-OK)."
)
@click.option("--boot-window", type=SECONDS, default=20.0, show_default=True,
              help="Without a marker: seconds after launch counted as boot (and recorded as its profile).")  # fmt: skip
@click.option("--boot-quiet", type=SECONDS, default=8.0, show_default=True,
              help="Without a marker or guest agent: the guest is up once its reads from backup pause this long.")  # fmt: skip
@click.option("--hypervisor", default="auto", show_default=True,
              help="auto (libvirt when the point holds a domain definition and libvirt answers), qemu, "
                   "or libvirt[:URI].")  # fmt: skip
@click.option("--name", default=None, help="Restore under a new name (new UUID and MAC addresses).")
@click.option("--network-map", multiple=True, metavar="OLD=NEW", help="Attach NICs of network OLD to NEW.")
@click.option("--no-network", is_flag=True, help="Restore without NICs (host lacks the original networks).")
@click.option("--format", "dest_format", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True,
              help="Format of the relocated disks.")  # fmt: skip
@click.option("--keep-cache", is_flag=True, help="Keep the read-cache after relocation (default: remove it).")
@click.option("--agent-tls-creds", type=click.Path(path_type=Path), default=None,
              help="Run the VM's NBD connections over x509 TLS: a directory in QEMU's layout holding the CA, "
                   "server and client certificates and keys (qemu driver).")  # fmt: skip
@click.option("--accel", type=ACCELERATORS, default="tcg", show_default=True, help="QEMU accelerator (qemu driver).")
@click.option("--memory", type=GUEST_MEMORY_MIB, default=512, show_default=True,
              help="Guest memory in MiB for bare-disk backups (a stored definition brings its own).")  # fmt: skip
@click.option("--stop-after", is_flag=True,
              help="Shut the VM down once restored, or with --no-relocate once booted (ACPI, then forced).")  # fmt: skip
@click.option("--shutdown-timeout", type=NOT_NEGATIVE, default=60.0, show_default=True,
              help="With --stop-after: seconds the guest gets to power off before it is forced off.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def restore(**kw: Any) -> None:
    """Restore a VM: instantly from backup (then relocate live), or classically (copy, then boot).
    Several --vm restore several VMs at once, instantly, through one agent that shares the
    repository fairly between them; each gets its own report."""
    vms = kw.pop("vms")
    if len(vms) > 1:
        restore_several(vms, kw)
        return
    kw["vm"], kw["point"] = vm_at_point(vms[0], kw["point"])
    repo = Repository.open(kw["repo_path"])
    opts = options_from(kw)

    async def go() -> RestoreReport:
        with restore_display(not kw["as_json"]) as show:
            if not kw["instant"]:
                report, vm = await classic_restore(repo, opts)
                if kw["stop_after"]:
                    await vm.shutdown(kw["shutdown_timeout"])
                await vm.close()
                return report
            job = InstantRestore(repo, opts, show)
            report = await (job.resume() if kw["resume"] else job.run())
            if not opts.relocate and not kw["stop_after"]:
                click.echo(
                    f"VM is running from backup; serial log {report.serial_log}. Ctrl-C stops it.", err=True
                )
                try:
                    if job.vm is not None:
                        await job.run_from_backup()
                finally:
                    await job.close(stop_vm=True)
            else:
                await job.close(stop_vm=kw["stop_after"], shutdown_timeout=kw["shutdown_timeout"])
            return report

    report = run_cancellable(go())
    click.echo(json.dumps(report.as_dict(), indent=2) if kw["as_json"] else render_report(report))


def restore_several(vms: tuple[str, ...], kw: dict[str, Any]) -> None:
    """``restore --vm A --vm B ...``: instant restores of several VMs from one agent."""
    for flag, given in (("--point", kw["point"]), ("--name", kw["name"]), ("--classic", not kw["instant"])):
        if given:
            raise LiverestoreError(f"{flag} goes with one --vm (name points as --vm VM@POINT)")
    options = [options_from({**kw, "vm": vm, "point": point}) for vm, point in (vm_at_point(v) for v in vms)]
    repo = Repository.open(kw["repo_path"])

    async def go() -> list[RestoreReport | BaseException]:
        with restore_display(not kw["as_json"]) as show:
            job = MassRestore(repo, options, show)
            try:
                results = await (job.resume() if kw["resume"] else job.run())
            except BaseException:  # refused or interrupted: each restore undid its own part already
                await job.close(stop_vm=False)
                raise
            relocated = options[0].relocate
            try:
                if not relocated and not kw["stop_after"] and any(isinstance(r, RestoreReport) for r in results):
                    click.echo("VMs are running from backup. Ctrl-C stops them.", err=True)
                    await asyncio.gather(*(r.run_from_backup() for r in job.restores if r.vm is not None))
            finally:
                await job.close(stop_vm=kw["stop_after"] or not relocated, shutdown_timeout=kw["shutdown_timeout"])
            return results

    results = run_cancellable(go())
    failed = [(o, r) for o, r in zip(options, results, strict=True) if not isinstance(r, RestoreReport)]
    if kw["as_json"]:
        click.echo(json.dumps([r.as_dict() if isinstance(r, RestoreReport) else
                               {"vm": o.vm, "error": _one_line(r)} for o, r in zip(options, results, strict=True)],
                              indent=2))  # fmt: skip
    else:
        click.echo("\n".join(render_report(r) for r in results if isinstance(r, RestoreReport)))
    for o, err in failed:
        click.echo(f"liverestore: restore of {o.vm} failed: {_one_line(err)}", err=True)
    if failed:
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    if isinstance(e, LiverestoreError):
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


@click.group()
def profile() -> None:
    """Show or manage a VM's boot profile."""


@profile.command("show")
@click.option("--repo", "repo_path", required=True, metavar="DIR|s3://BUCKET/PREFIX")
@click.option("--vm", required=True)
@click.option("--json", "as_json", is_flag=True)
def profile_show(repo_path: str, vm: str, as_json: bool) -> None:
    repo = Repository.open(repo_path)
    repo.get_point(vm)  # a clear error for an unknown VM
    summary = profiles.summarize(repo.get_profile(vm))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not summary["runs"]:
        click.echo(f"VM {vm} has no boot profile yet (it is recorded during the next instant restore)")
    else:
        click.echo(f"VM {vm}: profile from {summary['runs']} run(s)")
        for d, info in summary["disks"].items():
            click.echo(f"  disk {d}: {info['blocks']} blocks ({info['bytes'] / 2**20:.1f} MiB)")


@profile.command("clear")
@click.option("--repo", "repo_path", required=True, metavar="DIR|s3://BUCKET/PREFIX")
@click.option("--vm", required=True)
def profile_clear(repo_path: str, vm: str) -> None:
    repo = Repository.open(repo_path)
    removed = repo.delete_profile(vm)
    click.echo(f"profile of {vm} {'cleared' if removed else 'did not exist'}")


@profile.command("record")
@click.option("--repo", "repo_path", required=True, metavar="DIR|s3://BUCKET/PREFIX")
@click.option("--vm", required=True)
@click.option("--point", default=None)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--work-dir", type=click.Path(path_type=Path), required=True, help="Scratch space for the VM.")
@click.option("--boot-marker", default="", help="Serial console text meaning the guest is up.")
@click.option("--boot-window", type=SECONDS, default=20.0, show_default=True)
@click.option("--accel", type=ACCELERATORS, default="tcg", show_default=True)
def profile_record(**kw: Any) -> None:
    """Boot the VM from backup once (no relocation), record its boot reads, power it off."""
    repo = Repository.open(kw["repo_path"])
    kw.update(dest=kw.pop("work_dir"), no_relocate=True, no_profile=True, repo_latency_ms=0.0, repo_mbps=0.0,
              memory=512, hypervisor="qemu")  # fmt: skip
    opts = options_from(kw)

    async def go() -> RestoreReport:
        job = InstantRestore(repo, opts)
        try:
            return await job.run()
        finally:
            await job.close(stop_vm=True)

    report = run_cancellable(go())
    summary = profiles.summarize(repo.get_profile(report.vm))
    blocks = sum(d["blocks"] for d in summary["disks"].values())
    click.echo(f"recorded {report.boot_reads} boot reads; profile of {report.vm} now {blocks} blocks "
               f"from {summary['runs']} run(s)")  # fmt: skip
    sys.stdout.flush()
