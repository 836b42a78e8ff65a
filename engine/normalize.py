"""Normalize Model: scale model A's parameter norms to model B's, for every architecture ComfyUI supports.

Modes
-----
``attn_only`` — the function-preserving attention rescale.  In every attention the queries are
multiplied by ``s`` and the keys divided by ``s`` (weights and biases alike), so ``Q Kᵀ`` and the
model's outputs do not change (up to float rounding; with QK-norm layers the scale is normalized away
anyway).  Nothing else changes.

    Choice of ``s``.  Let ``Qa, Ka, Qb, Kb`` be the Frobenius norms of the query and key projections
    (weights and biases together) of A and B.  Under the constraint ``Q' = s·Q, K' = K/s`` the product
    ``|Q'|·|K'| = |Qa|·|Ka|`` cannot change, so both norms can only be matched when
    ``|Qa|·|Ka| = |Qb|·|Kb|``.  We minimise the squared log errors
    ``(log|Q'| - log|Qb|)² + (log|K'| - log|Kb|)²``; setting the derivative in ``log s`` to zero gives

        log s = ½ (log(|Qb|/|Qa|) - log(|Kb|/|Ka|)),  i.e.  s = sqrt( (|Qb|/|Qa|) / (|Kb|/|Ka|) ).

    Both residual log errors are then equal, which is the same as: **after the rescale A's ratio
    |Q|/|K| equals B's** — the query/key balance of B is copied exactly, the (invariant) product is
    left alone.  When several projections share one attention (joint attention of two streams:
    Flux/HunyuanVideo/Hunyuan3D double blocks ``img_attn``+``txt_attn``, SD3 ``x_block``+``context_block``,
    AuraFlow ``w1*``+``w2*``, Mochi ``qkv_x``+``qkv_y``, Qwen-Image ``to_*``+``add_*_proj``, HiDream
    ``to_*``+``to_*_t``; several key sets for one query: Wan ``k`` + ``k_img``) they must share one
    ``s``; their norms are pooled (the norm of the concatenated projections) in the formula above.

``all`` — every weight is scaled to B's norm (``W' = W·|Wb|/|Wa|``, key by key) and the layer's bias
by the same factor, so the layer's output is scaled consistently (``W x + b -> f·(W x + b)``).  Keys
that are not a ``<layer>.weight``/``<layer>.bias`` pair (norm scales, embeddings, ...) are scaled to
B's norm by their own factor.  This changes the model's function by design.

``strength`` raises every factor to a power: 1 = match B, 0 = unchanged, 0.5 = half way in log scale,
-1 = push away from B (DareMerge's "magnify").  Factors whose norms are zero or not finite are left at 1.

Finding the queries and keys (generic, from key names and shapes only)
----------------------------------------------------------------------
Each ``<module>.weight`` (2-D or more) is classified by the module's name:

* query projections ``to_q q_proj q w1q w2q to_q_t add_q_proj q_linear linear_q linear1_q``;
  key projections ``to_k k_proj k k_img w1k w2k to_k_t add_k_proj linear_k linear_pos`` (``linear_pos``:
  the position keys of relative-position attention) and the query-side biases ``pos_bias_u/v``;
  a Sequential's first element counts as the projection (``to_q.0``, Cosmos);
* fused ``[k | v]`` rows: ``to_kv kv_proj kv_linear linear1_kv``;
* fused ``[q | k | v]`` rows: ``qkv Wqkv to_qkv qkv_x qkv_y`` and ``in_proj_weight``; with grouped-query
  attention (Lumina 2: more query rows than key rows) the query rows are the input width of the sibling
  output projection (``out``/``proj``/``to_out``/...), the rest split evenly between keys and values;
* Flux-style single blocks: ``linear1`` rows ``[q | k | v | mlp]`` (each of q, k, v as wide as the
  input) when the block also has ``linear2`` and a ``norm.query_norm``/``modulation``.

Projections under one parent module form one attention (one ``s``), joined across streams by the rules
above.  A parent with queries but no keys (or keys but no queries) is reported, never changed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..merge_methods import MergeError
from ..merge_methods.ops import sumsq

MODES = ("attn_only", "all")

Q_NAMES = frozenset({"to_q", "q_proj", "q", "w1q", "w2q", "to_q_t", "add_q_proj", "q_linear", "linear_q",
                     "linear1_q"})
K_NAMES = frozenset({"to_k", "k_proj", "k", "k_img", "w1k", "w2k", "to_k_t", "add_k_proj", "linear_k",
                     "linear_pos"})
KV_NAMES = frozenset({"to_kv", "kv_proj", "kv_linear", "linear1_kv"})
QKV_NAMES = frozenset({"qkv", "Wqkv", "to_qkv", "qkv_x", "qkv_y", "__in_proj__"})
Q_PARAMS = frozenset({"pos_bias_u", "pos_bias_v"})
OUT_NAMES = ("out", "proj", "to_out", "to_out.0", "out_proj", "o_proj", "o", "output_proj", "c_proj")
_JOINT_RULES = (
    (re.compile(r"^((?:.*\.)?)(img_attn|txt_attn)$"), r"\1{img,txt}_attn"),
    (re.compile(r"^((?:.*\.)?)(x_block|context_block)\.attn$"), r"\1{x,context}_block.attn"),
)


class NormalizeError(MergeError):
    pass


@dataclass(frozen=True)
class Part:
    """Rows ``[start, start + length)`` (dim 0) of ``weight`` (and of ``bias``) playing one role."""

    role: str                  # "q" or "k"
    weight: str                # key of the weight (or of a bare parameter)
    bias: Optional[str]
    start: int
    length: int
    full: bool                 # the rows are the whole tensor


@dataclass
class AttentionGroup:
    name: str
    parts: List[Part] = field(default_factory=list)

    def keys(self) -> List[str]:
        out: Dict[str, None] = {}
        for p in self.parts:
            out.setdefault(p.weight, None)
            if p.bias:
                out.setdefault(p.bias, None)
        return list(out)

    @property
    def fused(self) -> bool:
        return any(not p.full for p in self.parts)


@dataclass
class AttentionPlan:
    groups: List[AttentionGroup]
    unpaired: List[str]               # parent modules with queries but no keys, or keys but no queries
    problems: List[str]               # fused layouts that could not be split


def _split_module(key: str) -> Tuple[str, str]:
    """``(module path, parameter name)``; nn.MultiheadAttention's ``in_proj_weight`` -> (``<parent>.__in_proj__``,
    ``weight``) (a marker name: a module really called ``in_proj`` is not a fused qkv)."""
    mod, _, param = key.rpartition(".")
    if param in ("in_proj_weight", "in_proj_bias"):
        return (mod + ".__in_proj__" if mod else "__in_proj__"), param[len("in_proj_"):]
    return mod, param


def _role_and_parent(module: str) -> Tuple[str, str]:
    """(name, parent) of a module, looking through a Sequential's first element (``to_q.0``)."""
    parent, _, name = module.rpartition(".")
    if name == "0" and parent:
        pp, _, pname = parent.rpartition(".")
        if pname in Q_NAMES or pname in K_NAMES:
            return pname, pp
    return name, parent


