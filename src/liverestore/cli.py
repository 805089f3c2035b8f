"""Command line. Every expected failure ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from liverestore.cli_options import NOT_NEGATIVE
from liverestore.errors import LiverestoreError
from liverestore.names import vm_at_point

log = logging.getLogger("liverestore")


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(default_port)
    try:
        port_n = int(port)
        if not 0 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        raise LiverestoreError(f"invalid address {value!r}: expected HOST:PORT") from None
    return host.strip("[]") or "127.0.0.1", port_n


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "liverestore"


def _open_repo(path: str) -> Any:
    from liverestore.repository import Repository

    return Repository.open(path)


repo_option = click.option(
    "--repo", "repo_path", required=True, metavar="DIR|s3://BUCKET/PREFIX", help="Repository location."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--password-file", type=click.Path(path_type=Path), default=None,
              help="The passphrase of an encrypted repository (else LIVERESTORE_PASSWORD, or a prompt).")  # fmt: skip
@click.version_option(package_name="liverestore")
def cli(verbose: int, password_file: Path | None) -> None:
    """Instant VM recovery from a deduplicated backup repository."""
    if password_file is not None:  # read where the repository is opened, by this process only
        os.environ["LIVERESTORE_PASSWORD_FILE"] = str(password_file.resolve())
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if verbose < 2:
        # The QEMU driver turns every QMP failure into its own one-line error; the library would
        # first log its view of the same failure ("Failed to establish session"), and warn of a
        # late reply to a quit we stopped waiting for ("Unknown ID ..., message dropped").
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@cli.command()
@click.argument("repo_path", metavar="DIR|s3://BUCKET/PREFIX")
@click.option("--block-size", default="1M", show_default=True, help="Block size (64K .. 16M, power of two).")
@click.option("--encrypt", is_flag=True,
              help="Encrypt and authenticate everything stored (AES-256-GCM; the passphrase as for every command).")  # fmt: skip
def init(repo_path: str, block_size: str, encrypt: bool) -> None:
    """Create an empty repository."""
    from liverestore.repository import Repository
    from liverestore.repository.repo import passphrase_for

    passphrase = None
    if encrypt:
        passphrase = passphrase_for(repo_path)
        if sys.stdin.isatty() and not os.environ.get("LIVERESTORE_PASSWORD") and \
                not os.environ.get("LIVERESTORE_PASSWORD_FILE") and passphrase != passphrase_for(repo_path):
            raise LiverestoreError("the two passphrases differ")
    repo = Repository.init(repo_path, parse_size(block_size), passphrase)
    what = "encrypted repository" if encrypt else "repository"
    click.echo(f"created {what} {repo_path} (block size {repo.block_size // 1024} KiB)")


@cli.command("passwd")
@repo_option
@click.option("--new-password-file", type=click.Path(path_type=Path), required=True,
              help="The new passphrase (the current one as for every command).")  # fmt: skip
def passwd(repo_path: str, new_password_file: Path) -> None:
    """Change an encrypted repository's passphrase (its master key is rewrapped; no data is rewritten)."""
    from liverestore.repository.repo import read_passphrase_file

    repo = _open_repo(repo_path)
    repo.change_passphrase(read_passphrase_file(new_password_file))
    click.echo(f"passphrase of {repo_path} changed", err=True)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise LiverestoreError(f"invalid size {text!r}: use e.g. 64K, 1M, 2G") from None


@cli.command()
@repo_option
@click.option("--vm", default=None, help="VM name (default with --domain: the domain's name).")
@click.option("--config", "configs", multiple=True, type=click.Path(path_type=Path), help="VM config file.")
@click.option("--libvirt", "libvirt_uri", is_flag=False, flag_value="qemu:///system", default=None,
              metavar="[URI]", help="Back up a libvirt domain (URI default qemu:///system); needs --domain.")  # fmt: skip
