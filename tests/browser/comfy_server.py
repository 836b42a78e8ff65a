"""Start a real ComfyUI web server with MergeLab loaded, for the browser test and the README images.

The server is ``python main.py`` of the ComfyUI that ``mergelab.comfy_env.comfyui_root()`` finds, run with
the interpreter running this code, on a free port, with a temporary base directory:
``custom_nodes/MergeLab`` there is a symlink to this repository (the ComfyUI tree itself is not touched)
and ``user/default`` holds the settings of a returning user (no first-run template dialog).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PACK = "MergeLab"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class ServerError(RuntimeError):
    pass


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: str) -> None:
    """custom_nodes/MergeLab -> this repository; empty input/output/temp/models; a clean user folder with
    the settings of a returning user and the optional user files the frontend asks for (so that their
    absence does not show up as 404s in the console)."""
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", PACK), target_is_directory=True)
    for sub in ("input", "output", "temp", "models"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    user = os.path.join(base, "user", "default")
    for sub in ("workflows", "subgraphs"):
        os.makedirs(os.path.join(user, sub), exist_ok=True)
    with open(os.path.join(user, "comfy.settings.json"), "w", encoding="utf-8") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)
    with open(os.path.join(user, "comfy.templates.json"), "w", encoding="utf-8") as f:
        f.write("[]")
    open(os.path.join(user, "user.css"), "w").close()


def models_yaml(base: str, models_dir: str) -> str:
    """An extra_model_paths file that adds every sub-folder of ``models_dir`` (checkpoints/, loras/, ...)
    to ComfyUI's folder of the same name; returns its path."""
    models_dir = os.path.abspath(models_dir)
    subs = sorted(d for d in os.listdir(models_dir) if os.path.isdir(os.path.join(models_dir, d)))
    path = os.path.join(base, "extra_models.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"mergelab_models:\n  base_path: {json.dumps(models_dir)}\n")
        for d in subs:
            f.write(f"  {d}: {json.dumps(d)}\n")
    return path


def server_args(comfy_root: str, base: str, port: int) -> list:
    """Command-line flags for main.py; optional flags only where this ComfyUI has them."""
    with open(os.path.join(comfy_root, "comfy", "cli_args.py"), encoding="utf-8") as f:
        cli = f.read()
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    if '"--disable-api-nodes"' in cli:
        args.append("--disable-api-nodes")
    if '"--database-url"' in cli:   # its default file lives inside the ComfyUI tree
        args += ["--database-url", "sqlite:///:memory:"]
    if '"--base-directory"' in cli:
        args += ["--base-directory", base]
    else:  # older cores: custom_nodes through an extra paths file, the other folders one by one
        yaml_path = os.path.join(base, "extra_model_paths.yaml")
        with open(yaml_path, "w", encoding="utf-8") as f:
            f.write(f"mergelab_browser_test:\n  base_path: {base}\n  custom_nodes: custom_nodes\n"
                    f"  checkpoints: models/checkpoints\n  loras: models/loras\n")
        args += ["--extra-model-paths-config", yaml_path, "--output-directory", os.path.join(base, "output"),
                 "--input-directory", os.path.join(base, "input"), "--temp-directory", os.path.join(base, "temp"),
                 "--user-directory", os.path.join(base, "user")]
    return args


class Server:
    def __init__(self, url: str, base: str, log_path: str, proc: subprocess.Popen):
        self.url, self.base, self.log_path, self.proc = url, base, log_path, proc

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_server(log_path: str, base: Optional[str] = None, timeout: float = 180.0,
                   models_dir: Optional[str] = None) -> Iterator[Server]:
    """Starts the server, waits until /object_info lists MergeLab, yields a Server, stops it.
    ``models_dir`` (a folder with checkpoints/, loras/, ...) is added to ComfyUI's model folders."""
    from mergelab.comfy_env import comfyui_root

    comfy_root = comfyui_root()
    own_base = base is None
    base = base or tempfile.mkdtemp(prefix="mergelab_comfy_")
    prepare_base(base)
    port = free_port()
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "w", encoding="utf-8")
    args = server_args(comfy_root, base, port)
    if models_dir:
        args += ["--extra-model-paths-config", models_yaml(base, models_dir)]
    proc = subprocess.Popen([sys.executable, os.path.join(comfy_root, "main.py"), *args],
                            cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/", base, log_path, proc)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                raise ServerError(f"ComfyUI exited with {proc.returncode} before serving:\n{server.log_tail()}")
            try:
                get_json(server.url + "object_info/MergeLab_Method_linear", timeout=2)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.time() > deadline:
                    log.flush()
                    raise ServerError(f"ComfyUI did not serve /object_info within {timeout:.0f} s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if own_base:
            link = os.path.join(base, "custom_nodes", PACK)
            if os.path.islink(link):
                os.unlink(link)          # the link only, never the repository it points to
            shutil.rmtree(base, ignore_errors=True)