def _joint_name(parent: str) -> str:
    for pat, repl in _JOINT_RULES:
        if pat.match(parent):
            return pat.sub(repl, parent)
    return parent


def find_attention(shapes: Mapping[str, Sequence[int]]) -> AttentionPlan:
    """Find every attention's query and key projections from key names and shapes alone."""
    shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    modules: Dict[str, Dict[str, str]] = {}
    for key in shapes:
        mod, param = _split_module(key)
        modules.setdefault(mod, {})[param] = key
    groups: Dict[str, AttentionGroup] = {}
    order: List[str] = []
    sides: Dict[str, set] = {}
    problems: List[str] = []

    def add(parent: str, part: Part) -> None:
        gname = _joint_name(parent)
        if gname not in groups:
            groups[gname] = AttentionGroup(gname)
            order.append(gname)
        groups[gname].parts.append(part)
        sides.setdefault(gname, set()).add(part.role)

    for mod, params in modules.items():
        wkey = params.get("weight")
        bkey = params.get("bias")
        name, parent = _role_and_parent(mod)
        if wkey is None:
            continue
        wshape = shapes[wkey]
        if len(wshape) < 2:
            continue   # norms and 1-D scales are never projections
        rows = wshape[0]
        if name in Q_NAMES or name in K_NAMES:
            add(parent, Part("q" if name in Q_NAMES else "k", wkey, bkey, 0, rows, True))
        elif name in KV_NAMES:
            if rows % 2:
                problems.append(f"{wkey}: {rows} rows cannot be split into keys and values")
                continue
            add(parent, Part("k", wkey, bkey, 0, rows // 2, False))
        elif name in QKV_NAMES:
            q_rows = _gqa_query_rows(modules, shapes, parent, rows)
            if q_rows is None:
                if rows % 3:
                    problems.append(f"{wkey}: {rows} rows cannot be split into queries, keys and values")
                    continue
                q_rows = k_rows = rows // 3
            else:
                k_rows = (rows - q_rows) // 2
            add(parent, Part("q", wkey, bkey, 0, q_rows, False))
            add(parent, Part("k", wkey, bkey, q_rows, k_rows, False))
        elif name == "linear1" and _flux_single(modules, parent):
            width = wshape[1]
            if rows < 3 * width:
                problems.append(f"{wkey}: {rows} rows, fewer than 3 x {width} (q, k, v)")
                continue
            add(parent, Part("q", wkey, bkey, 0, width, False))
            add(parent, Part("k", wkey, bkey, width, width, False))
    # query-side bare parameters (pos_bias_u / pos_bias_v) join their module's attention
    for key in shapes:
        mod, _, param = key.rpartition(".")
        if param in Q_PARAMS and len(shapes[key]) >= 1:
            gname = _joint_name(mod)
            if gname in groups:
                groups[gname].parts.append(Part("q", key, None, 0, shapes[key][0] if shapes[key] else 1, True))
    out, unpaired = [], []
    for g in order:
        if sides[g] == {"q", "k"}:
            out.append(groups[g])
        else:
            unpaired.append(g)
    return AttentionPlan(out, unpaired, problems)


def _gqa_query_rows(modules, shapes, parent: str, rows: int) -> Optional[int]:
    """Query rows of a fused qkv with more query than key heads, from the output projection's width."""
    for out_name in OUT_NAMES:
        params = modules.get(f"{parent}.{out_name}" if parent else out_name)
        if not params or "weight" not in params:
            continue
        s = shapes[params["weight"]]
        if len(s) < 2:
            continue
        q = s[1]
        if q * 3 == rows:
            return None
        rest = rows - q
        if 0 < rest < 2 * q and rest % 2 == 0:
            return q
        return None
    return None


def _flux_single(modules, parent: str) -> bool:
    p = parent + "." if parent else ""
    has_linear2 = f"{p}linear2" in modules
    has_qk = f"{p}norm.query_norm" in modules or f"{p}modulation.lin" in modules or f"{p}modulation" in modules
    return has_linear2 and has_qk


# ---------------------------------------------------------------------------------------------
# layers for mode "all"
# ---------------------------------------------------------------------------------------------
def layer_units(keys: Iterable[str]) -> List[Tuple[str, Optional[str]]]:
    """``[(key whose norm sets the factor, bias key scaled by the same factor or None)]`` covering every
    key once: ``<m>.weight`` with ``<m>.bias``; ``in_proj_weight`` with ``in_proj_bias``; others alone."""
    keys = list(keys)
    have = set(keys)
    used = set()
    units = []
    for k in keys:
        if k in used:
            continue
        partner = None
        if k.endswith(".weight") and k[:-len("weight")] + "bias" in have:
            partner = k[:-len("weight")] + "bias"
        elif k.endswith("in_proj_weight") and k[:-len("weight")] + "bias" in have:
            partner = k[:-len("weight")] + "bias"
        elif k.endswith(".bias") and k[:-len("bias")] + "weight" in have:
            continue   # taken with its weight
        elif k.endswith("in_proj_bias") and k[:-len("bias")] + "weight" in have:
            continue
        units.append((k, partner))
        used.add(k)
        if partner:
            used.add(partner)
    return units


# ---------------------------------------------------------------------------------------------
# the computation (plain tensors; ComfyUI-free)
# ---------------------------------------------------------------------------------------------
@dataclass
class Change:
    """A new value for rows ``[start, start+length)`` of ``key`` (the whole tensor when ``full``)."""

    key: str
    start: int
    length: int
    full: bool
    tensor: torch.Tensor


@dataclass
class NormalizeReport:
    mode: str
    factors: List[Tuple[str, float]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    unpaired: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"Normalize Model ({self.mode}): {len(self.factors)} "
                 + ("attention(s) rescaled" if self.mode == "attn_only" else "layer(s) scaled")]
        if self.factors:
            vals = [f for _, f in self.factors]
            lines.append(f"factor min {min(vals):.6g}, median {sorted(vals)[len(vals) // 2]:.6g}, max {max(vals):.6g}")
        if self.skipped:
            lines.append(f"left unchanged (zero or non-finite norms): {len(self.skipped)}: " + ", ".join(self.skipped[:5])
                         + (" ..." if len(self.skipped) > 5 else ""))
        if self.unpaired:
            lines.append("query or key projections without their partner (not changed): " + ", ".join(self.unpaired[:5]))
        if self.problems:
            lines.append("not split: " + "; ".join(self.problems[:5]))
        lines.append("")
        lines.extend(f"{name}: {f:.6g}" for name, f in self.factors)
        return "\n".join(lines)


def _sq_norm(t: torch.Tensor) -> float:
    """Σ t² (fp32 chunks summed in fp64: as accurate as an fp64 copy of the tensor, 3x faster)."""
    if not t.numel():
        return 0.0
    return float(sumsq(t if t.dtype in (torch.float32, torch.float64) else t.float()))


def _rows(t: torch.Tensor, p: Part) -> torch.Tensor:
    return t if p.full else t.narrow(0, p.start, p.length)


def attention_factor(qa: float, ka: float, qb: float, kb: float) -> Optional[float]:
    """``s = sqrt((|Qb|/|Qa|) / (|Kb|/|Ka|))`` from norms; None when undefined."""
    vals = (qa, ka, qb, kb)
    if not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    return math.sqrt((qb / qa) / (kb / ka))


def normalize_tensors(shapes: Mapping[str, Sequence[int]], read_a: Callable[[str], torch.Tensor],
                      read_b: Callable[[str], torch.Tensor], mode: str = "attn_only", strength: float = 1.0,
                      progress: Optional[Callable[[int, int], None]] = None,
                      on_change: Optional[Callable[[Change], None]] = None) -> Tuple[List[Change], NormalizeReport]:
    """Compute the changes to model A.  ``read_a(key)`` / ``read_b(key)`` return fp32 tensors (fresh
    copies: they may be modified).  Returns the changes (or hands each to ``on_change`` and returns
    an empty list) and a report."""
    if mode not in MODES:
        raise NormalizeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise NormalizeError(f"strength must be a number, got {strength!r}") from None
    if not math.isfinite(strength):
        raise NormalizeError(f"strength must be finite, got {strength!r}")
    report = NormalizeReport(mode)
    changes: List[Change] = []
    emit = on_change or changes.append

    if mode == "attn_only":
        plan = find_attention(shapes)
        report.unpaired, report.problems = plan.unpaired, plan.problems
        for i, g in enumerate(plan.groups):
            _interrupt()
            ta = {k: read_a(k) for k in g.keys()}
            sq = {"q": [0.0, 0.0], "k": [0.0, 0.0]}    # [A, B]
            for k in g.keys():
                tb = read_b(k)
                for p in g.parts:
                    if k in (p.weight, p.bias):
                        sq[p.role][0] += _sq_norm(_rows(ta[k], p))
                        sq[p.role][1] += _sq_norm(_rows(tb, p))
                del tb
            s = attention_factor(math.sqrt(sq["q"][0]), math.sqrt(sq["k"][0]),
                                 math.sqrt(sq["q"][1]), math.sqrt(sq["k"][1]))
            if s is None:
                report.skipped.append(g.name)
            else:
                s = s ** strength
                report.factors.append((g.name, s))
                for p in g.parts:
                    f = s if p.role == "q" else 1.0 / s
                    for k in (p.weight, p.bias):
                        if k:
                            emit(Change(k, p.start, p.length, p.full, _rows(ta[k], p) * f))
            del ta
            if progress:
                progress(i + 1, len(plan.groups))
        return changes, report

    units = layer_units(shapes)
    for i, (k, partner) in enumerate(units):
        _interrupt()
        a = read_a(k)
        na, nb = math.sqrt(_sq_norm(a)), math.sqrt(_sq_norm(read_b(k)))
        if not (math.isfinite(na) and math.isfinite(nb) and na > 0 and nb > 0):
            report.skipped.append(k)
        else:
            f = (nb / na) ** strength
            report.factors.append((k, f))
            emit(Change(k, 0, a.shape[0] if a.dim() else 1, True, a.mul_(f)))
            if partner:
                emit(Change(partner, 0, 0, True, read_a(partner).mul_(f)))
        del a
        if progress:
            progress(i + 1, len(units))
    return changes, report


def _interrupt() -> None:
    import sys

    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------
# ComfyUI side
# ---------------------------------------------------------------------------------------------
def normalize_model(model_a, model_b, mode: str = "attn_only", strength: float = 1.0, device: str = "auto",
                    progress: Optional[Callable[[int, int], None]] = None):
    """A clone of ``model_a`` whose norms are scaled to ``model_b``'s (see the module docstring).

    Whole keys become ``set`` patches; query/key rows of fused projections become ``set`` patches on
    those rows only (ComfyUI's patch ``offset``), on top of the key's existing patches."""
    import uuid

    import comfy.model_management as mm

    from .merge import compute_device, plan_keys, to_storage
    from .weights import KeySource, is_clip, model_family, patcher_of, set_weights, storage_dtype

    for obj, name in ((model_a, "model_a"), (model_b, "model_b")):
        if obj is None or is_clip(obj) or not hasattr(obj, "get_key_patches"):
            raise NormalizeError(f"Normalize Model: {name} must be a MODEL")
    fa, fb = model_family(model_a), model_family(model_b)
    if fa.split(":")[0] != fb.split(":")[0]:
        raise NormalizeError(f"Normalize Model: model_a ({fa}) and model_b ({fb}) are different architectures; "
                             "normalizing needs two models of the same architecture (same keys and shapes).")
    src_a, src_b = KeySource.of(model_a), KeySource.of(model_b)
    try:
        keys = plan_keys(None, [src_a, src_b], ["model_a", "model_b"], "error")
    except MergeError as e:
        first = str(e).split("\nSet on_mismatch")[0]
        raise NormalizeError(f"Normalize Model: model_a ({fa}) and model_b ({fb}) are not the same architecture "
                             f"(normalizing needs the same keys and shapes): {first}") from None
    dev = compute_device(device)
    shapes = {k: tuple(src_a.shape(k)) for k in keys}
    offload = patcher_of(model_a).offload_device
    full: Dict[str, torch.Tensor] = {}
    partial: Dict[str, List[Tuple[int, int, torch.Tensor]]] = {}

    def keep(c: Change) -> None:
        t = to_storage(c.key, c.tensor, storage_dtype(src_a.dtype(c.key)), offload)
        if c.full:
            full[c.key] = t
        else:
            partial.setdefault(c.key, []).append((c.start, c.length, t))

    try:
        _, report = normalize_tensors(shapes, lambda k: src_a.read(k, dev), lambda k: src_b.read(k, dev), mode,
                                      strength, progress, keep)
    finally:
        if dev.type != "cpu":
            mm.soft_empty_cache()
    for key in [k for k in partial if k in src_a.wrappers]:
        # rows of a weight with a weight wrapper (applied after the patches): the whole wrapped weight is
        # set instead, as the rows already hold wrapped values
        t = src_a.read(key, torch.device("cpu"))
        for start, length, rows in partial.pop(key):
            t.narrow(0, start, length).copy_(rows)
        full[key] = t.to(device=offload, dtype=storage_dtype(src_a.dtype(key)))
    clone = model_a.clone()
    mp = patcher_of(clone)
    set_weights(mp, full)
    for key, pieces in partial.items():
        lst = list(mp.patches.get(key, []))
        for start, length, t in pieces:
            lst.append((1.0, ("set", (t,)), 1.0, (0, start, length), None))
        mp.patches[key] = lst
    mp.patches_uuid = uuid.uuid4()
    return clone, report
