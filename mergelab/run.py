"""Headless runner: execute a workflow (editor or API format) in the real ComfyUI runtime.

    python -m mergelab.run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--models DIR] [--output DIR] [--cpu]

WORKFLOW may also be a file ComfyUI saved with its workflow in it (a PNG or animated WebP, an MP4 / WebM
video or audio file, a checkpoint, a LoRA): the workflow that made it runs again.

Prints a text progress bar while nodes run and, at the end, the files the workflow wrote.
Exits non-zero with a clear message for a missing file, invalid JSON, an unknown node type, a
missing model or any failure during execution.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .workflow import WorkflowError, apply_overrides, is_api_format, load_workflow, to_api


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mergelab.run", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="workflow JSON (saved from the editor, or API format), or a file ComfyUI "
                                    "saved with its workflow: a PNG or WebP, a video or audio file, a .safetensors "
                                    "checkpoint or LoRA, a .latent")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id, title or unique type (a subgraph node: one "
                        "of its widgets; a node inside subgraph node 5: 5:ID); VALUE is JSON or text; "
                        "INPUT may hold dots (block widgets: 9.input_blocks.4.=0)")
    p.add_argument("--models", help="models folder (with checkpoints/, loras/, ...); default: ComfyUI's own, "
                                    "with the folders its extra_model_paths.yaml adds")
    p.add_argument("--output", help="output folder; default: ComfyUI's own output folder")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class TextProgress:
    """Draws one line: the node running and its progress bar."""

    def __init__(self, prompt, stream=None, quiet=False):
        self.prompt, self.stream, self.quiet = prompt, stream or sys.stderr, quiet
        self.node = None
        self.t0 = time.time()

    def _label(self, nid) -> str:
        n = self.prompt.get(str(nid), {})
        title = (n.get("_meta") or {}).get("title") or n.get("class_type", "?")
        return f"#{nid} {title}"

    def event(self, event, data) -> None:
        if self.quiet or not isinstance(data, dict):
            return
        if event == "executing" and data.get("node") is not None:
            self.node = data["node"]
            self._line(f"{self._label(self.node)}")
        elif event == "progress":
            value, total = data.get("value", 0), max(data.get("max", 1), 1)
            width = 30
            done = int(width * value / total)
            self._line(f"{self._label(data.get('node') or self.node)} [{'#' * done}{'.' * (width - done)}] "
                       f"{value}/{total}")

    def _line(self, text: str) -> None:
        self.stream.write(f"\r\x1b[K[{time.time() - self.t0:6.1f}s] {text}")
        self.stream.flush()

    def done(self) -> None:
        if not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def _snapshot(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class WorkflowRun:
    """What :func:`execute_workflow` did: the exit code, the API prompt it ran, the files it wrote (full
    paths, sorted), each output node's UI output, the seconds it took and the error text."""

    code: int
    prompt: Optional[Dict[str, Any]] = None
    written: List[str] = field(default_factory=list)
    outputs: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def execute_workflow(workflow, overrides: List[str], harness, quiet: bool = False, out=sys.stdout) -> WorkflowRun:
    """Convert, validate and execute a workflow (a path or parsed JSON); print the files written and the
    text outputs; return a :class:`WorkflowRun`."""
    import nodes as comfy_nodes  # ComfyUI's

    try:
        data = load_workflow(workflow) if isinstance(workflow, str) else workflow
        subgraph_nodes: Dict[str, Dict[str, Any]] = {}
        prompt = to_api(data, comfy_nodes.NODE_CLASS_MAPPINGS, getattr(comfy_nodes, "NODE_DISPLAY_NAME_MAPPINGS", {}),
                        subgraph_nodes)
        apply_overrides(prompt, overrides, comfy_nodes.NODE_CLASS_MAPPINGS, subgraph_nodes)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return WorkflowRun(2, error=str(e))
    before = _snapshot(harness.output_dir)
    progress = TextProgress(prompt, quiet=quiet)
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        # as ComfyUI's server's hook: a progress step is where a node notices Cancel (Ctrl-C here)
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.event("progress", {"value": value, "max": total, "node": node_id})

    comfy.utils.set_progress_bar_global_hook(hook)
    t0 = time.time()
    interrupted = []
    try:
        with _ctrl_c_interrupts(interrupted):
            # as the editor queues it: what the workflow saves (images, checkpoints, LoRAs) holds it; not
            # with --set overrides, which the editor-format workflow does not show (the prompt saved, which
            # has them, is what then runs again from the file)
            extra = None if is_api_format(data) or overrides else {"extra_pnginfo": {"workflow": data}}
            res = harness.run(prompt, listener=progress.event, extra_data=extra)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        progress.done()
    seconds = time.time() - t0
    if interrupted:
        print(f"interrupted (Ctrl-C) after {seconds:.1f} s", file=sys.stderr)
        return WorkflowRun(130, prompt, outputs=res.outputs, seconds=seconds, error="interrupted")
    if not res.success:
        text = res.error_text()
        print("error: the workflow failed:\n" + text, file=sys.stderr)
        return WorkflowRun(1, prompt, outputs=res.outputs, seconds=seconds, error=text)
    after = _snapshot(harness.output_dir)
    written = sorted(p for p, sig in after.items() if before.get(p) != sig)
    print(f"done in {seconds:.1f} s", file=out)
    for p in written:
        print(f"wrote {p} ({_size(after[p][0])})", file=out)
    for nid, ui in res.outputs.items():
        text = (ui or {}).get("text")
        if text:
            print(f"#{nid}: " + "\n".join(str(t) for t in text), file=out)
    return WorkflowRun(0, prompt, written, dict(res.outputs), seconds)


