"""glibc allocator settings around a merge (engine.alloc): a merge raises the mmap threshold to keep its
temporaries for reuse; it left it at 32 MiB, so every model ComfyUI loaded afterwards lived in the heap
and stayed resident after ComfyUI freed it (a long-running server kept gigabytes after /free), and a
user's own GLIBC_TUNABLES mmap_threshold was silently overridden."""
import ctypes
import gc
import importlib
import time

import pytest

from mergelab import fixtures


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def _libc(alloc):
    """Skip where there is no glibc with mallinfo2 (the probe below needs it)."""
    if not alloc.available():
        pytest.skip("not glibc")
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc without mallinfo2")


_PROBE = r"""
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("alloc_probe", sys.argv[1])
alloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(alloc)

class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = M
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def mmapped(size):
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd >= before + size
    finally:
        libc.free(p)

out = [mmapped(4 << 20)]
with alloc.recycled_memory():
    out.append(mmapped(4 << 20))
out += [mmapped(4 << 20), mmapped(1 << 20)]
print(" ".join(str(int(x)) for x in out))
"""


def _probe(harness, env_extra=None):
    """In a fresh process (a clean heap): whether 4 MiB before, 4 MiB within, then 4 MiB and 1 MiB after
    a recycled_memory block are served by their own mmap."""
    import os
    import subprocess
    import sys
    alloc = pack(harness, "engine.alloc")
    _libc(alloc)
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", _PROBE, alloc.__file__], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [bool(int(x)) for x in r.stdout.split()]


def test_the_mmap_threshold_is_restored_after_a_merge(harness):
    before, within, after_4m, after_1m = _probe(harness)
    assert before and not within          # kept in the heap for reuse while merging
    assert after_4m and after_1m           # and after it mmapped again: freed, it is returned to the system


def test_a_users_glibc_tunables_mmap_threshold_is_kept(harness, monkeypatch):
    before, within, after_4m, after_1m = _probe(
        harness, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=2097152"})
    assert before and not within
    assert after_4m and not after_1m       # the user's 2 MiB, not glibc's 128 KiB
    alloc = pack(harness, "engine.alloc")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=0x200000")
    assert alloc.tunable("mmap_threshold") == 2 << 20 and alloc.tunable("arena_max") == 2
    assert alloc.mmap_threshold_after() == 2 << 20
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1G")
    assert alloc.tunable("mmap_threshold") is None and alloc.mmap_threshold_after() == 128 << 10


def test_memory_is_trimmed_soon_after_a_merge_result_is_collected(harness, monkeypatch):
    """The merged tensors are made while the threshold is high, in the heap: freed, they stay resident
    until a malloc_trim, which now follows when the result is garbage-collected."""
    alloc = pack(harness, "engine.alloc")
    _libc(alloc)
    eng, mm = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    calls = []
    monkeypatch.setattr(alloc, "_trim", lambda: calls.append(time.monotonic()))
    ms = [fixtures.small_model("SD15", seed=0, delta_seed=i, delta_scale=0.01) for i in (1, 2)]
    out = eng.merge_models(None, [eng.MergeInput(m) for m in ms], mm.create("linear"), eng.MergeOptions(device="cpu"))
    time.sleep(alloc._TRIM_DELAY_S + 0.3)
    assert calls == []                                  # not while the result lives
    gone = time.monotonic()
    del out
    gc.collect()
    for _ in range(40):
        if calls:
            break
        time.sleep(0.1)
    assert len(calls) == 1 and calls[0] - gone >= alloc._TRIM_DELAY_S - 0.05