@click.option("--domain", default=None,
              help="The libvirt domain to back up: shut off (its files are read) or running (live, incremental).")  # fmt: skip
@click.option("--format", "disk_format", type=click.Choice(["raw", "qcow2"]), default=None,
              help="What the DISK files hold (default: what qemu-img sees, which must fit the file name).")  # fmt: skip
@click.option("--quiesce", is_flag=True, help="Live: freeze the guest's filesystems through its guest agent.")
@click.option("--full", is_flag=True, help="Live: read every disk whole instead of the blocks changed since the last point.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.argument("disks", nargs=-1, type=click.Path(path_type=Path))
def backup(repo_path: str, vm: str | None, configs: tuple[Path, ...], libvirt_uri: str | None, domain: str | None,
           disk_format: str | None, quiesce: bool, full: bool, as_json: bool, disks: tuple[Path, ...]) -> None:  # fmt: skip
    """Back up DISKS (raw or qcow2) of a VM, or a libvirt domain with its definition; prints the
    new restore point id."""
    from liverestore.backup import run_backup
    from liverestore.progress import byte_progress

    repo = _open_repo(repo_path)
    names: list[str] | None = None
    extra: dict[str, bytes] | None = None
    if domain or libvirt_uri:
        from liverestore.backup_libvirt import plan_domain_backup
        from liverestore.livebackup import is_running

        if not domain:
            raise LiverestoreError("--libvirt needs --domain NAME")
        if disks:
            raise LiverestoreError("with --domain the disks come from the domain's definition: give no DISK")
        uri = libvirt_uri or "qemu:///system"
        if is_running(uri, domain):
            if configs or disk_format:
                raise LiverestoreError("a live backup stores the domain's own definition and disk formats: "
                                       "give no --config or --format")  # fmt: skip
            _live_backup(repo, uri, domain, vm, quiesce, full, as_json)
            return
        plan = plan_domain_backup(uri, domain)
        vm, disks, names, extra = vm or plan.vm, tuple(plan.disk_paths), plan.disk_names, plan.configs
        for s in plan.skipped:
            click.echo(f"not stored: {s}", err=True)
    if quiesce:
        raise LiverestoreError("--quiesce needs a running libvirt domain (--libvirt --domain NAME)")
    if not vm:
        raise LiverestoreError("give --vm NAME (or --domain NAME with --libvirt)")
    with byte_progress("backup") as update:
        point, stats = run_backup(repo, vm, list(disks), list(configs), update, disk_names=names,
                                  extra_configs=extra, disk_format=disk_format)  # fmt: skip
    doc = {"point_id": point.id, "vm": vm, "mode": "full", "checkpoint": None, "base_checkpoint": None,
           "bytes_read": stats.bytes_read, "bytes_virtual": stats.bytes_virtual, "bytes_new": stats.bytes_new_stored}  # fmt: skip
    click.echo(json.dumps(doc, indent=2) if as_json else point.id)
    click.echo(
        f"backed up {len(disks)} disk(s){' and the domain definition' if extra else ''}, "
        f"{stats.bytes_virtual / 2**20:.1f} MiB virtual, "
        f"{stats.bytes_read / 2**20:.1f} MiB read, {stats.bytes_new_stored / 2**20:.2f} MiB new in repository",
        err=True,
    )


def _live_backup(repo: Any, uri: str, domain: str, vm: str | None, quiesce: bool, full: bool,
                 as_json: bool) -> None:  # fmt: skip
    from liverestore.livebackup import run_live_backup
    from liverestore.progress import byte_progress

    def warn(message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    with byte_progress("live backup") as update:
        point, summary = run_live_backup(repo, uri, domain, vm=vm, quiesce=quiesce, full=full,
                                         progress=update, warn=warn)  # fmt: skip
    click.echo(json.dumps(summary.to_json(), indent=2) if as_json else point.id)
    since = f" since checkpoint {summary.base_checkpoint}" if summary.base_checkpoint else ""
    click.echo(
        f"live {summary.mode} backup of {domain}{since}{' (quiesced)' if summary.quiesced else ''}: "
        f"{summary.bytes_read / 2**20:.1f} MiB read of {summary.bytes_virtual / 2**20:.1f} MiB of disks, "
        f"{summary.bytes_new / 2**20:.2f} MiB new in repository, {summary.seconds:.1f} s; "
        f"next backup starts from checkpoint {summary.checkpoint}",
        err=True,
    )


@cli.command("list")
@repo_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(repo_path: str, as_json: bool) -> None:
    """VMs, restore points, disks, sizes and dedup ratio."""
    from liverestore.listing import describe_repository, render_listing

    doc = describe_repository(_open_repo(repo_path))
    click.echo(json.dumps(doc, indent=2) if as_json else render_listing(doc))


@cli.command()
@repo_option
@click.option("--vm", "vms", required=True, multiple=True,
              help="VM to serve, VM@POINT for one of its points; repeat it to serve several at once.")  # fmt: skip
@click.option("--point", default=None, help="Restore point id (default: latest); with one --vm.")
@click.option(
    "--listen", default="127.0.0.1:10809", show_default=True, help="NBD address HOST:PORT or unix:PATH."
)
@click.option("--control", default=None, help="Status endpoint HOST:PORT (default: 127.0.0.1, NBD port + 1).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Read-cache directory.")
@click.option("--writable", is_flag=True, help="Accept writes into a copy-on-write area in the cache.")
@click.option("--repo-latency-ms", type=NOT_NEGATIVE, default=0.0, help="Emulated latency per repository fetch.")
@click.option("--repo-mbps", type=NOT_NEGATIVE, default=0.0, help="Emulated repository bandwidth (Mbit/s).")
@click.option("--fetch-slots", type=int, default=None,
              help="Concurrent repository fetches (default: adapt to the link's latency and bandwidth).")  # fmt: skip
@click.option("--readahead-mib", type=click.IntRange(min=0), default=None,
              help="Fetch this much ahead of a client reading a disk in order (nbdcopy, qemu-img convert); 0: off "
                   "(default: 32 with blocks of 1 MiB and up, off behind --repo-latency-ms/--repo-mbps).")  # fmt: skip
@click.option("--mode", type=click.Choice(["demand-first", "fair", "fifo"]), default="demand-first")
@click.option("--no-chunk-sharing", is_flag=True,
              help="With several points: fetch a chunk they share once per point, not once for all.")  # fmt: skip
@click.option("--access-log", type=click.Path(path_type=Path), default=None, help="JSON-lines log of reads.")
@click.option("--tls-creds", type=click.Path(path_type=Path), default=None,
              help="x509 credentials in QEMU's layout (ca-cert.pem, server-cert.pem, server-key.pem); clients "
                   "must present a certificate from that CA.")  # fmt: skip
@click.option("--tls", "tls_mode", type=click.Choice(["require", "allow"]), default="require", show_default=True,
              help="With --tls-creds: refuse everything but STARTTLS before the upgrade, or also serve plaintext.")  # fmt: skip
@click.option("--insecure", is_flag=True, help="Allow plaintext NBD on an address other than loopback.")
@click.option("--control-token-file", type=click.Path(path_type=Path), default=None,
              help="A file holding the token every control request must carry (needed beyond loopback).")  # fmt: skip
def serve(
    repo_path: str,
    vms: tuple[str, ...],
    point: str | None,
    listen: str,
    control: str | None,
    cache_dir: Path | None,
    writable: bool,
    repo_latency_ms: float,
    repo_mbps: float,
    fetch_slots: int | None,
    readahead_mib: int | None,
    mode: str,
    no_chunk_sharing: bool,
    access_log: Path | None,
    tls_creds: Path | None,
    tls_mode: str,
    insecure: bool,
    control_token_file: Path | None,
) -> None:
    """Serve restore points' disks over NBD as exports VM/DISK (VM@POINT/DISK where one VM is served
    at several points). Several points share one port, one read-cache budget and the repository
    link, fairly: one VM's relocation or background copy does not slow another VM's boot."""
    from liverestore.agent.agent import AgentConfig, MediaAgent
    from liverestore.agent.control import ControlServer
    from liverestore.agent.nbd.tls import TlsPolicy, is_loopback, server_context
    from liverestore.agent.scheduler import Mode

    if fetch_slots is not None and fetch_slots < 2:
        raise LiverestoreError("--fetch-slots must be at least 2 (one slot is kept for guest reads)")
    if point is not None and len(vms) > 1:
        raise LiverestoreError("--point goes with one --vm; name several points as --vm VM@POINT")
    repo = _open_repo(repo_path)
    points = [repo.get_point(*vm_at_point(v, point)) for v in vms]
    unix_path = Path(listen.removeprefix("unix:")) if listen.startswith("unix:") else None
    host, port = ("127.0.0.1", 10809) if unix_path else parse_hostport(listen, 10809)
    # the control endpoint (status, mode switch) has no authentication: loopback unless asked otherwise
    chost, cport = parse_hostport(control, port + 1) if control else ("127.0.0.1", port + 1 if port else 0)
    tls = TlsPolicy(server_context(tls_creds), require=tls_mode == "require") if tls_creds else None
    if unix_path is None and not is_loopback(host) and (tls is None or not tls.require) and not insecure:
        raise LiverestoreError(f"refusing plaintext NBD on {host}: anyone who reaches it reads every disk; give "
                               "--tls-creds DIR (x509), or --insecure on a trusted network")  # fmt: skip
    token = read_token(control_token_file) if control_token_file else None
    if token is None and not is_loopback(chost):
        raise LiverestoreError(f"the control endpoint on {chost} would let anyone read and steer the agent: "
                               "give --control-token-file FILE")  # fmt: skip
    cfg = AgentConfig(
        cache_dir=cache_dir or default_data_dir() / "cache",
        writable=writable,
        repo_latency_ms=repo_latency_ms,
        repo_mbps=repo_mbps,
        fetch_slots=fetch_slots,
        mode=Mode(mode),
        share_chunks=not no_chunk_sharing,
        access_log=access_log,
        tls=tls,
        readahead_bytes=None if readahead_mib is None else readahead_mib * 1024 * 1024,
        keep_reads=False,  # no restore here learns a boot profile from them
    )

    async def main() -> None:
        agent = MediaAgent(repo, points, cfg)
        ctl = ControlServer(agent, token)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = False
        try:
            if unix_path is not None:
                await agent.listen_unix(unix_path)
                where = f"nbd+unix:///{{export}}?socket={unix_path}"
            else:
                bound = await agent.listen(host, port)
                where = f"{'nbds' if tls else 'nbd'}://{host}:{bound}/{{export}}"
            try:
                cbound = await ctl.listen(chost, cport)
            except OSError as e:
                raise LiverestoreError(f"cannot listen on {chost}:{cport} (control): {e.strerror}") from None
            serving = True
            for name in agent.exports:
                click.echo(f"serving {where.format(export=name)}", err=True)
            click.echo(f"status: http://{chost}:{cbound}/status", err=True)
            await stop.wait()
        finally:
            await ctl.close()
            await agent.close()
            if serving:
                metrics = {f"{sp.point.vm}@{sp.point.id}": sp.metrics.as_dict() for sp in agent.served}
                click.echo(json.dumps(metrics if len(metrics) > 1 else agent.metrics.as_dict(), indent=2), err=True)

    asyncio.run(main())


@cli.command()
@click.option("--control", default="127.0.0.1:10810", show_default=True, help="Agent status HOST:PORT.")
@click.option("--token-file", type=click.Path(path_type=Path), default=None, help="The agent's control token.")
def status(control: str, token_file: Path | None) -> None:
    """Show a running agent's counters."""
    host, port = parse_hostport(control, 10810)
    req = urllib.request.Request(f"http://{host}:{port}/status")
    if token_file:
        req.add_header("Authorization", f"Bearer {read_token(token_file)}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            click.echo(r.read().decode())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise LiverestoreError(f"the agent at {host}:{port} refused: wrong or missing --token-file") from None
        raise LiverestoreError(f"the agent at {host}:{port} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LiverestoreError(f"no agent answers at {host}:{port}: {getattr(e, 'reason', e)}") from None


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise LiverestoreError(f"cannot read the token file {path}: {e.strerror}") from None
    if len(token) < 16:
        raise LiverestoreError(f"the token in {path} is shorter than 16 characters")
    return token


@cli.command()
@repo_option
@click.option("--vm", default=None, help="Only this VM's restore points.")
def verify(repo_path: str, vm: str | None) -> None:
    """Re-hash every chunk and check every manifest; exit 1 and name each problem if any."""
    from liverestore.verify import verify_repository

    report = verify_repository(_open_repo(repo_path), vm)
    for problem in report.problems:
        click.echo(f"DAMAGED: {problem}", err=True)
    summary = (
        f"checked {report.points} restore point(s), {report.manifests} manifest(s), "
        f"{report.chunks_checked} chunk(s), {report.bytes_checked / 2**20:.1f} MiB"
    )
    if report.unindexed_packs:
        click.echo(f"{report.unindexed_packs} pack(s) are named by no readable index object: "
                   "'liverestore repair-index' indexes them again", err=True)  # fmt: skip
    if not report.ok:
        raise LiverestoreError(f"{len(report.problems)} problem(s) found; {summary}")
    click.echo(f"ok: {summary}")


@cli.command("repair-index")
@repo_option
@click.option("--dry-run", is_flag=True, help="Only say what would be indexed and removed.")
def repair_index(repo_path: str, dry_run: bool) -> None:
    """Rebuild the index from the packs after an index object was lost or damaged."""
    from liverestore.progress import byte_progress
    from liverestore.repository.repair import repair_index as run_repair

    repo = _open_repo(repo_path)
    with byte_progress("repair-index", counts=True) as show:
        r = run_repair(repo, apply=not dry_run, progress=lambda done, total: show("packs", done, total))
    for line in r.unreadable_packs:
        click.echo(f"UNREADABLE: {line}", err=True)
    if dry_run:
        click.echo(f"would index {r.packs_indexed} pack(s) holding {r.chunks_indexed} chunk(s) that no readable "
                   f"index object names, and remove {len(r.damaged)} damaged index object(s)")  # fmt: skip
    else:
        click.echo(f"indexed {r.packs_indexed} pack(s) holding {r.chunks_indexed} chunk(s) that no readable index "
                   f"object named; removed {r.damaged_removed} of {len(r.damaged)} damaged index object(s)")  # fmt: skip
    if not r.ok:
        kept = (f"the {len(r.damaged)} damaged index object(s) stay until they can (chunks they named may be there)"
                if r.damaged else "every other pack is indexed")  # fmt: skip
        raise LiverestoreError(f"{len(r.unreadable_packs)} pack(s) could not be read (UNREADABLE above); {kept}")


@cli.command()
@repo_option
@click.option("--vm", required=True, help="The VM whose restore points to thin out.")
@click.option("--keep-last", type=int, default=0, help="Keep the newest N points.")
@click.option("--keep-daily", type=int, default=0, help="Keep the newest point of each of the last N days.")
@click.option("--keep-weekly", type=int, default=0, help="Keep the newest point of each of the last N weeks.")
@click.option("--apply", is_flag=True, help="Forget them (default: only show what would go).")
def forget(repo_path: str, vm: str, keep_last: int, keep_daily: int, keep_weekly: int, apply: bool) -> None:
    """Forget restore points a retention policy does not keep (then 'prune' frees their data)."""
    from liverestore.retention import forget as run_forget

    plan = run_forget(_open_repo(repo_path), vm, keep_last, keep_daily, keep_weekly, apply)
    for p, why in plan.keep:
        click.echo(f"keep    {p.id}  {_when(p.record.created)}  ({why})")
    for p in plan.forget:
        click.echo(f"{'forgot' if apply else 'forget'}  {p.id}  {_when(p.record.created)}")
    if plan.forget and not apply:
        click.echo(f"dry run: {len(plan.forget)} point(s) would be forgotten; add --apply", err=True)


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@cli.command()
@repo_option
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def prune(repo_path: str, dry_run: bool) -> None:
    """Delete the manifests and chunks no restore point (and no serving agent) references."""
    from liverestore.retention import prune as run_prune

    r = run_prune(_open_repo(repo_path), apply=not dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {r.chunks_deleted} chunk(s) ({r.bytes_deleted / 2**20:.1f} MiB) and {r.manifests_deleted} "
               f"manifest(s); kept {r.chunks_kept} chunk(s) and {r.manifests_kept} manifest(s) of {r.points} point(s)"
               + (f"; {r.packs_deleted} pack(s) removed, {r.packs_repacked} of them repacked" if r.packs_deleted else "")
               + (f", {r.held_by_leases} manifest(s) only for serving agents" if r.held_by_leases else ""))  # fmt: skip


@cli.group()
def cache() -> None:
    """List or prune read-caches (one per VM and restore point)."""


cache_dir_option = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                                help="Cache root (default: the data dir's cache/).")  # fmt: skip


@cache.command("list")
@cache_dir_option
def cache_list(cache_dir: Path | None) -> None:
    from liverestore.cachedirs import list_caches

    root = cache_dir or default_data_dir() / "cache"
    entries = list_caches(root)
    if not entries:
        click.echo(f"no read-caches in {root}")
    for e in entries:
        click.echo(f"{e.path.name:40} {e.bytes / 2**20:10.1f} MiB  idle {e.idle_s / 3600:7.1f} h"
                   f"{'  IN USE' if e.in_use else ''}")  # fmt: skip


@cache.command("prune")
@cache_dir_option
@click.option("--older-than", default="0", show_default=True,
              help="Only caches idle at least this long (e.g. 12h, 7d; plain number: hours).")  # fmt: skip
def cache_prune(cache_dir: Path | None, older_than: str) -> None:
    """Remove read-caches no agent or restore is using (a cache in use is never touched)."""
    from liverestore.cachedirs import parse_age, prune_caches

    root = cache_dir or default_data_dir() / "cache"
    removed, kept_in_use, freed = prune_caches(root, parse_age(older_than))
    click.echo(f"removed {len(removed)} read-cache(s), {freed / 2**20:.1f} MiB freed; "
               f"{kept_in_use} in use and kept")  # fmt: skip


def main() -> None:
    from liverestore.commands_restore import profile, restore
    from liverestore.demo import demo

    cli.add_command(restore)
    cli.add_command(profile)
    cli.add_command(demo)
    run_cli(cli)


def run_cli(group: Callable[..., Any]) -> None:
    """Turn every expected failure into one line and an exit code; never a traceback."""
    try:
        group(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("liverestore: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("liverestore: interrupted", err=True)
        sys.exit(130)
    except LiverestoreError as e:
        click.echo(f"liverestore: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(
            f"liverestore: error: {e.filename or ''}: {e.strerror or e}".replace(": : ", ": "), err=True
        )
        sys.exit(1)
    except Exception as e:  # a bug: still one line, with a way to see more
        if os.environ.get("LIVERESTORE_DEBUG"):
            raise
        click.echo(
            f"liverestore: internal error: {type(e).__name__}: {e} (set LIVERESTORE_DEBUG=1 for details)",
            err=True,
        )
        sys.exit(70)
