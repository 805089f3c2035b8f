"""Keep glibc's allocator from holding the agent's transient buffers as resident memory.

The agent decodes blocks in a pool of fetch threads. glibc gives each thread that allocates its
own arena (up to 8 per core) and keeps freed memory there; a ranged read of a few MiB freed by one
thread stays resident in that thread's arena, so RSS grew with the thread count rather than with
the disk (82 MiB instead of 58 MiB for a 1 GiB disk in the memory benchmark). Two arenas are
plenty for threads that spend their time in zstd, BLAKE3 and system calls. ``mallopt`` changes
it at run time, before the pool starts; on a C library without it this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

from liverestore.libc import libc_function

log = logging.getLogger("liverestore.malloc")

_M_ARENA_MAX = -8  # from glibc's malloc.h
_done = False


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc malloc arenas at ``count``; True when the C library took it."""
    global _done
    if _done:
        return True
    mallopt = libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    _done = bool(mallopt(_M_ARENA_MAX, count) == 1)
    if not _done:
        log.debug("mallopt(M_ARENA_MAX) refused; the agent's RSS may grow with its fetch threads")
    return _done
