"""MergeLab's command-line side: environment set-up, the headless ComfyUI harness, fixtures, the
workflow runner and the demo.  Stdlib-only at import time (``setup_env`` runs before any venv exists);
the pack itself (``nodes/``, ``engine/``, ``merge_methods/``) never imports this package.
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.environ.get("MERGELAB_CACHE", os.path.join(REPO_ROOT, ".cache"))
