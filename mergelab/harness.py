"""A headless ComfyUI for tests, the runner and the demo.

It boots the real ComfyUI runtime with ``--cpu`` and temporary models/output/input folders, loads this
pack with ComfyUI's own custom-node loader (from ``<base>/custom_nodes/MergeLab``, a link to the
repository, as a user's install would have it), and runs API-format prompts through ComfyUI's real
``validate_prompt`` and ``PromptExecutor``.  One ComfyUI per process: ComfyUI keeps global state.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import REPO_ROOT, comfy_env

PACK_DIR_NAME = "MergeLab"


@dataclass
class RunResult:
    """What one prompt run produced."""

    success: bool
    prompt_id: str
    outputs: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # node id -> its UI output
    error: Optional[Dict[str, Any]] = None                              # validation or execution error
    node_errors: Dict[str, Any] = field(default_factory=dict)
    messages: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    captured: Dict[str, Any] = field(default_factory=dict)             # values of Capture nodes, by name

    def error_text(self) -> str:
        if self.success:
            return ""
        parts = []
        if self.error:
            parts.append(f"{self.error.get('type', '')}: {self.error.get('message', '')} {self.error.get('details', '')}")
        for nid, ne in (self.node_errors or {}).items():
            for e in ne.get("errors", []):
                parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')} {e.get('details', '')}")
        for event, data in self.messages:
            if event == "execution_error":
                parts.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                             f"{data.get('exception_type')}: {data.get('exception_message')}")
            if event == "execution_interrupted":
                parts.append(f"interrupted at node {data.get('node_id')}")
        return "\n".join(p.strip() for p in parts) or "failed"


class _Server:
    """The few members of PromptServer that the executor and progress handlers use."""

    CLIENT_ID = "mergelab-harness"

    def __init__(self):
        self.client_id = self.CLIENT_ID       # as a connected editor: the executor then sends "executing" events
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: Dict[str, Any] = {}
        self.events: List[Tuple[str, Any]] = []
        self.listeners: List[Callable[[str, Any], None]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        for fn in self.listeners:
            fn(event, data)

    def send_progress_text(self, text, node_id, sid=None):
        """What nodes such as GetImageSize send through ``PromptServer.instance`` (a text under the node)."""
        self.send_sync("progress_text", {"node": str(node_id), "text": text if isinstance(text, str) else
                                         bytes(text).decode("utf-8", "replace")}, sid)

    def queue_updated(self):
        pass


_CAPTURED: Dict[str, Any] = {}


class CaptureNode:
    """Harness-only output node: keeps the value it receives so tests can inspect real objects."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {}), "name": ("STRING", {"default": "value"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, value, name):
        _CAPTURED[name] = value
        return {}


def widget_defaults(cls) -> Dict[str, Any]:
    """The value the editor fills in for each widget input of node class ``cls``: its default, or the
    first choice of a required combo without one."""
    spec = cls.INPUT_TYPES()
    out: Dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, item in (spec.get(section) or {}).items():
            typ = item[0]
            opts = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif section == "required":
                choices = typ if isinstance(typ, list) else opts.get("options") if typ == "COMBO" else None
                if choices:
                    out[name] = choices[0]
    return out


def api_node(class_type: str, **inputs: Any) -> Dict[str, Any]:
    """One API-format node: ``inputs`` plus every other widget at its default (ComfyUI must be booted)."""
    import nodes
    return {"class_type": class_type,
            "inputs": {**widget_defaults(nodes.NODE_CLASS_MAPPINGS[class_type]), **inputs}}


