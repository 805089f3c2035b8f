"""The C library's functions that Python's ``os`` module lacks (``mallopt``, ``sync_file_range``).

One loader for all of them: each is looked up once, typed, and None where this C library has no
such function (musl, another OS), so a caller can do without it instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any


def libc_function(name: str, argtypes: list[Any], restype: Any) -> Any | None:
    """``name`` from the C library with its types set and errno kept (``ctypes.get_errno``), or
    None when the library or the function is missing."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def last_error() -> OSError:
    """The error a function from ``libc_function`` just reported through errno, as ``os`` raises it."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags
sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint],
                                ctypes.c_int)  # fmt: skip
