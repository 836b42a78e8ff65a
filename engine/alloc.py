"""Keep freed memory for reuse while a merge runs (glibc's malloc, Linux).

A merge allocates and frees tensors of the same few sizes key after key.  With glibc's defaults a
block of a few MB is served by a fresh ``mmap`` (or the heap top is trimmed as soon as it is freed),
so every temporary is new memory that the kernel must fault in and zero: measured on a full-size SD1.5
linear merge, that page-fault work cost more than the arithmetic (see benchmarks/bench_model_merge.py).
:func:`recycled_memory` raises glibc's mmap threshold to its maximum (32 MiB) and keeps up to 256 MiB
of freed memory at the heap top for the duration, so freed blocks are handed out again.  On leaving it
keeps the high mmap threshold (it is where glibc's own dynamic tuning ends up in a long-running torch
process: a fixed 128 KiB made every later 8 MiB tensor a fresh mmap, 20x slower), unless the user set
``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``, which is then restored instead of overridden; it
sets a moderate trim threshold and returns the free memory to the system with ``malloc_trim``.  Memory
freed later (the merged results and the models loaded after a merge live in the heap) stays resident
until a trim: :func:`trim_when_collected` trims soon after a merge result is collected (a long-running
server kept gigabytes after ComfyUI's /free without it).  Elsewhere (macOS, Windows, musl) it all does
nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import weakref

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_THRESHOLD = 32 << 20           # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
_KEEP_WHILE_MERGING = 256 << 20         # free memory kept at the heap top (a few keys' temporaries)
_TRIM_AFTER = 64 << 20
_TRIM_DELAY_S = 0.5                      # a finalizer runs before the object's tensors are freed

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


def tunable(name: str, environ=None) -> int | None:
    """The value of ``glibc.malloc.<name>`` in ``GLIBC_TUNABLES`` (``a=1:b=2``), or None."""
    for item in (environ if environ is not None else os.environ).get("GLIBC_TUNABLES", "").split(":"):
        k, _, v = item.partition("=")
        if k.strip() == f"glibc.malloc.{name}":
            try:
                return int(v.strip(), 0)
            except ValueError:
                return None
    return None


def user_mmap_threshold() -> int | None:
    """The user's ``glibc.malloc.mmap_threshold`` tunable when it is a valid value, else None."""
    v = tunable("mmap_threshold")
    return v if v is not None and 0 <= v <= _MMAP_MAX_THRESHOLD else None


def _trim() -> None:
    if _LIBC is not None:
        with _lock:
            if _depth == 0:          # a merge running now keeps its memory; it trims when it ends
                _LIBC.malloc_trim(0)


_timer_lock = threading.Lock()
_timer_pending = False


def _trim_soon() -> None:
    """One trim ``_TRIM_DELAY_S`` from now (results collected meanwhile share it)."""
    global _timer_pending
    with _timer_lock:
        if _timer_pending:
            return
        _timer_pending = True

    def run():
        global _timer_pending
        with _timer_lock:
            _timer_pending = False
        _trim()
    t = threading.Timer(_TRIM_DELAY_S, run)
    t.daemon = True
    try:
        t.start()
    except RuntimeError:            # no new threads (interpreter shutdown)
        with _timer_lock:
            _timer_pending = False


def trim_when_collected(obj) -> None:
    """Return the heap memory of ``obj``'s tensors to the system soon after ``obj`` is collected (a merge
    result lives in the heap; freed, it stays resident until a trim).  Not at interpreter exit."""
    if _LIBC is None:
        return
    weakref.finalize(obj, _trim_soon).atexit = False


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
                user = user_mmap_threshold()
                if user is not None:
                    _LIBC.mallopt(_M_MMAP_THRESHOLD, user)
                trim = tunable("trim_threshold")
                _LIBC.mallopt(_M_TRIM_THRESHOLD, trim if trim is not None and trim >= 0 else _TRIM_AFTER)
                _LIBC.malloc_trim(0)