class Harness:
    """Boot ComfyUI once, load the pack, run prompts.

    ``base_dir``: folder for models/, output/, input/, temp/, user/ and custom_nodes/ (a temporary one
    when None); ``models_dir`` / ``output_dir`` replace its models/ and output/.  ``extra_args``: more
    ComfyUI flags.  ``load_pack``: load MergeLab through ComfyUI's loader.
    """

    def __init__(self, base_dir: Optional[str] = None, extra_args: Optional[List[str]] = None,
                 load_pack: bool = True, pack_source: str = REPO_ROOT, models_dir: Optional[str] = None,
                 output_dir: Optional[str] = None):
        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="mergelab-comfy-")
        if self._own_dir:
            # the runner, the demo and the doc tools exit without close(): the folder goes with the process
            atexit.register(self.close)
        self.comfy_root = comfy_env.boot(extra_args=extra_args, base_dir=self.base_dir, models_dir=models_dir,
                                         output_dir=output_dir)
        import nodes  # ComfyUI's
        self.nodes = nodes
        self.server = _Server()
        server_module = sys.modules.get("server")       # ComfyUI's, when its nodes imported it
        if server_module is not None and getattr(server_module.PromptServer, "instance", None) is None:
            server_module.PromptServer.instance = self.server
        nodes.NODE_CLASS_MAPPINGS.setdefault("MergeLabTest_Capture", CaptureNode)
        self.pack_module_name: Optional[str] = None
        self.pack_path: Optional[str] = None
        if load_pack:
            self.load_pack(pack_source)

    # -- folders ------------------------------------------------------------------------------
    @property
    def output_dir(self) -> str:
        import folder_paths
        return folder_paths.get_output_directory()

    def models_dir(self, kind: str) -> str:
        import folder_paths
        return folder_paths.get_folder_paths(kind)[0]

    def add_model_file(self, kind: str, src: str, name: Optional[str] = None, link: bool = True) -> str:
        """Make ``src`` visible as a model of ``kind`` (checkpoints, loras, ...); returns its name."""
        import folder_paths
        name = name or os.path.basename(src)
        dst = os.path.join(self.models_dir(kind), name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)
        if link:
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copyfile(src, dst)
        if hasattr(folder_paths, "filename_list_cache"):
            folder_paths.filename_list_cache.clear()
        return name

    # -- the pack ----------------------------------------------------------------------------
    def load_pack(self, source: str = REPO_ROOT) -> str:
        """Load the pack with ComfyUI's own loader from ``custom_nodes/MergeLab``; return its module name."""
        custom = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        link = os.path.join(custom, PACK_DIR_NAME)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(source), link)
        before = set(self.nodes.NODE_CLASS_MAPPINGS)
        ok = self.nodes.load_custom_node(link, ignore=set(before))
        if inspect.iscoroutine(ok):
            ok = asyncio.run(ok)
        if not ok:
            raise RuntimeError(f"ComfyUI's loader failed to load the pack from {link}; see the log above")
        self.pack_path = link
        self.pack_module_name = link.replace(".", "_x_")
        self.pack_node_ids = sorted(set(self.nodes.NODE_CLASS_MAPPINGS) - before)
        return self.pack_module_name

    def register_test_node(self, node_id: str, cls) -> None:
        self.nodes.NODE_CLASS_MAPPINGS[node_id] = cls

    # -- building prompts ----------------------------------------------------------------------
    def with_defaults(self, prompt: Dict[str, Any]) -> Dict[str, Any]:
        """A copy of ``prompt`` whose nodes get every widget input they lack at its default value
        (what the editor would have filled in), so tests and scripts can write only what matters."""
        out = {}
        for nid, node in prompt.items():
            cls = self.nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            defaults = widget_defaults(cls) if cls is not None else {}
            out[nid] = {**node, "inputs": {**defaults, **node.get("inputs", {})}}
        return out

    # -- running -----------------------------------------------------------------------------
    def _executor(self):
        import execution
        params = inspect.signature(execution.PromptExecutor.__init__).parameters
        kwargs: Dict[str, Any] = {}
        if "cache_args" in params:          # 0.3.7x: cache_args, with a "ram" entry
            kwargs["cache_args"] = {"lru": 0, "ram": 0}
        elif "cache_size" in params:        # 0.3.64 and older
            kwargs["cache_size"] = None
        return execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC, **kwargs)

    def run(self, prompt: Dict[str, Any], *, extra_data: Optional[Dict[str, Any]] = None,
            listener: Optional[Callable[[str, Any], None]] = None) -> RunResult:
        """Validate and execute an API-format prompt; never raises for graph errors."""
        import execution
        prompt_id = str(uuid.uuid4())
        _CAPTURED.clear()
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        ok, error, outputs_to_run, node_errors = valid[0], valid[1], valid[2], valid[3]
        if not ok:
            return RunResult(False, prompt_id, error=error, node_errors=node_errors or {})
        executor = self._executor()
        # as a connected editor: without a client id the executor sends no "executing" events
        data = {"client_id": _Server.CLIENT_ID, **(extra_data or {})}
        if listener:
            self.server.listeners.append(listener)
        try:
            executor.execute(prompt, prompt_id, data, outputs_to_run)
        finally:
            if listener:
                self.server.listeners.remove(listener)
        history = getattr(executor, "history_result", None) or {}
        # outputs that failed validation beside valid ones: ComfyUI runs only the valid ones; a test must
        # not read that as a success
        return RunResult(bool(executor.success) and not node_errors, prompt_id, outputs=history.get("outputs", {}),
                         node_errors=node_errors or {}, messages=list(executor.status_messages),
                         captured=dict(_CAPTURED))

    def run_ok(self, prompt: Dict[str, Any], **kw) -> RunResult:
        """Like :meth:`run` but raises AssertionError with ComfyUI's own messages on failure."""
        res = self.run(prompt, **kw)
        if not res.success:
            raise AssertionError("ComfyUI run failed:\n" + res.error_text())
        return res

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
