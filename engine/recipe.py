"""Merge recipes: a small JSON-able provenance record that travels with a merged model.

A recipe says how a MODEL or CLIP was made: the merge method and its parameters, the per-model
parameters, seed, block weights and mask of every MergeLab merge that produced it, nested: an input
that was itself a merge carries its own recipe.  It is kept in the patcher's ``model_options`` under
:data:`RECIPE_KEY`, which ComfyUI deep-copies on ``clone()``, so it follows the model through LoRA
loaders and other nodes; it never touches the weights.

ComfyUI does not record which file a MODEL was loaded from, so the save nodes add the other half
(:func:`graph_provenance`): the prompt graph upstream of the save node, with every loader's
``*_name`` file resolved and hashed (sha256 of the file, cached per path, size and mtime).

Writing a recipe into a saved file is :func:`build_file_recipe`; reading one back
(:func:`recipe_from_metadata`) and describing it in words (:func:`describe`) is for the
Load Merge Recipe node.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

RECIPE_KEY = "mergelab_recipe"           # in patcher.model_options
METADATA_KEY = "mergelab.recipe"         # in the saved file's safetensors metadata
FORMAT = "mergelab.recipe/1"
MAX_DEPTH = 32                           # nesting of merge records kept


# ---------------------------------------------------------------------------------------------
# JSON-able values
# ---------------------------------------------------------------------------------------------
def jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-serialisable description of ``value`` (parameters, block weights, masks...).

    Objects with ``to_dict()`` use it; dataclasses become dicts; tensors become a short description
    (a recipe never holds weights); anything else its ``repr``."""
    if _depth > 12:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v, _depth + 1) for v in items]
    try:
        import torch
        if isinstance(value, torch.Tensor):
            if value.numel() <= 16 and value.device.type != "meta":
                return {"tensor": value.detach().cpu().flatten().tolist(), "shape": list(value.shape),
                        "dtype": str(value.dtype).replace("torch.", "")}
            return {"tensor": None, "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        if isinstance(value, torch.dtype):
            return str(value).replace("torch.", "")
        if isinstance(value, torch.device):
            return str(value)
    except ImportError:  # pragma: no cover
        pass
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return jsonable(to_dict(), _depth + 1)
        except Exception:  # noqa: BLE001 - fall back to repr
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: jsonable(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}}
    return repr(value)


# ---------------------------------------------------------------------------------------------
# the recipe on a model object
# ---------------------------------------------------------------------------------------------
def _patcher(obj):
    if obj is None:
        return None
    if hasattr(obj, "cond_stage_model") and hasattr(obj, "patcher"):
        return obj.patcher
    return obj


def get_recipe(obj) -> Optional[Dict[str, Any]]:
    """The recipe recorded on a MODEL patcher or CLIP (a copy), or None."""
    mp = _patcher(obj)
    opts = getattr(mp, "model_options", None)
    if not isinstance(opts, dict):
        return None
    rec = opts.get(RECIPE_KEY)
    return copy.deepcopy(rec) if rec is not None else None


def set_recipe(obj, recipe: Optional[Dict[str, Any]]) -> None:
    """Attach ``recipe`` to ``obj`` (call it on a clone you own: it changes that patcher only)."""
    mp = _patcher(obj)
    if mp is None or not isinstance(getattr(mp, "model_options", None), dict):
        raise TypeError(f"cannot attach a recipe to {type(obj).__name__}")
    if recipe is None:
        mp.model_options.pop(RECIPE_KEY, None)
    else:
        json.dumps(recipe)          # must stay JSON-able
        mp.model_options[RECIPE_KEY] = recipe


def _model_kind(obj) -> str:
    return "clip" if hasattr(obj, "cond_stage_model") and hasattr(obj, "patcher") else "model"


