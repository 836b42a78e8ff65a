"""Editor-format workflow JSON → API-format prompt, driven by ComfyUI's own node definitions.

The editor saves each node's widget values as a positional list (``widgets_values``) and its
connections as links.  To turn that into an API prompt we need, per node type, the ordered widget
inputs: they come from the live node classes (``INPUT_TYPES``), never from a hand-written table.
Frontend-only nodes are resolved: ``Reroute`` is followed, ``PrimitiveNode`` values are inlined,
notes are dropped, muted nodes are left out and bypassed nodes pass their inputs through; subgraph
nodes are expanded into the nodes of their definition, as the frontend does when it queues a prompt.
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


# containers ComfyUI's video and audio nodes write with the workflow in their metadata (read with av):
# MP4 / MOV (ISO BMFF), WebM / Matroska, FLAC, Ogg (Opus, Vorbis), MP3
_AV_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"fLaC"), (0, b"OggS"), (0, b"ID3"))


def _embedded_text(path: str) -> Optional[Dict[str, str]]:
    """The text metadata ComfyUI writes into what it saves: a PNG's text chunks, a WebP's EXIF entries
    (``workflow:{...}``, ``prompt:{...}``: SaveAnimatedWEBP), a video's or audio file's container metadata
    (SaveVideo, SaveWEBM, SaveAudio), a safetensors file's header metadata (checkpoints, LoRAs, latents...);
    None for other files."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        from PIL import Image
        with Image.open(path) as im:
            return {k: v for k, v in (getattr(im, "text", None) or im.info).items() if isinstance(v, str)}
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        from PIL import Image
        with Image.open(path) as im:
            exif = im.getexif()
        out = {}
        for value in exif.values():
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and ":" in value:
                name, _, text = value.partition(":")
                out.setdefault(name.strip(), text)
        return out
    if any(head[at:at + len(magic)] == magic for at, magic in _AV_MAGIC):
        import av
        try:
            with av.open(path) as container:
                # Matroska (WebM) upper-cases its tag names (PROMPT); Ogg keeps them on the stream
                found = {}
                for meta in [container.metadata] + [st.metadata for st in container.streams]:
                    for k, v in meta.items():
                        if isinstance(v, str):
                            found.setdefault(str(k).lower(), v)
                return found
        except av.error.FFmpegError as e:
            raise WorkflowError(f"cannot read the metadata of {path}: {e}") from None
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:       # noqa: BLE001 - not a safetensors file after all: read as JSON
            return None
    return None


def load_workflow(path: str) -> Any:
    """A workflow from a file: JSON (editor or API format), or the workflow ComfyUI embeds in what it
    saves (a PNG or animated WebP, a video or audio file, a .safetensors checkpoint / LoRA / .latent): its
    editor-format ``workflow``, else the API ``prompt`` it ran."""
    try:
        meta = _embedded_text(path)
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except OSError as e:
        raise WorkflowError(f"cannot read {path}: {e}") from None
    if meta is None:
        return load_json(path)
    for key in ("workflow", "prompt"):
        if meta.get(key):
            try:
                return json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise WorkflowError(f"the '{key}' ComfyUI saved in {path} is not valid JSON: {e}") from None
    raise WorkflowError(f"{path} holds no ComfyUI workflow (saved with --disable-metadata, or not by ComfyUI)")


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


SUBGRAPH_INPUT_NODE = "-10"      # the id links inside a subgraph definition use for its input node


class _Graph:
    """The nodes and links of the workflow's root graph or of one subgraph definition."""

    def __init__(self, data: dict):
        self.id = data.get("id")
        self.name = data.get("name") or self.id
        self.nodes = {str(n["id"]): n for n in data.get("nodes") or []}
        self.links: Dict[int, Tuple[str, int, str, int]] = {}    # id -> origin id, slot, target id, slot
        for link in data.get("links") or []:
            if isinstance(link, dict):
                self.links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]),
                                          str(link.get("target_id")), int(link.get("target_slot", -1)))
            else:
                self.links[link[0]] = (str(link[1]), int(link[2]), str(link[3]), int(link[4]))
        self.inputs = data.get("inputs") or []
        self.outputs = data.get("outputs") or []

    def widget_inputs(self, subgraphs: Dict[str, "_Graph"], seen=()) -> List[str]:
        """Names of the definition's inputs that give its instances a widget: those linked to a widget
        of an inner node (or, nested, to such an input of an inner subgraph node), in definition order;
        an instance's ``widgets_values`` holds one value per such input."""
        out = []
        for inp in self.inputs:
            for link_id in inp.get("linkIds") or []:
                link = self.links.get(link_id)
                target = self.nodes.get(link[2]) if link else None
                slots = (target or {}).get("inputs") or []
                if target is None or not 0 <= link[3] < len(slots):
                    continue
                slot = slots[link[3]]
                inner = subgraphs.get(target.get("type"))
                if slot.get("widget") or (inner is not None and inner.id not in seen
                                          and slot.get("name") in inner.widget_inputs(subgraphs, seen + (self.id,))):
                    out.append(inp.get("name"))
                    break
        return out


