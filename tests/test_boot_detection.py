"""Without a boot marker the guest is "up" when its reads from backup go quiet, and the report
says so; a second restore on the same read-cache says the cache was warm."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport
from tests.vmfixtures import VmBackup


def test_reads_going_quiet_end_the_boot_and_a_warm_cache_is_reported(vm_backup: VmBackup, tmp_path: Path) -> None:
    repo = vm_backup.open_repo()

    def restore(run: int) -> tuple[RestoreReport, str]:
        opts = RestoreOptions(vm="testvm", dest=tmp_path / f"d{run}", cache_dir=tmp_path / "cache",
                              relocate=False, use_profile=False, record_profile=False, background_prefetch=False,
                              boot_marker=None, boot_window_s=120, hypervisor="qemu")  # fmt: skip

        async def go() -> tuple[RestoreReport, str]:
            job = InstantRestore(repo, opts)
            try:
                report = await job.run()
                assert job.vm is not None
                return report, job.vm.serial_output()
            finally:
                await job.close()

        return asyncio.run(go())

    # the default quiet time (8 s): under TCG this guest's kernel decompresses for about 3.5 s
    # without a read between its loader's reads and its own, which a 3 s threshold took for "up"
    first, serial = restore(1)
    assert first.boot_detected_by == "guest reads quiet for 8 s", first.boot_detected_by
    assert "BOOT-OK" in serial, "the guest must really be up when reads go quiet"
    assert first.boot_after_launch_s < 60, "boot ends at the last read, not at the 120 s window"
    assert first.cache_start == "cold" and first.cache_blocks_at_start == 0

    second, _ = restore(2)
    # every block the first restore fetched is in the cache the second one starts from (a count of
    # blocks, not of reads: with readahead, more of the first boot's reads hit)
    assert second.cache_start == "warm" and second.cache_blocks_at_start >= first.blocks_fetched > 0
    assert second.hit_rate > first.hit_rate


def test_a_marker_that_never_comes_names_the_console_log_and_the_guests_last_line(tmp_path: Path) -> None:
    """At 3 a.m. the error says where to look: a guest that hung, one still busy, and one that never
    received its command differ by their last line."""
    from liverestore.errors import LiverestoreError
    from liverestore.hypervisor.console import wait_for_marker

    log = tmp_path / "serial.log"
    log.write_text("BOOT-OK\nverify\nHEARTBEAT 7\n")
    try:
        asyncio.run(wait_for_marker(log, "VERIFY-OK", 0.2, len("BOOT-OK\n"), lambda: True))
    except LiverestoreError as e:
        assert str(e) == (f"the VM did not print VERIFY-OK within 0 s (console log {log}; "
                          "its last line since then: 'HEARTBEAT 7')")  # fmt: skip
    else:
        raise AssertionError("a marker that never came was reported found")
    log.write_text("BOOT-OK\n")
    with pytest.raises(LiverestoreError, match=r"its last line since then: nothing\)$"):
        asyncio.run(wait_for_marker(log, "VERIFY-OK", 0.1, len("BOOT-OK\n"), lambda: True))
