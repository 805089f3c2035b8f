"""Ranged pack reads from a local repository map the file instead of copying it: the bytes are
those ``pread`` returns, short where the file ends, released when the read is done, and a pack
cut short under its index still names the chunks it lost and serves the others."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from liverestore.backup import run_backup
from liverestore.errors import IntegrityError
from liverestore.repository import Repository, mapped
from liverestore.repository.chunkstore import Want, plan_runs
from tests.helpers import MiB
from tests.packs import chunk_file


@pytest.fixture()
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(3 * MiB + 123)
    path = tmp_path / "pack"
    path.write_bytes(data)
    return path, data


RANGES = [
    (0, 1 * MiB),  # mapped from the start
    (4097, 2 * MiB),  # mapped from a page boundary below the offset
    (2 * MiB + 512 * 1024, 1 * MiB),  # runs past the end: short, as pread is
    (100, 1000),  # small: read, not mapped
    (3 * MiB + 200, 1 * MiB),  # starts past the end: nothing
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
def test_a_range_reads_what_pread_reads(data_file: tuple[Path, bytes], offset: int, length: int) -> None:
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped.file_range(fd, offset, length) as got:
            assert bytes(got) == data[offset : offset + length] == os.pread(fd, length, offset)
            is_mapped = isinstance(got, memoryview) and isinstance(got.obj, mmap.mmap)
            assert is_mapped == (length >= mapped.MAP_MIN_BYTES and offset < len(data))
    finally:
        os.close(fd)


def test_a_mapping_is_let_go_when_its_read_is_done_even_with_a_slice_still_held(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped.file_range(fd, 0, 2 * MiB) as got:
            assert isinstance(got, memoryview)
            kept = got[MiB : MiB + 16]  # a reader that held on to a piece
        with pytest.raises(ValueError):
            got[0]  # the range itself is released
        assert bytes(kept) == data[MiB : MiB + 16]  # the piece stays readable: unmapped once it goes
        kept.release()
    finally:
        os.close(fd)


def test_without_the_kernels_read_in_every_range_is_read(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel before 5.14 refuses MADV_POPULATE_READ: ranges are then read with pread, not mapped
    where a bad page would raise SIGBUS instead of an error."""
    path, data = data_file
    monkeypatch.setattr(mapped, "_kernel_populates", False)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped.file_range(fd, 4097, 2 * MiB) as got:
            assert isinstance(got, bytes) and got == data[4097 : 4097 + 2 * MiB]
    finally:
        os.close(fd)


def test_a_mapped_range_is_read_in_by_the_c_librarys_madvise_and_cannot_be_written(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-in goes through ctypes (which lets go of the GIL; ``mmap.madvise`` holds it for
    the whole read-in, 1-3 ms per 8 MiB, with the event loop standing still), over the whole
    mapping; the copy-on-write mapping is handed out read-only."""
    path, data = data_file
    assert mapped._madvise is not None  # glibc on Linux: the GIL-free path is the one taken
    calls: list[tuple[int, int]] = []
    real = mapped._madvise

    def counted(address: int, length: int, advice: int) -> int:
        calls.append((length, advice))
        return int(real(address, length, advice))

    monkeypatch.setattr(mapped, "_madvise", counted)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped.file_range(fd, 4097, 2 * MiB) as got:
            assert isinstance(got, memoryview) and got.readonly
            assert bytes(got) == data[4097 : 4097 + 2 * MiB]
            with pytest.raises(TypeError):
                got[0:1] = b"x"
            mapping = got.obj
        assert isinstance(mapping, mmap.mmap) and mapping.closed  # nothing left exported by the read-in
    finally:
        os.close(fd)
    start = 4097 - 4097 % mmap.ALLOCATIONGRANULARITY  # the page boundary below the offset
    assert calls == [(4097 + 2 * MiB - start, mapped._MADV_POPULATE_READ)]
    assert path.read_bytes() == data


def test_a_read_in_the_kernel_refuses_falls_back_to_pread_for_good(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from madvise (a kernel before 5.14 does not know MADV_POPULATE_READ; here an advice
    no kernel knows) comes back through ctypes' errno: the range is read, and so are the next."""
    path, data = data_file
    monkeypatch.setattr(mapped, "_MADV_POPULATE_READ", 4321)
    monkeypatch.setattr(mapped, "_kernel_populates", True)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped.file_range(fd, 0, 2 * MiB) as got:
            assert isinstance(got, bytes) and got == data[: 2 * MiB]
        assert mapped._kernel_populates is False
    finally:
        os.close(fd)


def test_a_pack_cut_short_names_the_chunks_it_lost_and_serves_the_rest(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", block_size=64 * 1024)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(random.Random(3).randbytes(4 * MiB))
    point, _ = run_backup(repo, "vm", [disk], [])
    manifest = repo.load_manifest(point.record.disks[0])
    cids = [c for c in manifest.blocks if c]
    index = repo.chunks.reload()
    wants = [Want(c, 64 * 1024, loc) for c in cids if (loc := index.get(c)) is not None]
    [run] = [r for r in plan_runs(wants) if len(r) > 8]  # one ranged read of the whole pack
    assert sum(w.where.length for w in run) >= mapped.MAP_MIN_BYTES  # so it is mapped
    pack, _, _ = chunk_file(repo, run[-1].cid)
    os.truncate(pack, run[-3].where.offset + 10)  # the last three chunks lose their bytes

    got = repo.chunks.load_run(run)
    for w, r in zip(run[:-3], got[:-3], strict=True):
        assert not isinstance(r, Exception) and len(r[0]) == 64 * 1024, w.cid
    original = disk.read_bytes()
    first_block = next(i for i in range(manifest.block_count) if manifest.blocks[i] == run[0].cid)
    assert not isinstance(got[0], Exception)
    assert got[0][0] == original[first_block * 64 * 1024 : (first_block + 1) * 64 * 1024]
    for w, r in zip(run[-3:], got[-3:], strict=True):
        assert isinstance(r, IntegrityError) and "truncated" in str(r) and w.cid in str(r)
