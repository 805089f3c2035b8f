"""Build a BIOS-bootable raw disk from Debian packages, without root and without mounts.

Layout: MBR (syslinux mbr.bin + a partition table written here) → p1 FAT16 with syslinux, the
Debian cloud kernel and an initramfs → p2 ext4 holding a payload of real files (kernel modules)
and their MD5SUMS. The guest verifies the payload at boot, which gives a realistic boot read
pattern (~100 MB, mostly sequential), then prints BOOT-OK on the serial console.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from liverestore.diskimage import data_ranges
from liverestore.errors import LiverestoreError
from liverestore.testvm.cpio import NewcWriter

log = logging.getLogger("liverestore.testvm")

MiB = 1 << 20
BOOT_PART_START = 1 * MiB
BOOT_PART_SIZE = 40 * MiB
VIRTIO_MODULES = (
    "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci", "virtio_blk",
    "failover", "net_failover", "virtio_net",  # the NIC, so a restored VM shows its MAC
    "button", "evdev",  # the ACPI power button, so a shutdown request is obeyed
)  # fmt: skip
MARKER_BOOT = "BOOT-OK"
KERNEL_CMDLINE = "console=ttyS0 loglevel=3 panic=-1"


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    size: int
    payload_bytes: int
    payload_files: int
    data_partition_offset: int
    data_partition_size: int


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise LiverestoreError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(r.returncode)}")


def fetch_materials(cache: Path) -> Path:
    """Kernel, busybox and syslinux bits, extracted from Debian packages into ``cache/root``."""
    root = cache / "root"
    if (root / ".complete").exists():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True,
                       check=False)  # fmt: skip
    kernel_pkgs = [ln.split()[-1] for ln in r.stdout.splitlines() if "Depends: linux-image-" in ln]
    if not kernel_pkgs:
        raise LiverestoreError("cannot find the Debian cloud kernel package (run 'apt-get update' first)")
    _run(
        ["apt-get", "download", kernel_pkgs[0], "busybox-static", "syslinux-common"], "apt-get download", debs
    )
    tmp_root = cache / "root.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tmp_root)], f"unpacking {deb.name}")
    shutil.rmtree(root, ignore_errors=True)
    tmp_root.rename(root)
    (root / ".complete").touch()
    return root


def _kernel(root: Path) -> tuple[Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LiverestoreError(f"no kernel in {root}/boot")
    return kernels[-1], kernels[-1].name.removeprefix("vmlinuz-")


def build_initramfs(root: Path, version: str, out: Path) -> None:
    init = importlib.resources.files("liverestore.testvm").joinpath("guest_init.sh").read_bytes()
    moddir = root / "lib" / "modules" / version / "kernel"
    with open(out, "wb") as f:
        w = NewcWriter(f)
        for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
            w.directory(d)
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3)
        w.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", init, 0o755)
        for m in VIRTIO_MODULES:
            found = list(moddir.rglob(f"{m}.ko*"))
            if not found or found[0].suffix != ".ko":
                raise LiverestoreError(
                    f"kernel module {m}.ko not found (compressed modules are not supported)"
                )
            w.file(f"lib/modules/{m}.ko", found[0].read_bytes())
        w.finish()


def _payload(root: Path, target_bytes: int, dest: Path) -> tuple[int, int]:
    """Copy real files (the kernel's module tree, then the rest) until ``target_bytes``; write MD5SUMS."""
    sources = sorted(
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".complete"
    )
    payload = dest / "payload"
    payload.mkdir(parents=True)
    sums, total, i = [], 0, 0
    while total < target_bytes:
        src = sources[i % len(sources)]
        rel = f"{i // len(sources)}/{src.relative_to(root)}"
        i += 1
        data = src.read_bytes()
        if i > len(sources):  # second lap: make the copy unique so dedup cannot hide the reads
            data = data + rel.encode()
        (payload / rel).parent.mkdir(parents=True, exist_ok=True)
        (payload / rel).write_bytes(data)
        sums.append(f"{hashlib.md5(data).hexdigest()}  {rel}\n")
        total += len(data)
    (dest / "MD5SUMS").write_text("".join(sums))
    return total, len(sums)


def _mbr(disk_size: int) -> bytes:
    mbr_bin = None
    for cand in (Path("/usr/lib/SYSLINUX/mbr.bin"), Path("/usr/lib/syslinux/mbr/mbr.bin")):
        if cand.exists():
            mbr_bin = cand.read_bytes()[:440]
            break
    if mbr_bin is None:
        raise LiverestoreError("syslinux mbr.bin not found (install the syslinux package)")
    s1, n1 = BOOT_PART_START // 512, BOOT_PART_SIZE // 512
    s2 = s1 + n1
    n2 = disk_size // 512 - s2

    def entry(boot: bool, ptype: int, start: int, count: int) -> bytes:
        chs = b"\xfe\xff\xff"  # LBA only
        return struct.pack("<B3sB3sII", 0x80 if boot else 0, chs, ptype, chs, start, count)

    table = entry(True, 0x06, s1, n1) + entry(False, 0x83, s2, n2) + bytes(32)
    return mbr_bin.ljust(440, b"\0") + b"\x4c\x52\x56\x4d\0\0" + table + b"\x55\xaa"


def _copy_into(src: Path, dst_fd: int, offset: int) -> None:
    """Copy only the data ranges of a sparse image into the disk, keeping the disk sparse."""
    with open(src, "rb") as f:
        for start, end in data_ranges(f.fileno(), os.fstat(f.fileno()).st_size):
            for pos in range(start, end, 8 * MiB):
                n = min(end - pos, 8 * MiB)
                os.pwrite(dst_fd, os.pread(f.fileno(), n, pos), offset + pos)


def build_test_vm(
    out: Path, size: int = 512 * MiB, payload_mb: int = 90, cold_mb: int = 0, cache: Path | None = None
) -> BuiltImage:
    """Build ``out`` (raw). ``cold_mb`` adds data the guest never reads at boot: what relocation
    (sets 2 and 3) has to bring over on its own. Packages are fetched once into ``cache``."""
    cache = (
        cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liverestore" / "testvm"
    )
    data_size = size - BOOT_PART_START - BOOT_PART_SIZE
    if data_size < (payload_mb + cold_mb) * MiB * 1.3 + 16 * MiB:
        raise LiverestoreError(
            f"a {size // MiB} MiB disk is too small for {payload_mb + cold_mb} MB of files"
        )
    root = fetch_materials(cache)
    kernel, version = _kernel(root)
    with tempfile.TemporaryDirectory(prefix="liverestore-testvm-") as tmpd:
        tmp = Path(tmpd)
        build_initramfs(root, version, tmp / "initrd.img")
        (tmp / "syslinux.cfg").write_text(
            f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.img\n"
            f"  APPEND {KERNEL_CMDLINE}\n"
        )
        shutil.copyfile(kernel, tmp / "vmlinuz")
        boot = tmp / "boot.img"
        _run(["mkfs.fat", "-F16", "-h", str(BOOT_PART_START // 512), "-n", "LRBOOT", "-C", str(boot),
              str(BOOT_PART_SIZE // 1024)], "mkfs.fat")  # fmt: skip
        _run(["mcopy", "-i", str(boot), str(tmp / "vmlinuz"), str(tmp / "initrd.img"), str(tmp / "syslinux.cfg"),
              "::/"], "mcopy")  # fmt: skip
        _run(["syslinux", "--install", str(boot)], "syslinux --install")
        content = tmp / "data"
        payload_bytes, payload_files = _payload(root, payload_mb * 1_000_000, content)
        if cold_mb:
            (content / "cold").mkdir()
            for i in range(cold_mb):
                (content / "cold" / f"{i:04d}.bin").write_bytes(os.urandom(MiB))
        data = tmp / "data.img"
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "lrdata", "-E", "root_owner=0:0",
              "-d", str(content), str(data), str(data_size // 1024) + "k"], "mke2fs")  # fmt: skip
        part_tmp = out.with_name(f".{out.name}.partial")
        fd = os.open(part_tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, _mbr(size), 0)
            _copy_into(boot, fd, BOOT_PART_START)
            _copy_into(data, fd, BOOT_PART_START + BOOT_PART_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part_tmp, out)
    img = BuiltImage(out, size, payload_bytes, payload_files, BOOT_PART_START + BOOT_PART_SIZE, data_size)
    log.info("built test VM %s: %s", out, json.dumps({"size": size, "payload_bytes": payload_bytes}))
    return img
