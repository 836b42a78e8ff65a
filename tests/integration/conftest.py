"""Shared fixtures of the integration tests: ONE headless ComfyUI per test process.

* ``harness``: a :class:`mergelab.harness.Harness` (real ComfyUI booted in-process, the pack loaded with
  ComfyUI's own loader) with the fixture test nodes registered (``MergeLabTest_SmallModel``, see
  :mod:`mergelab.fixtures`).  It is created before any other fixture or test runs (``_harness_first``),
  so ComfyUI is always booted with the harness's temporary models/output folders.
* ``full_sd15`` / ``tuned_sd15``: paths of the full-size SD1.5 fixture checkpoints (generated once into
  ``.cache/fixtures/`` and reused), linked into the harness's ``models/checkpoints``; the
  ``ckpt_name`` to use in a graph is ``os.path.basename(path)``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def harness():
    from mergelab import fixtures
    from mergelab.harness import Harness
    h = Harness()
    fixtures.register_test_nodes(h)
    yield h
    h.close()


@pytest.fixture(scope="session", autouse=True)
def _harness_first(harness):
    """Boot ComfyUI through the harness before anything else can boot it with other folders."""
    return harness


@pytest.fixture(scope="session")
def full_sd15(harness):
    from mergelab import fixtures
    path = fixtures.full_sd15_checkpoint()
    harness.add_model_file("checkpoints", path)
    return path


@pytest.fixture(scope="session")
def tuned_sd15(harness):
    from mergelab import fixtures
    path = fixtures.tuned_sd15_checkpoint()
    harness.add_model_file("checkpoints", path)
    return path


@pytest.fixture(autouse=True)
def _no_models_left_loaded(harness):
    """After each test, unload what ComfyUI loaded for it.  The small fixture models are cached and shared
    between tests: a clone of one that a test loaded (to encode a prompt, to sample) and then dropped leaves
    ComfyUI a loaded entry whose patcher is gone while its module lives on in the cache.  ComfyUI takes that
    for a leak and runs a full gc.collect() before every later prompt (0.3 s each: the every-method executor
    tests ran twice as long after such a test)."""
    yield
    import comfy.model_management as mm
    if mm.current_loaded_models:
        mm.unload_all_models()