def model_family(obj) -> str:
    if obj is None:
        return ""
    if _model_kind(obj) == "clip":
        cls = type(obj.cond_stage_model)
        return f"CLIP:{cls.__name__}"
    m = getattr(_patcher(obj), "model", None)
    cfg = getattr(m, "model_config", None)
    return f"{type(m).__name__}:{type(cfg).__name__ if cfg is not None else '?'}"


def describe_source(obj) -> Dict[str, Any]:
    """What is known about one input model: its architecture, the recipe it carries (if it was
    merged), and the number of patches (LoRAs / ComfyUI merges) on it."""
    out: Dict[str, Any] = {"family": model_family(obj)}
    rec = get_recipe(obj)
    mp = _patcher(obj)
    if rec is not None:
        out["recipe"] = _trim(rec, MAX_DEPTH)
        recorded = rec.get("patches_uuid")
        if recorded is not None and recorded != str(getattr(mp, "patches_uuid", "")) \
                and rec.get("patch_entries") != _patch_entries(mp):
            # patches were added after the merge (a LoRA, a ComfyUI merge node...): the graph has them.
            # ComfyUI renews the uuid on every add_patches, also one that matched no key (a UNet-only
            # LoRA on a CLIP), so the number of patch entries must have changed too
            out["changed_after_recipe"] = True
    patches = getattr(mp, "patches", None)
    if isinstance(patches, dict):
        n = sum(1 for v in patches.values() if v)
        if n:
            out["patched_keys"] = n
    return out


def _patch_entries(mp) -> Optional[int]:
    patches = getattr(mp, "patches", None)
    return sum(len(v) for v in patches.values()) if isinstance(patches, dict) else None


def _dedupe_sources(rec: Dict[str, Any]) -> None:
    """A merge whose base and inputs carry the same recipe (a merge result wired as base and as models)
    stores it once: the others say ``{"same_as": <label>}``.  Without this every level held it three
    times, so reusing results grew the recipe about 3x per merge (12 merges: a 200 MB header)."""
    seen: Dict[str, str] = {}
    slots = []
    if isinstance(rec.get("base"), dict):
        slots.append(("base", rec["base"]))
    for i in rec.get("inputs") or []:
        if isinstance(i.get("source"), dict):
            slots.append((i.get("name", "?"), i["source"]))
    for label, src in slots:
        sub = src.get("recipe")
        if not isinstance(sub, dict):
            continue
        ident = sub.get("patches_uuid") or json.dumps(sub, sort_keys=True)
        if ident in seen:
            src["recipe"] = {"same_as": seen[ident]}
        else:
            seen[ident] = label


MAX_RECIPE_CHARS = 1 << 20           # a record larger than this keeps fewer levels of nested records


def _bounded(rec: Dict[str, Any]) -> Dict[str, Any]:
    """``rec`` with nested merge records cut at the depth that keeps it under MAX_RECIPE_CHARS (a DAG of
    merges that share ancestors repeats them); says so in ``nested_trimmed``."""
    if len(json.dumps(rec)) <= MAX_RECIPE_CHARS:
        return rec
    for depth in (16, 8, 4, 2, 1, 0):
        cut = _trim(rec, depth + 1)
        cut["nested_trimmed"] = (f"merge records more than {depth} level(s) down were left out: the recipe "
                                 f"exceeded {MAX_RECIPE_CHARS // 1024} KB")
        if len(json.dumps(cut)) <= MAX_RECIPE_CHARS:
            return cut
    return cut


def _trim(rec: Dict[str, Any], depth: int) -> Dict[str, Any]:
    if depth <= 0:
        return {"truncated": True}
    rec = dict(rec)
    for k in ("base",):
        if isinstance(rec.get(k), dict) and "recipe" in rec[k]:
            rec[k] = dict(rec[k], recipe=_trim(rec[k]["recipe"], depth - 1))
    if isinstance(rec.get("inputs"), list):
        rec["inputs"] = [dict(i, source=dict(i["source"], recipe=_trim(i["source"]["recipe"], depth - 1)))
                         if isinstance(i.get("source"), dict) and "recipe" in i["source"] else i
                         for i in rec["inputs"]]
    return rec


