"""Keep freed memory for reuse while a merge runs (glibc's malloc, Linux).

A merge allocates and frees tensors of the same few sizes key after key.  With glibc's defaults a
block of a few MB is served by a fresh ``mmap`` (or the heap top is trimmed as soon as it is freed),
so every temporary is new memory that the kernel must fault in and zero: measured on a full-size SD1.5
linear merge, that page-fault work cost more than the arithmetic (see benchmarks/bench_model_merge.py).
:func:`recycled_memory` raises glibc's mmap threshold to its maximum (32 MiB) and keeps up to 256 MiB
of freed memory at the heap top for the duration, so freed blocks are handed out again; on leaving it sets moderate values (those
glibc's own dynamic tuning reaches in a long-running torch process) and returns the free memory to
the system with ``malloc_trim``.  Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_THRESHOLD = 32 << 20           # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
_KEEP_WHILE_MERGING = 256 << 20         # free memory kept at the heap top (a few keys' temporaries)
_TRIM_AFTER = 64 << 20

_lock = threading.Lock()
_depth = 0


def _load_glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_glibc()


def available() -> bool:
    return _LIBC is not None


@contextlib.contextmanager
def recycled_memory():
    """Within the block, freed tensors' memory is reused instead of returned to the system (nested
    and multi-threaded use is fine: the first entry sets, the last exit restores and trims)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_THRESHOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_WHILE_MERGING)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                _LIBC.malloc_trim(0)
