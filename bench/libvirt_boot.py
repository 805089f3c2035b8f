"""Time to boot under libvirt: the same domain from its local disk vs instantly from backup.

A libvirt domain made from the test VM (2 vCPUs, 768 MiB, virtio disk) is booted from its local
disk (the floor), backed up with its definition, then instant-restored into libvirt from an
emulated slow repository (10 ms per fetch): without a profile (which records one), and with it.
The runs alternate and each median is taken, since these machines are noisy. Target (issue
"Restore the real VM"): with the profile, within 1.3x of the local boot.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.boot import instant_boot
from bench.common import MiB, bar_chart, write_results
from liverestore.backup import run_backup
from liverestore.backup_libvirt import plan_domain_backup
from liverestore.hypervisor.libvirt_driver import open_connection
from liverestore.hypervisor.vmspec import DiskSource, parse_domain, render_domain
from liverestore.repository import Repository
from liverestore.testvm import build_test_vm
from liverestore.testvm.builder import MARKER_BOOT
from liverestore.testvm.domain import make_domain_xml

COLD_MB = 250
LATENCY_MS = 10.0
SETTING = {"name": "10ms", "latency_ms": LATENCY_MS, "mbps": 0.0}


def _boot_local(xml: str, disk: Path, work: Path) -> float:
    """Seconds from starting the domain (transient, the same definition) to its boot marker."""
    log = work / "local-serial.log"
    log.unlink(missing_ok=True)
    conn = open_connection()
    try:
        spec = parse_domain(xml)
        t0 = time.monotonic()
        dom = conn.createXML(render_domain(spec, {"vda": DiskSource(disk)}, serial_log=log), 0)
        try:
            deadline = t0 + 600
            while MARKER_BOOT not in (log.read_text(errors="replace") if log.exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError("the local boot did not reach its marker")
                time.sleep(0.02)
            return time.monotonic() - t0
        finally:
            dom.destroy()
    finally:
        conn.close()


def run(quick: bool) -> dict[str, Any]:
    reps = 2 if quick else 5
    base = Path("/var/tmp")
    with tempfile.TemporaryDirectory(prefix="bench-libvirt-", dir=base) as tmpd:
        work = Path(tmpd)
        work.chmod(0o755)
        name = f"lrbench-{uuid.uuid4().hex[:6]}"
        image = build_test_vm(work / "vda.raw", size=2048 * MiB, payload_mb=90, cold_mb=COLD_MB)
        xml = make_domain_xml(name, image.path)
        conn = open_connection()
        try:
            conn.defineXML(xml)
            plan = plan_domain_backup("qemu:///system", name)
            repo = Repository.init(work / "repo", block_size=64 * 1024)
            run_backup(repo, plan.vm, plan.disk_paths, [], disk_names=plan.disk_names, extra_configs=plan.configs)
            stored = conn.lookupByName(name)
            full_xml = stored.XMLDesc(0)
            stored.undefine()
        finally:
            conn.close()
        local, no_profile, with_profile = [], [], []
        for i in range(reps):
            local.append(_boot_local(full_xml, image.path, work))
            repo.delete_profile(name)
            no_profile.append(asyncio.run(instant_boot(repo, work, f"cold{i}", SETTING, False, name, "libvirt")))
            with_profile.append(asyncio.run(instant_boot(repo, work, f"warm{i}", SETTING, True, name, "libvirt")))
            print(f"libvirt boot rep {i}: local {local[-1]:.2f} s, instant no profile {no_profile[-1]:.2f} s, "
                  f"instant + profile {with_profile[-1]:.2f} s", flush=True)  # fmt: skip
        repo.close()
    d, b, c = (round(statistics.median(x), 3) for x in (local, no_profile, with_profile))
    r = {"local_s": d, "no_profile_s": b, "profile_s": c, "profile_over_local": round(c / d, 2),
         "profile_over_no_profile": round(c / b, 2), "target_profile_over_local": 1.3,
         "runs": {"local": local, "no_profile": no_profile, "profile": with_profile}}  # fmt: skip
    bar_chart("libvirt_boot", "libvirt: time to boot (s), median", ["time to boot"], {
        "local disk": [d], "instant, no profile": [b], "instant + profile": [c]}, "seconds")  # fmt: skip
    notes = (
        f"A libvirt domain (type qemu, TCG; 2 vCPUs, 768 MiB, 2 GiB virtio disk holding 90 MB read at boot and "
        f"{COLD_MB} MB of cold data) booted until its console prints BOOT-OK. Local: libvirt starts the same "
        "definition on the local disk. Instant: `restore --hypervisor libvirt` from a repository with 64 KiB "
        f"blocks and {LATENCY_MS:g} ms emulated latency per fetch, timed from the start of the restore (plan, "
        f"profile prefetch and launch included). Median of {reps} alternating runs each."
    )
    write_results("libvirt_boot", r, [[d, b, c, r["profile_over_local"], r["profile_over_no_profile"]]],
                  ["local s", "instant, no profile s", "instant + profile s", "profile / local",
                   "profile / no profile"], notes)  # fmt: skip
    return r