def record_merge(result, method, inputs, options=None, *, base=None, keys: Optional[Iterable[str]] = None,
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Record on ``result`` (the patched clone merge_models returns) how it was made; returns the record.

    ``method``: the MergeMethod (``to_dict()`` is stored); ``inputs``: the MergeInput list (model,
    params, name); ``options``: the MergeOptions (seed, device, compute_dtype, on_mismatch,
    block_weights, mask); ``base``: the base model or None; ``keys``: the keys merged (only their
    count is kept); ``extra``: more JSON-able facts.  The record replaces any recipe ``result``
    inherited from the model it was cloned from (that one is kept inside, as the base's or
    model 1's source).  Never touches weights.
    """
    rec: Dict[str, Any] = {
        "op": "merge",
        "kind": _model_kind(result),
        "method": jsonable(method),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if options is not None:
        for name in ("seed", "device", "compute_dtype", "on_mismatch"):
            if hasattr(options, name):
                rec[name] = jsonable(getattr(options, name))
        for name in ("block_weights", "mask"):
            v = getattr(options, name, None)
            if v is not None:
                rec[name] = jsonable(v)
    if base is not None:
        rec["base"] = describe_source(base)
    rec["inputs"] = [{"name": getattr(i, "name", "") or f"model {n + 1}",
                      "params": jsonable(dict(getattr(i, "params", {}) or {})),
                      "source": describe_source(getattr(i, "model", None))}
                     for n, i in enumerate(inputs)]
    if keys is not None:
        rec["keys_merged"] = sum(1 for _ in keys)
    if extra:
        rec.update(jsonable(extra))
    _dedupe_sources(rec)
    rec = _bounded(rec)
    uid = getattr(_patcher(result), "patches_uuid", None)
    if uid is not None:
        rec["patches_uuid"] = str(uid)
        rec["patch_entries"] = _patch_entries(_patcher(result))
    set_recipe(result, rec)
    return rec


# ---------------------------------------------------------------------------------------------
# file hashes
# ---------------------------------------------------------------------------------------------
_hash_cache: Dict[Tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: str, check: Optional[Callable[[], None]] = None, chunk: int = 16 << 20,
                progress: Optional[Callable[[int, int], None]] = None) -> str:
    """sha256 of a file's bytes (hex), cached per (real path, size, mtime); ``check()`` is called
    between chunks (Cancel), ``progress(bytes_done, size)`` too."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        hit = _hash_cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    done = 0
    with open(real, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            done += n
            if check is not None:
                check()
            if progress is not None:
                progress(done, st.st_size)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_cache[key] = digest
    return digest


def cached_sha256(path: str) -> Optional[str]:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    with _hash_lock:
        return _hash_cache.get((real, st.st_size, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------
# provenance from the prompt graph
# ---------------------------------------------------------------------------------------------
# widget name -> model folders to look in first; other folders are tried after these
_NAME_FOLDERS = {
    "ckpt_name": ("checkpoints",), "lora_name": ("loras",), "unet_name": ("diffusion_models", "unet"),
    "vae_name": ("vae",), "clip_name": ("text_encoders", "clip"), "control_net_name": ("controlnet",),
    "style_model_name": ("style_models",), "clip_vision_name": ("clip_vision",), "gligen_name": ("gligen",),
    "upscale_model_name": ("upscale_models",), "hypernetwork_name": ("hypernetworks",),
    "model_name": ("upscale_models", "checkpoints", "diffusion_models"),
}
_SKIP_FOLDERS = {"custom_nodes", "configs"}


def _is_link(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (str, int))
            and isinstance(v[1], int) and not isinstance(v[1], bool))


def resolve_model_file(widget: str, value: str) -> Optional[Tuple[str, str]]:
    """``(folder, full path)`` of the model file a ``*_name`` widget value names, or None."""
    import folder_paths
    if not isinstance(value, str) or not value or len(value) > 4096:
        return None
    base = widget.rstrip("0123456789")
    first = _NAME_FOLDERS.get(widget, _NAME_FOLDERS.get(base, ()))
    rest = [f for f in getattr(folder_paths, "folder_names_and_paths", {}) if f not in first and f not in _SKIP_FOLDERS]
    for folder in (*first, *rest):
        try:
            p = folder_paths.get_full_path(folder, value)
        except Exception:  # noqa: BLE001 - unknown folder names on other versions
            p = None
        if p and os.path.isfile(p):
            return folder, p
    return None


def _get_node(prompt, dynprompt, node_id):
    if dynprompt is not None:
        try:
            return dynprompt.get_node(node_id)
        except Exception:  # noqa: BLE001 - not in the dynamic prompt
            pass
    if isinstance(prompt, dict):
        return prompt.get(node_id, prompt.get(str(node_id)))
    return None


def graph_provenance(prompt, node_id, dynprompt=None, hash_files: bool = True,
                     check: Optional[Callable[[], None]] = None,
                     inputs: Optional[Iterable[str]] = None,
                     progress_factory: Optional[Callable[[], Callable[[int, int], None]]] = None
                     ) -> Optional[Dict[str, Any]]:
    """The nodes upstream of ``node_id`` in the prompt (API format), ordered inputs-first, with their
    literal inputs (links as ``{"from": id, "slot": n}``) and, for every ``*_name`` widget naming a
    model file, the file's folder, size and sha256.  ``inputs``: only follow these inputs of the start
    node.  None when there is no prompt."""
    if prompt is None and dynprompt is None:
        return None
    start = _get_node(prompt, dynprompt, node_id)
    if start is None:
        return None
    order: List[str] = []
    seen = set()

    def visit(nid, depth=0):
        nid = str(nid)
        if nid in seen or depth > 10000:
            return
        seen.add(nid)
        node = _get_node(prompt, dynprompt, nid)
        if node is None:
            return
        for name, v in (node.get("inputs") or {}).items():
            if _is_link(v):
                visit(v[0], depth + 1)
        order.append(nid)

    for name, v in (start.get("inputs") or {}).items():
        if inputs is not None and name not in inputs:
            continue
        if _is_link(v):
            visit(v[0])
    nodes_out: List[Dict[str, Any]] = []
    files: Dict[str, Dict[str, Any]] = {}
    for nid in order:
        node = _get_node(prompt, dynprompt, nid) or {}
        entry: Dict[str, Any] = {"id": nid, "class_type": node.get("class_type", "?")}
        title = (node.get("_meta") or {}).get("title") if isinstance(node.get("_meta"), dict) else None
        if title:
            entry["title"] = title
        ins: Dict[str, Any] = {}
        for name, v in (node.get("inputs") or {}).items():
            if _is_link(v):
                ins[name] = {"from": str(v[0]), "slot": v[1]}
                continue
            ins[name] = jsonable(v)
            if name.endswith("_name") or name.rstrip("0123456789").endswith("_name"):
                found = resolve_model_file(name, v) if isinstance(v, str) else None
                if found is not None:
                    folder, path = found
                    ref = f"{folder}/{v}"
                    if ref not in files:
                        info: Dict[str, Any] = {"folder": folder, "name": v, "size": os.path.getsize(path)}
                        digest = cached_sha256(path)
                        if digest is None and hash_files:
                            prog = progress_factory() if progress_factory is not None else None
                            digest = file_sha256(path, check, progress=prog)
                        if digest:
                            info["sha256"] = digest
                        files[ref] = info
                    entry.setdefault("files", {})[name] = ref
        entry["inputs"] = ins
        nodes_out.append(entry)
    return {"start": str(node_id), "nodes": nodes_out, "files": files}


# ---------------------------------------------------------------------------------------------
# the recipe in a saved file
# ---------------------------------------------------------------------------------------------
def build_file_recipe(parts: Dict[str, Any], saved: Dict[str, Any], graph: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The recipe written into a file: ``parts`` maps "model" / "clip" / "vae" to the object saved
    (its recorded recipe, or what is known about it); ``saved``: how it was saved; ``graph``: see
    :func:`graph_provenance`."""
    out: Dict[str, Any] = {"format": FORMAT, "saved": jsonable(saved), "parts": {}}
    for name, obj in parts.items():
        if obj is None:
            continue
        if name == "vae":
            out["parts"][name] = {"family": type(getattr(obj, "first_stage_model", obj)).__name__}
        else:
            out["parts"][name] = describe_source(obj)
    if graph is not None:
        out["graph"] = graph
    return out


def recipe_to_metadata(recipe: Dict[str, Any]) -> str:
    return json.dumps(recipe, separators=(",", ":"), sort_keys=False, ensure_ascii=False)


def recipe_from_metadata(metadata: Dict[str, str]) -> Optional[Dict[str, Any]]:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {"error": "the mergelab.recipe metadata is not valid JSON", "raw": raw[:2000]}
    return rec if isinstance(rec, dict) else {"value": rec}


# ---------------------------------------------------------------------------------------------
# words
# ---------------------------------------------------------------------------------------------
def _fmt_params(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items())


def _describe_merge(rec: Dict[str, Any], indent: str, lines: List[str], depth: int = 0) -> None:
    m = rec.get("method") or {}
    name = m.get("method", "?") if isinstance(m, dict) else str(m)
    params = _fmt_params(m.get("params")) if isinstance(m, dict) else ""
    head = f"{indent}{rec.get('kind', 'model')} merge: {name}" + (f"({params})" if params else "")
    bits = [f"seed {rec['seed']}" if "seed" in rec else "", rec.get("compute_dtype", "")]
    bits = [b for b in bits if b]
    lines.append(head + (f"  [{', '.join(bits)}]" if bits else ""))
    if rec.get("block_weights") is not None:
        lines.append(f"{indent}  block weights: {json.dumps(rec['block_weights'])[:400]}")
    if rec.get("mask") is not None:
        lines.append(f"{indent}  mask: {json.dumps(rec['mask'])[:400]}")

    def src_line(label, src):
        src = src if isinstance(src, dict) else {}
        fam = src.get("family", "")
        sub = src.get("recipe")
        same = f" (the same merge as {sub['same_as']})" if isinstance(sub, dict) and "same_as" in sub else ""
        cut = " (its merge record was left out: too deep)" if isinstance(sub, dict) and sub.get("truncated") else ""
        lines.append(f"{indent}  {label}: {fam}" + (f" (+{src['patched_keys']} patched keys)" if src.get("patched_keys") else "")
                     + same + cut)
        if isinstance(sub, dict) and depth < MAX_DEPTH and sub.get("op") == "merge":
            _describe_merge(sub, indent + "    ", lines, depth + 1)

    if isinstance(rec.get("base"), dict):
        src_line("base", rec["base"])
    for inp in rec.get("inputs") or []:
        p = _fmt_params(inp.get("params"))
        src_line(f"{inp.get('name', '?')}" + (f" [{p}]" if p else ""), inp.get("source"))


def describe(recipe: Optional[Dict[str, Any]], metadata: Optional[Dict[str, str]] = None) -> str:
    """A readable account of a file recipe (and of the file's modelspec metadata)."""
    lines: List[str] = []
    meta = metadata or {}
    spec = {k[len("modelspec."):]: v for k, v in meta.items() if k.startswith("modelspec.")}
    if spec:
        lines.append("modelspec: " + ", ".join(f"{k}={v}" for k, v in spec.items()))
    if recipe is None:
        lines.append("This file has no MergeLab recipe (it was not saved by a MergeLab save node, or the "
                     "recipe was turned off).")
        others = sorted(k for k in meta if not k.startswith("modelspec."))
        if others:
            lines.append("Other metadata keys: " + ", ".join(others))
        return "\n".join(lines)
    if "error" in recipe:
        lines.append(recipe["error"])
        return "\n".join(lines)
    try:
        _describe_file(recipe, lines)
    except (AttributeError, TypeError, KeyError, ValueError):
        lines.append("The recipe's structure is not one MergeLab writes (edited, or from another tool): see "
                     "the JSON output.")
    return "\n".join(lines)


def _describe_lora(src: Dict[str, Any], indent: str, lines: List[str], depth: int = 0) -> None:
    """A LoRA's own record (engine.lora*: extract / merge / resize / stack / load) in a few lines."""
    kind = src.get("kind", "?")
    name = src.get("name", "")
    bits = []
    if isinstance(src.get("method"), dict):
        m = src["method"]
        p = _fmt_params(m.get("params"))
        bits.append(f"{m.get('method', '?')}" + (f"({p})" if p else ""))
    elif isinstance(src.get("method"), str):
        bits.append(src["method"])
    if isinstance(src.get("options"), dict):
        bits.append(_fmt_params(src["options"])[:400])
    for k in ("rank", "seed", "file", "key_format"):
        v = src.get(k)
        if v not in (None, "", {}):
            bits.append(f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    lines.append(f"{indent}{kind}" + (f" '{name}'" if name else "") + (": " + ", ".join(bits) if bits else ""))
    if depth >= MAX_DEPTH:
        return
    subs = []
    for key in ("inputs", "parts"):
        for item in src.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("lora"), dict):
                strength = {k: item[k] for k in ("strength_model", "strength_clip", "params") if k in item}
                subs.append((item.get("name") or "", strength, item["lora"]))
    if isinstance(src.get("lora"), dict):
        subs.append(("", {}, src["lora"]))
    for label, strength, sub in subs:
        extra = _fmt_params(strength)
        lines.append(f"{indent}  from {label or 'a LoRA'}" + (f" [{extra}]" if extra else "") + ":")
        _describe_lora(sub, indent + "    ", lines, depth + 1)


def _describe_file(recipe: Dict[str, Any], lines: List[str]) -> None:
    saved = recipe.get("saved") or {}
    if saved:
        lines.append("Saved: " + ", ".join(f"{k}={v}" for k, v in saved.items() if v not in (None, "")))
    for part, src in (recipe.get("parts") or {}).items():
        if part == "lora" and "family" not in src:
            lines.append("lora:")
            _describe_lora(src, "  ", lines)
            continue
        lines.append(f"{part}: {src.get('family', '')}" +
                     (f" (+{src['patched_keys']} patched keys)" if src.get("patched_keys") else "") +
                     (" - changed after its last MergeLab merge (LoRA / other merge; see the graph)"
                      if src.get("changed_after_recipe") else ""))
        if isinstance(src.get("recipe"), dict) and src["recipe"].get("op") == "merge":
            _describe_merge(src["recipe"], "  ", lines)
    graph = recipe.get("graph")
    if isinstance(graph, dict):
        files = graph.get("files") or {}
        if files:
            lines.append("Input files:")
            for ref, info in files.items():
                h = info.get("sha256")
                lines.append(f"  {ref}  ({_size(info.get('size'))}" + (f", sha256 {h}" if h else ", not hashed") + ")")
        nodes = graph.get("nodes") or []
        if nodes:
            lines.append("Graph (upstream of the save node, inputs first):")
            for n in nodes:
                lits = {k: v for k, v in (n.get("inputs") or {}).items() if not (isinstance(v, dict) and "from" in v)}
                links = {k: v["from"] for k, v in (n.get("inputs") or {}).items() if isinstance(v, dict) and "from" in v}
                s = f"  #{n.get('id')} {n.get('class_type')}"
                if lits:
                    s += " " + _fmt_params(lits)
                if links:
                    s += " <- " + ", ".join(f"{k}: #{v}" for k, v in links.items())
                lines.append(s)


def _size(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
