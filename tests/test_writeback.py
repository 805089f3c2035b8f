"""Write-back of a relocation's destinations while the copy runs (writeback.py): the kernel is
asked to start writing dirty pages, so QEMU's flush before "ready" finds little left."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from liverestore.writeback import start_writeback
from tests.helpers import MiB


def _dirty_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty: line in /proc/meminfo")


def test_dirty_pages_of_a_destination_go_to_disk_when_asked_and_missing_files_are_skipped(tmp_path: Path) -> None:
    """Left alone, the kernel keeps a file's dirty pages for 30 s (dirty_expire_centisecs) on a
    host below its background threshold; asked, it writes them out within moments."""
    dest = tmp_path / "vm-vda.raw.partial"
    block = os.urandom(MiB)
    before = _dirty_bytes()
    with open(dest, "wb") as f:
        for _ in range(192):
            f.write(block)
    written = _dirty_bytes()
    if written - before < 128 * MiB:
        pytest.skip(f"the kernel wrote the file back on its own (Dirty {before >> 20} -> {written >> 20} MiB)")

    assert start_writeback([tmp_path / "not-created-yet.raw", dest]) == 1  # the missing one is skipped
    deadline = time.monotonic() + 10
    while _dirty_bytes() > written - 128 * MiB:
        assert time.monotonic() < deadline, f"still {_dirty_bytes() >> 20} MiB dirty after asking"
        time.sleep(0.05)
    assert dest.stat().st_size == 192 * MiB  # a hint only: the file is as it was written
