"""Reading source disks (raw or qcow2) as a stream of fixed-size blocks, skipping holes cheaply."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from liverestore.errors import DiskFormatError

SUPPORTED_FORMATS = ("raw", "qcow2")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


QCOW2_SUFFIXES = (".qcow2", ".qcow", ".qcow2c")


def probe_format(path: Path, declared: str | None = None) -> tuple[str, int]:
    """Ask qemu-img what the file is: (format, virtual size). What the file holds must agree with
    ``declared`` (``--format``) or, without one, with its name: a ``.qcow2`` file of raw bytes is
    a mistake to stop at, not a raw disk to back up (a damaged header would read the same)."""
    if not path.is_file():
        raise DiskFormatError(f"disk {path} does not exist or is not a regular file")
    if shutil.which("qemu-img") is None:
        raise DiskFormatError("qemu-img is not installed (run ./setup.sh)")
    r = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise DiskFormatError(f"disk {path} cannot be read: {_last_line(r.stderr)}")
    info = json.loads(r.stdout)
    fmt = str(info.get("format"))
    if fmt not in SUPPORTED_FORMATS:
        raise DiskFormatError(f"disk {path} is in {fmt} format; only raw and qcow2 are supported")
    expected = declared or ("qcow2" if path.suffix.lower() in QCOW2_SUFFIXES else None)
    if expected is not None and fmt != expected:
        hint = "give --format raw if raw is right" if fmt == "raw" else f"give --format {fmt} if that is right"
        raise DiskFormatError(f"disk {path} {'is declared' if declared else 'is named'} {expected} but holds "
                              f"{fmt} data; refusing to guess ({hint})")  # fmt: skip
    # raw: the file's own size (qemu-img rounds it up to a sector, which we would then fail to read)
    return fmt, path.stat().st_size if fmt == "raw" else int(info["virtual-size"])


@contextmanager
def open_as_raw(path: Path, declared: str | None = None) -> Iterator[tuple[Path, str, int]]:
    """Yield a raw view of the disk. qcow2 is converted to a sparse temp file first: reading through
    qemu-img keeps us out of the qcow2 format business and catches truncated or corrupt images."""
    fmt, size = probe_format(path, declared)
    if fmt == "raw":
        yield path, fmt, size
        return
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless for reading
        try:
            found = f"{json.loads(check.stdout).get('corruptions', '?')} corruptions"
        except ValueError:
            found = _last_line(check.stderr)
        raise DiskFormatError(
            f"qcow2 disk {path} is damaged ({found} per qemu-img check); refusing to back it up"
        )
    with tempfile.TemporaryDirectory(prefix="liverestore-backup-") as tmp:
        raw = Path(tmp) / "disk.raw"
        r = subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "4k", str(path), str(raw)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise DiskFormatError(f"qcow2 disk {path} cannot be read: {_last_line(r.stderr)}")
        yield raw, fmt, size


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges that may hold data, via SEEK_DATA/SEEK_HOLE; the whole file if unsupported."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def iter_blocks(fd: int, size: int, block_size: int) -> Iterator[tuple[int, bytes | None]]:
    """(index, bytes) for every block touching a data range; None marks a block known to be a hole."""
    next_index = 0
    for start, end in data_ranges(fd, size):
        first, last = start // block_size, (end - 1) // block_size
        for idx in range(max(first, next_index), last + 1):
            length = min(block_size, size - idx * block_size)
            data = os.pread(fd, length, idx * block_size)
            if len(data) != length:
                raise DiskFormatError(f"short read at block {idx}: the disk changed while being read")
            yield idx, data
        next_index = max(next_index, last + 1)