class _Exe:
    """A node as it runs: its graph, and the subgraph node (itself an _Exe) it sits in, if any."""

    def __init__(self, path: Tuple[str, ...], graph: _Graph, node: dict, host: Optional["_Exe"]):
        self.path, self.graph, self.node, self.host = path, graph, node, host
        self.id = ":".join(path + (str(node["id"]),))


def _subgraph_definitions(workflow: dict) -> Dict[str, _Graph]:
    """Every subgraph definition: the workflow's, and any a definition holds itself."""
    out: Dict[str, _Graph] = {}
    todo = list((workflow.get("definitions") or {}).get("subgraphs") or [])
    while todo:
        data = todo.pop()
        if isinstance(data, dict) and data.get("id") and data["id"] not in out:
            out[data["id"]] = _Graph(data)
            todo += (data.get("definitions") or {}).get("subgraphs") or []
    return out


def to_api(workflow: dict, node_classes: Dict[str, Any], display_names: Optional[Dict[str, str]] = None,
           subgraph_nodes: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """Convert an editor-format workflow to an API-format prompt.  ``display_names`` (class type → the
    editor's default title; the type itself where it has none) gives every node a ``_meta.title`` as the
    frontend writes it.

    Subgraphs are expanded as the frontend expands them (its ExecutableNodeDTO): a node inside a subgraph
    node gets the id ``<subgraph node id>:<node id>`` (nested: ``1:2:3``); a link from the definition's
    input node continues from what feeds the subgraph node's input of that name, and when nothing does,
    from the subgraph node's widget for it (its ``widgets_values``); a subgraph node's output continues
    from the inner node linked to the definition's output.  Inner nodes run by their own modes.  One
    deliberate difference: PrimitiveNodes feeding the widgets of two subgraph nodes of one definition give
    each its own value (frontend 1.32.9 gives both the value of the last one it serializes).

    ``subgraph_nodes``, when given, receives the subgraph nodes by id: ``{"title", "widgets": {widget name:
    [(node id, input name), ...]}}``, the inputs of the prompt that each of its widgets feeds (for
    :func:`apply_overrides`)."""
    if is_api_format(workflow):
        return workflow
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        raise WorkflowError("not a ComfyUI workflow: expected an editor-format object with 'nodes' and 'links', "
                            "or an API-format prompt")
    root = _Graph(workflow)
    subgraphs = _subgraph_definitions(workflow)
    widget_inputs: Dict[str, List[str]] = {}
    instance_values: Dict[str, Dict[str, Any]] = {}

    def where(exe: _Exe) -> str:
        return f"node {exe.id} ({exe.node.get('type')})"

    def host_input(host: _Exe, index: int) -> Tuple[Optional[int], Optional[dict]]:
        """The subgraph node's input for input ``index`` of its definition (matched by name: a saved
        subgraph node lists only some of its inputs), with its index in the node's list."""
        defs = subgraphs[host.node["type"]].inputs
        if not 0 <= index < len(defs):
            raise WorkflowError(f"{where(host)}: its subgraph has no input {index}")
        name = defs[index].get("name")
        for i, inp in enumerate(host.node.get("inputs") or []):
            if inp.get("name") == name:
                return i, inp
        return None, None

    def from_subgraph_input(host: _Exe, index: int, seen) -> Optional[tuple]:
        """What the subgraph node ``host`` passes in through its definition's input ``index``: the source
        linked to its input, else the value of its widget for that input (else nothing)."""
        i, inp = host_input(host, index)
        if inp is not None and inp.get("link") is not None:
            return resolve_input(host, i, None, seen)
        values = instance_widgets(host)
        name = subgraphs[host.node["type"]].inputs[index].get("name")
        return ("value", values[name], host, name) if name in values else None

    def instance_widgets(host: _Exe) -> Dict[str, Any]:
        """The values of a subgraph node's widgets, by input name, as the frontend loads them: its
        ``widgets_values`` in the order of the inputs that have a widget, then each ``proxyWidgets`` entry
        ``["-1", name]`` takes the value at its own index (unless null).  An input without a saved value
        has none here: the inner widget keeps its own value."""
        if host.id in instance_values:
            return instance_values[host.id]
        sg = subgraphs[host.node["type"]]
        if sg.id not in widget_inputs:
            widget_inputs[sg.id] = sg.widget_inputs(subgraphs)
        names = widget_inputs[sg.id]
        saved = host.node.get("widgets_values")
        saved = saved if isinstance(saved, list) else []
        values = {name: saved[i] for i, name in enumerate(names) if i < len(saved)}
        proxies = (host.node.get("properties") or {}).get("proxyWidgets")
        if isinstance(proxies, str):
            try:
                proxies = json.loads(proxies)
            except json.JSONDecodeError:
                proxies = None
        for i, entry in enumerate(proxies if isinstance(proxies, list) else []):
            if (isinstance(entry, (list, tuple)) and len(entry) == 2 and str(entry[0]) == "-1" and entry[1] in names
                    and i < len(saved) and saved[i] is not None):
                values[entry[1]] = saved[i]
        instance_values[host.id] = values
        return values

    def resolve_input(exe: _Exe, slot: int, want: Any, seen) -> Optional[tuple]:
        """What feeds input ``slot`` of ``exe``: ("link", id, slot), ("value", v), ("value", v, subgraph
        node, widget name) for a subgraph node's widget, or None.  ``want``: the type of the input finally
        fed (which input a bypassed node passes through depends on it)."""
        ins = exe.node.get("inputs") or []
        if not 0 <= slot < len(ins):
            return None
        inp = ins[slot]
        link = exe.graph.links.get(inp.get("link")) if inp.get("link") is not None else None
        if link is None:
            return None
        origin_id, origin_slot = link[0], link[1]
        if exe.host is not None and origin_id == SUBGRAPH_INPUT_NODE:
            return from_subgraph_input(exe.host, origin_slot, seen)
        origin = exe.graph.nodes.get(origin_id)
        if origin is None:
            graph = "the workflow" if exe.host is None else f"subgraph '{exe.graph.name}'"
            raise WorkflowError(f"{where(exe)} input '{inp.get('name')}' is linked to node {origin_id}, which is "
                                f"not in {graph} (a broken link: reconnect it in the editor)")
        return resolve_output(_Exe(exe.path, exe.graph, origin, exe.host), origin_slot,
                              want if want is not None else inp.get("type"), seen)

    def resolve_output(exe: _Exe, slot: int, want: Any, seen) -> Optional[tuple]:
        """Follow reroutes, primitives, bypassed nodes and subgraph nodes back to a real output."""
        key = (exe.id, slot)
        if key in seen:
            return None
        seen = seen | {key}
        node, typ = exe.node, exe.node.get("type")
        sg = subgraphs.get(typ)
        if node.get("mode") == BYPASSED:
            if sg is not None:      # its slots as the editor has them: its definition's (a file may list fewer)
                node = {**node, "inputs": [host_input(exe, k)[1] or {"name": d.get("name"), "type": d.get("type")}
                                           for k, d in enumerate(sg.inputs)], "outputs": sg.outputs}
                exe = _Exe(exe.path, exe.graph, node, exe.host)
            i = _bypass_input(node, slot, want)
            return None if i is None else resolve_input(exe, i, None, seen)
        if sg is None and (node.get("mode") == MUTED or typ in NOTE_TYPES):
            return None
        if typ == "Reroute":
            return resolve_input(exe, 0, want, seen)
        if typ == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if sg is not None:
            link_ids = (sg.outputs[slot].get("linkIds") or []) if 0 <= slot < len(sg.outputs) else []
            link = sg.links.get(link_ids[0]) if link_ids else None
            if link is None:
                return None
            if link[0] == SUBGRAPH_INPUT_NODE:        # an input wired straight to an output
                return from_subgraph_input(exe, link[1], seen)
            host = exe.host
            while host is not None:
                if host.node.get("type") == typ:
                    raise WorkflowError(f"subgraph '{sg.name}' contains itself ({where(exe)})")
                host = host.host
            inner = sg.nodes.get(link[0])
            if inner is None:
                raise WorkflowError(f"subgraph '{sg.name}': its output {slot} comes from node {link[0]}, which is "
                                    "not in it")
            return resolve_output(_Exe(exe.path + (str(node["id"]),), sg, inner, exe), link[1], want, seen)
        return ("link", exe.id, slot)

    def executable(graph: _Graph, path: Tuple[str, ...], host: Optional[_Exe], inside: Tuple[str, ...]):
        for node in graph.nodes.values():
            exe = _Exe(path, graph, node, host)
            sg = subgraphs.get(node.get("type"))
            if sg is None:
                yield exe
                continue
            if sg.id in inside:
                raise WorkflowError(f"subgraph '{sg.name}' contains itself ({where(exe)})")
            if subgraph_nodes is not None:      # one entry per subgraph node, also those without a widget
                subgraph_nodes.setdefault(exe.id, {"title": node.get("title") or sg.name, "widgets": {}})
            # the inner nodes run by their own modes: the editor's mute / bypass of a subgraph node sets
            # them (in the definition); a subgraph node's own mode only bypasses its outputs
            yield from executable(sg, exe.path + (str(node["id"]),), exe, inside + (sg.id,))

    prompt: Dict[str, Dict[str, Any]] = {}
    for exe in executable(root, (), None, ()):
        node, typ = exe.node, exe.node.get("type")
        if typ in NOTE_TYPES or typ in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        cls = node_classes.get(typ)
        if cls is None and isinstance(typ, str) and typ.startswith(("workflow>", "workflow/")):
            raise WorkflowError(f"node {exe.id} is a group node ('{typ}'), which the converter does not support; "
                                "convert it back to nodes in the editor (right click > Convert to nodes)")
        if cls is None:
            raise WorkflowError(f"node {exe.id} has unknown type '{typ}': is the custom node pack that provides it "
                                "installed?")
        inputs: Dict[str, Any] = dict(widget_values(node, cls))
        for slot, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            resolved = resolve_input(exe, slot, None, frozenset())
            if resolved is None:
                inputs.pop(inp["name"], None)
            elif resolved[0] == "value":
                inputs[inp["name"]] = resolved[1]
                if len(resolved) == 4 and subgraph_nodes is not None:     # a subgraph node's widget
                    host, widget = resolved[2], resolved[3]
                    entry = subgraph_nodes.setdefault(host.id, {
                        "title": host.node.get("title") or subgraphs[host.node["type"]].name, "widgets": {}})
                    entry["widgets"].setdefault(widget, []).append((exe.id, inp["name"]))
            else:
                inputs[inp["name"]] = [resolved[1], resolved[2]]
        entry: Dict[str, Any] = {"class_type": typ, "inputs": inputs}
        title = node.get("title") or (None if display_names is None else display_names.get(typ, typ))
        if title:
            entry["_meta"] = {"title": title}
        prompt[exe.id] = entry
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
                    node_classes: Optional[Dict[str, Any]] = None,
                    subgraph_nodes: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """``NODE.INPUT=VALUE`` overrides; NODE is a node id, a title or a class type (when unique).  With
    ``node_classes``, an INPUT the node's class does not have is an error naming the ones it has.  With
    ``subgraph_nodes`` (from :func:`to_api`), NODE may also be a subgraph node and INPUT one of its own
    widgets: the value goes to every input that widget feeds."""
    subgraph_nodes = subgraph_nodes or {}
    named = {**prompt, **{nid: {"class_type": None, "inputs": dict.fromkeys(s["widgets"]),
                                "_meta": {"title": s["title"]}} for nid, s in subgraph_nodes.items()}}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"--set expects NODE.INPUT=VALUE, got {item!r}")
        target, raw = item.split("=", 1)
        node_ref, input_name, ids = _split_target(named, target)
        if not ids:
            raise WorkflowError(f"--set {item!r}: no node with id, title or type {node_ref!r}")
        if len(ids) > 1:
            raise WorkflowError(f"--set {item!r}: {node_ref!r} matches nodes {ids}; use a node id")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if ids[0] in subgraph_nodes:
            widgets = subgraph_nodes[ids[0]]["widgets"]
            if input_name not in widgets:
                raise WorkflowError(f"--set {item!r}: subgraph node {ids[0]} has no widget {input_name!r} that "
                                    f"feeds a node; its widgets: {', '.join(widgets) or 'none'} (an inner node's "
                                    f"input: --set {ids[0]}:<inner node id>.INPUT=VALUE)")
            for nid, name in widgets[input_name]:
                prompt[nid]["inputs"][name] = value
            continue
        node = prompt[ids[0]]
        cls = (node_classes or {}).get(node["class_type"])
        if cls is not None and input_name not in node.get("inputs", {}):
            names = [n for n, _, _ in _input_spec(cls)]
            if input_name not in names:
                raise WorkflowError(f"--set {item!r}: node {ids[0]} ({node['class_type']}) has no input "
                                    f"{input_name!r}; its inputs: {', '.join(names)}")
        node["inputs"][input_name] = value
