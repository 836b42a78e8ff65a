"""Find and boot a real ComfyUI runtime in this process.

The ComfyUI folder is ``$COMFYUI_PATH`` when set, otherwise the 0.3.75 tree that ``setup_env`` copied
into ``.cache/``.  Booting imports ComfyUI's ``nodes`` with ``--cpu`` (unless asked otherwise), loads the
built-in extra nodes and points models/output/input at the folders given.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import List, Optional

from . import CACHE_DIR

BUNDLED_VERSION = "0.3.75"
BUNDLED_DIR = os.path.join(CACHE_DIR, f"ComfyUI-{BUNDLED_VERSION}")
_REQUIRED = ("main.py", "nodes.py", "execution.py", "folder_paths.py", os.path.join("comfy", "model_management.py"))


class ComfyUINotFound(RuntimeError):
    pass


def comfyui_root() -> str:
    """The ComfyUI folder to use, checked; raises ComfyUINotFound with a clear message."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = os.path.abspath(os.path.expanduser(env))
        if not os.path.isdir(path):
            raise ComfyUINotFound(f"COMFYUI_PATH={env!r} does not exist or is not a folder.")
        missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ComfyUINotFound(
                f"COMFYUI_PATH={env!r} is not a ComfyUI folder: it lacks {', '.join(missing)}. "
                "Point COMFYUI_PATH at the root of a ComfyUI checkout (the folder holding main.py), "
                "or unset it to use the bundled ComfyUI " + BUNDLED_VERSION + ".")
        return path
    if not all(os.path.isfile(os.path.join(BUNDLED_DIR, f)) for f in _REQUIRED):
        raise ComfyUINotFound(
            f"No ComfyUI found: {BUNDLED_DIR} is missing or incomplete. Run `make test` (or "
            "`python3 -m mergelab.setup_env`) to set it up, or set COMFYUI_PATH to a ComfyUI checkout.")
    return BUNDLED_DIR


def comfyui_version(root: Optional[str] = None) -> str:
    root = root or comfyui_root()
    try:
        with open(os.path.join(root, "comfyui_version.py"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


_booted: Optional[str] = None


def boot(extra_args: Optional[List[str]] = None, base_dir: Optional[str] = None,
         models_dir: Optional[str] = None, output_dir: Optional[str] = None) -> str:
    """Import ComfyUI in this process (once) and load its built-in nodes. Returns the ComfyUI root.

    ``extra_args`` are ComfyUI command-line flags (``--cpu`` is added unless ``--gpu`` is given, which
    is ours and only means "do not force the CPU").  ``base_dir`` holds input/, temp/, user/ and, unless
    ``models_dir`` / ``output_dir`` say otherwise, models/ and output/ folders that replace ComfyUI's own.
    Without ``base_dir`` ComfyUI's own folders are used, except where ``models_dir``/``output_dir`` are given.
    """
    global _booted
    root = comfyui_root()
    if _booted:
        if _booted != root:
            raise RuntimeError(f"ComfyUI from {_booted} is already loaded in this process; cannot switch to {root}")
        return root
    args = list(extra_args or [])
    if "--gpu" in args:
        args.remove("--gpu")
    elif "--cpu" not in args:
        args.append("--cpu")
    if base_dir:
        output_dir = output_dir or os.path.join(base_dir, "output")
        models_dir = models_dir or os.path.join(base_dir, "models")
        for sub in ("input", "temp", "user"):
            os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
        args += ["--input-directory", os.path.join(base_dir, "input"),
                 "--temp-directory", os.path.join(base_dir, "temp"),
                 "--user-directory", os.path.join(base_dir, "user")]
    if output_dir:
        output_dir = os.path.abspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        args += ["--output-directory", output_dir]
    sys.argv = [os.path.join(root, "main.py")] + args
    if root not in sys.path:
        sys.path.insert(0, root)
    # our own `nodes` package must never shadow ComfyUI's top-level `nodes` module
    stale = sys.modules.get("nodes")
    if stale is not None and not getattr(stale, "__file__", "").startswith(root):
        del sys.modules["nodes"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv now)
    import folder_paths
    if models_dir and os.path.abspath(models_dir) != os.path.abspath(folder_paths.models_dir):
        _redirect_models(folder_paths, os.path.abspath(models_dir))
    if output_dir:
        folder_paths.set_output_directory(output_dir)
    if base_dir:
        folder_paths.set_input_directory(os.path.join(base_dir, "input"))
        folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
        if hasattr(folder_paths, "set_user_directory"):
            folder_paths.set_user_directory(os.path.join(base_dir, "user"))
    # ComfyUI's top-level ``utils`` package, imported before ``nodes`` as main.py does: ``nodes`` puts comfy/
    # first on sys.path, where ``utils`` is comfy/utils.py, and comfy_extras/nodes_images.py (ImageCrop,
    # ImageStitch, SaveAnimatedWEBP, ...) then fails on ``from server import ...`` (utils.install_util)
    import utils.extra_config  # noqa: F401
    import nodes
    import inspect
    kwargs = {"init_custom_nodes": False}
    if "init_api_nodes" in inspect.signature(nodes.init_extra_nodes).parameters:
        kwargs["init_api_nodes"] = False   # paid API nodes: not needed, and slow to import
    result = nodes.init_extra_nodes(**kwargs)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    _booted = root
    return root


def _redirect_models(folder_paths, models_dir: str) -> None:
    """Make every model folder type look in the same folders under ``models_dir`` as under ComfyUI's own
    models folder (and nowhere else), legacy names included (``unet/`` beside ``diffusion_models/``,
    ``clip/`` beside ``text_encoders/``).  No folder is created: a user's models folder stays as it is."""
    old = os.path.abspath(folder_paths.models_dir)
    folder_paths.models_dir = models_dir
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name in ("custom_nodes",):
            continue
        rel = [os.path.relpath(os.path.abspath(p), old) for p in paths]
        rel = [r for r in rel if not r.startswith("..")] or [name]
        folder_paths.folder_names_and_paths[name] = ([os.path.join(models_dir, r) for r in rel], exts)
    # the cache of file lists must not remember the old folders
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    logging.debug("ComfyUI model folders now under %s", models_dir)
