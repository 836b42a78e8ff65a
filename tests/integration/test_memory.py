"""glibc allocator settings around a merge (engine.alloc).  A merge raises the mmap threshold to keep its
temporaries for reuse.  Memory freed after it (the merged results, models loaded later) then stays in the
heap, resident: a long-running server kept gigabytes after ComfyUI's /free.  The heap is now trimmed soon
after a merge result is collected; a user's GLIBC_TUNABLES mmap_threshold is restored, not overridden; and
the threshold is not pinned low (a fixed 128 KiB made every later 8 MiB tensor a fresh mmap, 20x slower)."""
import ctypes
import gc
import importlib
import json
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
import ctypes, gc, importlib.util, json, sys, time
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

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

out = {}
with alloc.recycled_memory():
    out["within_4m"] = mmapped(4 << 20)
    blocks = [libc.malloc(1 << 20) for _ in range(121)]     # "results" made during the merge
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
sentinel = blocks.pop()                                      # kept: the freed ones are not at the heap top
out["after_8m"] = [mmapped(8 << 20), mmapped(8 << 20)]
out["after_4m"], out["after_1m"] = mmapped(4 << 20), mmapped(1 << 20)
for b in blocks:
    libc.free(b)
out["rss_freed"] = rss_mb()

class Result:
    pass
r = Result()
alloc.trim_when_collected(r)
del r
time.sleep(alloc._TRIM_DELAY_S + 0.5)
out["rss_trimmed"] = rss_mb()
print(json.dumps(out))
"""


def _probe(harness, env_extra=None):
    """Run _PROBE in a fresh process (a clean heap)."""
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
    return json.loads(r.stdout)


def test_memory_freed_after_a_merge_is_returned_and_tensors_stay_fast(harness):
    out = _probe(harness)
    assert not out["within_4m"]                 # kept in the heap for reuse while merging
    assert out["after_8m"] == [False, False]    # not a fresh mmap (page faults) for every 8 MiB tensor
    # 120 MiB made during the merge and freed after it: resident until the result is collected
    assert out["rss_freed"] - out["rss_trimmed"] > 100, out


def test_a_users_glibc_tunables_mmap_threshold_is_kept(harness, monkeypatch):
    out = _probe(harness, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=2097152"})
    assert not out["within_4m"]
    assert out["after_4m"] and not out["after_1m"]      # the user's 2 MiB again
    alloc = pack(harness, "engine.alloc")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=0x200000")
    assert alloc.tunable("mmap_threshold") == 2 << 20 and alloc.tunable("arena_max") == 2
    assert alloc.user_mmap_threshold() == 2 << 20
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1G")
    assert alloc.tunable("mmap_threshold") is None and alloc.user_mmap_threshold() is None


def test_memory_is_trimmed_soon_after_a_merge_result_is_collected(harness, monkeypatch):
    """The merged tensors are made while the threshold is high, in the heap: freed, they stay resident
    until a malloc_trim, which now follows when the result is garbage-collected."""
    alloc = pack(harness, "engine.alloc")
    _libc(alloc)
    eng, mm = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    gc.collect()                            # results of earlier tests: collected, their trim done
    time.sleep(alloc._TRIM_DELAY_S + 0.3)
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
