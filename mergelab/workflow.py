"""Editor-format workflow JSON → API-format prompt, driven by ComfyUI's own node definitions.

The editor saves each node's widget values as a positional list (``widgets_values``) and its
connections as links.  To turn that into an API prompt we need, per node type, the ordered widget
inputs: they come from the live node classes (``INPUT_TYPES``), never from a hand-written table.
Frontend-only nodes are resolved: ``Reroute`` is followed, ``PrimitiveNode`` values are inlined,
notes are dropped, muted nodes are left out and bypassed nodes pass their inputs through.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

MUTED, BYPASSED = 2, 4
NOTE_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node."""


def is_api_format(data: Any) -> bool:
    return isinstance(data, dict) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values()) and bool(data)


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON: {e}") from None


def _input_spec(node_cls) -> List[Tuple[str, Any, dict]]:
    """Ordered (name, type, options) of a node class's required then optional inputs."""
    info = node_cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (info.get(section) or {}).items():
            typ = spec[0] if isinstance(spec, (list, tuple)) else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ: Any, opts: dict) -> bool:
    if isinstance(typ, list):
        return True                      # a combo given as a list of options
    return typ in WIDGET_TYPES and not opts.get("forceInput", False)


def _has_control_widget(name: str, typ: Any, opts: dict) -> bool:
    """The frontend adds a hidden 'control after generate' value after some INT (and combo) widgets."""
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in ("seed", "noise_seed")


def widget_values(node: dict, node_cls) -> Dict[str, Any]:
    """Map a node's ``widgets_values`` onto its widget input names."""
    values = node.get("widgets_values")
    spec = [(n, t, o) for n, t, o in _input_spec(node_cls) if _is_widget(t, o)]
    if values is None:
        return {}
    if isinstance(values, dict):
        return {n: values[n] for n, _, _ in spec if n in values}
    out: Dict[str, Any] = {}
    i = 0
    for name, typ, opts in spec:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if _has_control_widget(name, typ, opts) and i < len(values) and values[i] in SEED_CONTROL_VALUES:
            i += 1
    return out


def to_api(workflow: dict, node_classes: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Convert an editor-format workflow to an API-format prompt."""
    if is_api_format(workflow):
        return workflow
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        raise WorkflowError("not a ComfyUI workflow: expected an editor-format object with 'nodes' and 'links', "
                            "or an API-format prompt")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by the converter; unpack the subgraphs "
                            "in the editor first")
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links: Dict[int, Tuple[str, int]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[link[0]] = (str(link[1]), int(link[2]))

    def source_of(link_id: int, seen=()) -> Optional[Tuple[str, int]]:
        """Follow reroutes and bypassed nodes back to a real output; None when nothing feeds it."""
        if link_id is None or link_id not in links:
            return None
        nid, slot = links[link_id]
        node = nodes.get(nid)
        if node is None or nid in seen:
            return None
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return source_of(ins[0].get("link") if ins else None, seen + (nid,))
        if node.get("mode") == BYPASSED:
            out_type = (node.get("outputs") or [{}])[slot].get("type") if slot < len(node.get("outputs") or []) else None
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source_of(inp["link"], seen + (nid,))
            return None
        if node.get("mode") == MUTED:
            return None
        return nid, slot

    prompt: Dict[str, Dict[str, Any]] = {}
    for nid, node in nodes.items():
        typ = node.get("type")
        if typ in NOTE_TYPES or typ in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        cls = node_classes.get(typ)
        if cls is None:
            raise WorkflowError(f"node {nid} has unknown type '{typ}': is the custom node pack that provides it "
                                "installed?")
        inputs: Dict[str, Any] = dict(widget_values(node, cls))
        for inp in node.get("inputs") or []:
            link_id = inp.get("link")
            if link_id is None:
                continue
            src_nid, src_slot = links.get(link_id, (None, None))
            src = nodes.get(src_nid) if src_nid is not None else None
            if src is not None and src.get("type") == "PrimitiveNode":
                vals = src.get("widgets_values") or []
                if vals:
                    inputs[inp["name"]] = vals[0]
                continue
            resolved = source_of(link_id)
            if resolved is not None:
                inputs[inp["name"]] = [resolved[0], resolved[1]]
            else:
                inputs.pop(inp["name"], None)
        entry: Dict[str, Any] = {"class_type": typ, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[nid] = entry
    return prompt


def _nodes_named(prompt: Dict[str, Dict[str, Any]], ref: str) -> List[str]:
    """Node ids whose id, else title, else class type is ``ref``."""
    return [nid for nid in prompt if nid == ref] or \
        [nid for nid, n in prompt.items() if (n.get("_meta") or {}).get("title") == ref] or \
        [nid for nid, n in prompt.items() if n["class_type"] == ref]


def _split_target(prompt: Dict[str, Dict[str, Any]], target: str):
    """``NODE.INPUT`` split at the dot that names a node and one of its inputs: input names may hold dots
    (the block widgets ``input_blocks.4.``), and so may titles.  Without such a split, the last dot that
    names a node (a new input), else the last dot."""
    splits = [(target[:i], target[i + 1:]) for i, ch in enumerate(target) if ch == "." and i + 1 < len(target)]
    named = [(ref, name, _nodes_named(prompt, ref)) for ref, name in splits]
    named = [c for c in named if c[2]]
    known = [c for c in named if len(c[2]) == 1 and c[1] in prompt[c[2][0]].get("inputs", {})]
    if known:
        return known[0]
    if named:
        return named[-1]
    ref, _, name = target.rpartition(".")
    return ref, name, []


def apply_overrides(prompt: Dict[str, Dict[str, Any]], overrides: List[str]) -> None:
    """``NODE.INPUT=VALUE`` overrides; NODE is a node id, a title or a class type (when unique)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"--set expects NODE.INPUT=VALUE, got {item!r}")
        target, raw = item.split("=", 1)
        node_ref, input_name, ids = _split_target(prompt, target)
        if not ids:
            raise WorkflowError(f"--set {item!r}: no node with id, title or type {node_ref!r}")
        if len(ids) > 1:
            raise WorkflowError(f"--set {item!r}: {node_ref!r} matches nodes {ids}; use a node id")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[ids[0]]["inputs"][input_name] = value
