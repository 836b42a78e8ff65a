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


def _connects(a: Any, b: Any) -> bool:
    """LiteGraph's isValidConnection for two slot types: equal, a wildcard, or sharing a type of a
    comma-separated list (case-insensitive)."""
    if a in (None, "", "*", 0) or b in (None, "", "*", 0):
        return True
    a, b = str(a).upper(), str(b).upper()
    return a == b or bool(set(a.split(",")) & set(b.split(",")))


def _bypass_input(node: dict, slot: int, want: Any) -> Optional[int]:
    """The input a bypassed node passes through to its output ``slot`` for a consumer of type ``want``,
    as the frontend chooses it (ExecutableNodeDTO): the input at the same index when its type fits the
    output's and the consumer's, else the first input of exactly the consumer's type, else the first that
    fits both.  The input may be unconnected: then nothing is passed (the consumer's input is dropped)."""
    ins = node.get("inputs") or []
    outs = node.get("outputs") or []
    if want in ("*", "", None):
        return slot if len(ins) > slot else (0 if ins else None)
    out_type = outs[slot].get("type") if slot < len(outs) else None
    if slot < len(ins) and _connects(ins[slot].get("type"), out_type) and _connects(ins[slot].get("type"), want):
        return slot
    for i, inp in enumerate(ins):
        if inp.get("type") == want:
            return i
    for i, inp in enumerate(ins):
        if _connects(inp.get("type"), out_type) and _connects(inp.get("type"), want):
            return i
    return None


def to_api(workflow: dict, node_classes: Dict[str, Any],
           display_names: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    """Convert an editor-format workflow to an API-format prompt.  ``display_names`` (class type → the
    editor's default title; the type itself where it has none) gives every node a ``_meta.title`` as the
    frontend writes it."""
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

    def source_of(link_id: int, want: Any, seen=()) -> Optional[Tuple[str, int]]:
        """Follow reroutes and bypassed nodes back to a real output; None when nothing feeds it.  ``want``:
        the type of the input being fed (which input a bypassed node passes through depends on it)."""
        if link_id is None or link_id not in links:
            return None
        nid, slot = links[link_id]
        node = nodes.get(nid)
        if node is None:
            raise WorkflowError(f"link {link_id} comes from node {nid}, which is not in the workflow (a broken "
                                "link: reconnect that input in the editor)")
        if nid in seen:
            return None
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return source_of(ins[0].get("link") if ins else None, want, seen + (nid,))
        if node.get("mode") == BYPASSED:
            i = _bypass_input(node, slot, want)
            if i is None:
                return None
            inp = (node.get("inputs") or [])[i]
            return source_of(inp.get("link"), inp.get("type"), seen + (nid,))
        if node.get("mode") == MUTED:
            return None
        return nid, slot

    prompt: Dict[str, Dict[str, Any]] = {}
    for nid, node in nodes.items():
        typ = node.get("type")
        if typ in NOTE_TYPES or typ in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        cls = node_classes.get(typ)
        if cls is None and isinstance(typ, str) and typ.startswith(("workflow>", "workflow/")):
            raise WorkflowError(f"node {nid} is a group node ('{typ}'), which the converter does not support; "
                                "convert it back to nodes in the editor (right click > Convert to nodes)")
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
            if src_nid is not None and src is None:
                raise WorkflowError(f"node {nid} ({typ}) input '{inp.get('name')}' is linked to node {src_nid}, "
                                    "which is not in the workflow (a broken link: reconnect it in the editor)")
            resolved = source_of(link_id, inp.get("type"))
            if resolved is not None:
                inputs[inp["name"]] = [resolved[0], resolved[1]]
            else:
                inputs.pop(inp["name"], None)
        entry: Dict[str, Any] = {"class_type": typ, "inputs": inputs}
        title = node.get("title") or (None if display_names is None else display_names.get(typ, typ))
        if title:
            entry["_meta"] = {"title": title}
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


def apply_overrides(prompt: Dict[str, Dict[str, Any]], overrides: List[str],
                    node_classes: Optional[Dict[str, Any]] = None) -> None:
    """``NODE.INPUT=VALUE`` overrides; NODE is a node id, a title or a class type (when unique).  With
    ``node_classes``, an INPUT the node's class does not have is an error naming the ones it has."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"--set expects NODE.INPUT=VALUE, got {item!r}")
        target, raw = item.split("=", 1)
        node_ref, input_name, ids = _split_target(prompt, target)
        if not ids:
            raise WorkflowError(f"--set {item!r}: no node with id, title or type {node_ref!r}")
        if len(ids) > 1:
            raise WorkflowError(f"--set {item!r}: {node_ref!r} matches nodes {ids}; use a node id")
        node = prompt[ids[0]]
        cls = (node_classes or {}).get(node["class_type"])
        if cls is not None and input_name not in node.get("inputs", {}):
            names = [n for n, _, _ in _input_spec(cls)]
            if input_name not in names:
                raise WorkflowError(f"--set {item!r}: node {ids[0]} ({node['class_type']}) has no input "
                                    f"{input_name!r}; its inputs: {', '.join(names)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node["inputs"][input_name] = value
