"""A byte range of a local file, mapped into memory instead of read into a new buffer.

Reading a ranged pack read with ``read`` copies it from the page cache into a fresh buffer, and on
this kind of host the fresh memory costs more than the copy: alone, reading the 512 MiB of packs
of 1 GiB of data (8 MiB ranges) took 0.36-0.47 s of CPU, the same reads into a reused buffer
0.20-0.32 s, and mapping them 0.007 s. Within a cold read the saving is smaller, as the pages
mapped are still touched once by zstd: reading and decoding that GiB took 0.64-0.77 s of CPU
instead of 0.76-0.86 s, and a whole cold read through the agent 1.80 s instead of 1.86 s (fetch
threads 1.52 s of CPU instead of 1.62 s). zstd and BLAKE3 read the chunks straight from the
mapped page cache; nothing of the mapping outlives the read (every chunk is decompressed into its
own buffer).

A mapping has one hazard a read has not: a page that cannot be read (an I/O error, a file cut
short under it) raises SIGBUS where the reader touches it, which would kill the agent. So the
range is read in when mapped, with ``MADV_POPULATE_READ`` (Linux 5.14), which reports such a page
as an error instead; then the range is read with ``pread`` after all, and its error is reported
as any read's. Only a page the kernel evicts between that read-in and its use (the decoding that
follows at once) and then fails to read again could still raise it. A kernel without
``MADV_POPULATE_READ`` gets ``pread`` only, as do small ranges, where mapping costs more system
calls than the copy it saves. The mapping is private (copy-on-write, never written: nothing could
reach the pack) and handed out read-only, and its read-in lets go of the GIL (``_populate``); a
system whose overcommit policy refuses the private mapping gets ``pread`` as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

from liverestore.libc import last_error, libc_function

MAP_MIN_BYTES = 256 * 1024  # below this a copy is cheaper than mmap + madvise + munmap
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value; Python 3.11 lacks the name
_kernel_populates = True  # False once the kernel has refused MADV_POPULATE_READ
# madvise(2) through ctypes, which lets go of the GIL for the call; ``mmap.madvise`` holds it.
_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)


@contextlib.contextmanager
def file_range(fd: int, offset: int, length: int) -> Iterator[bytes | memoryview]:
    """Bytes [offset, offset + length) of the open file ``fd``, valid until the context closes;
    short when the file ends sooner, as ``pread`` is. ``OSError`` as ``pread`` raises it."""
    mapping = _mapped(fd, offset, length)
    if mapping is None:
        yield _pread_all(fd, offset, length)
        return
    m, skip = mapping
    base = memoryview(m)
    view = base[skip:].toreadonly()  # the mapping is copy-on-write: nobody writes to it by mistake
    try:
        yield view
    finally:
        view.release()
        base.release()
        with contextlib.suppress(BufferError):  # a slice still held: unmapped when it is let go
            m.close()


def _mapped(fd: int, offset: int, length: int) -> tuple[mmap.mmap, int] | None:
    """The range mapped and read in, with where it starts in the mapping; None where ``pread``
    should be used instead (small, empty, unmappable, unreadable, or an older kernel)."""
    global _kernel_populates
    if not _kernel_populates or length < MAP_MIN_BYTES:
        return None
    end = min(offset + length, os.fstat(fd).st_size)
    if end <= offset:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        # copy-on-write, never written: the pages are the page cache's, and no write through
        # the mapping could ever reach the repository's file (ctypes needs a writable buffer
        # to tell the mapping's address)
        m = mmap.mmap(fd, end - start, access=mmap.ACCESS_COPY, offset=start)
    except (OSError, ValueError):
        return None
    try:
        _populate(m, end - start)
    except OSError as e:
        m.close()
        if e.errno == errno.EINVAL:  # the kernel does not know it (before 5.14)
            _kernel_populates = False
        return None  # an I/O error or a file cut short: pread meets it and reports it
    return m, offset - start


def _populate(m: mmap.mmap, length: int) -> None:
    """Read the mapping in (``MADV_POPULATE_READ``) with the GIL let go. ``mmap.madvise`` keeps
    it for the call, and reading in an 8 MiB range of a pack took 1.3 ms (up to 2.7) even from
    the page cache, time in which the event loop and every other fetch thread stood still: about
    170 ms per GiB read at 1 MiB blocks. Side by side, a cold read of 1 GiB at 1 MiB blocks took
    1.65 s against 1.72 s and 1.64 s against 1.69 s (7 rounds each); at 64 KiB blocks, where runs
    are shorter, 3.19 s against 3.24 s. Raises ``OSError`` as ``mmap.madvise`` does."""
    if _madvise is None:  # no C library to call: the GIL is held, the result is the same
        m.madvise(_MADV_POPULATE_READ)
        return
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor  # the export ends here; the mapping stays until ``m`` is closed
    if _madvise(address, length, _MADV_POPULATE_READ) != 0:
        raise last_error()


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        got = os.pread(fd, length, offset)
        if not got:
            break
        parts.append(got)
        offset += len(got)
        length -= len(got)
    return parts[0] if len(parts) == 1 else b"".join(parts)