@contextlib.contextmanager
def _ctrl_c_interrupts(flag: list):
    """While a workflow runs: Ctrl-C interrupts ComfyUI's processing (the running node stops at its next
    check, no further node starts) and is recorded in ``flag``; a second Ctrl-C stops at once.  Without
    this, asyncio.run (inside ComfyUI's executor) took the signal and the run went on to the end."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import comfy.model_management as mm

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)
        print("\ninterrupting (Ctrl-C again to stop at once)...", file=sys.stderr)
        mm.interrupt_current_processing(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if flag:
            mm.interrupt_current_processing(False)


def run_workflow(workflow, overrides: List[str], harness, quiet: bool = False, out=sys.stdout) -> int:
    """Convert, validate and execute a workflow (a path or parsed JSON); print the files written.
    Returns the process exit code."""
    return execute_workflow(workflow, overrides, harness, quiet=quiet, out=out).code


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"


def has_accelerator() -> bool:
    """Whether torch sees a device ComfyUI can use besides the CPU (CUDA/ROCm, Apple MPS, Intel XPU)."""
    try:
        import torch
    except ImportError:
        return False
    try:
        if torch.cuda.is_available():
            return True
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return True
        xpu = getattr(torch, "xpu", None)
        return bool(xpu is not None and xpu.is_available())
    except Exception:  # noqa: BLE001 - a broken driver counts as no device
        return False


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data = load_workflow(args.workflow)  # a missing file or bad JSON fails before ComfyUI starts
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .comfy_env import ComfyUINotFound
    from .harness import Harness

    from .comfy_env import comfyui_root

    if not args.cpu and not has_accelerator():
        # ComfyUI itself would stop at import ("Found no NVIDIA driver") without --cpu on such a machine
        print("note: no GPU found; running on the CPU", file=sys.stderr)
        args.cpu = True
    extra = ["--cpu"] if args.cpu else ["--gpu"]
    try:
        root = comfyui_root()
        harness = Harness(extra_args=extra, models_dir=args.models or os.path.join(root, "models"),
                          output_dir=args.output or os.path.join(root, "output"))
    except ComfyUINotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.models:
        _load_extra_model_paths(root)
    return run_workflow(data, args.overrides, harness, quiet=args.quiet)


def _load_extra_model_paths(root: str) -> None:
    """The model folders ComfyUI's extra_model_paths.yaml adds, as ComfyUI's main.py loads them."""
    path = os.path.join(root, "extra_model_paths.yaml")
    if os.path.isfile(path):
        import utils.extra_config  # ComfyUI's
        utils.extra_config.load_extra_path_config(path)


if __name__ == "__main__":
    sys.exit(main())
