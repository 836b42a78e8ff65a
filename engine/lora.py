"""The LORA value: per-layer LoRA factors keyed by ComfyUI model keys, and the operations on it that
need no SVD (apply as patches, stack with strengths).

A :class:`Lora` is immutable: nodes build new ones and never change a tensor they were given.  Its
layers are keyed like ComfyUI's patch dicts: a model key (``diffusion_model.…weight`` for the diffusion
model, ``clip_l.transformer.…weight`` etc. for text encoders) or ``(key, (dim, start, length))`` for a
LoRA on a slice of a fused weight (Flux ``linear1`` qkv).

Layer kinds:

* ``lora``: ``ΔW = (alpha / rank) · up @ down`` on the 2-D view (LoCon convolutions included:
  ``up`` is (out, r, 1, 1) and ``down`` (r, in, kh, kw); with ``mid`` (Tucker) ``down`` is (r, in, 1, 1)
  and ``mid`` (r, r, kh, kw)).  ``alpha`` None means scale 1.
* ``diff``: a full difference tensor (biases, norm weights, full-rank layers).
* ``patch``: another ComfyUI weight patch kept as it was loaded (LoHa, LoKr, OFT, DoRA, ``set``).
  It applies exactly as ComfyUI would; operations that need ΔW convert LoHa/LoKr through ComfyUI's
  own formula and refuse what is not a difference (DoRA, set).  A patch that is not a difference
  carries a ``strength`` (LoRA Stack's, applied as ComfyUI's loader applies its strength).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger("MergeLab")

LayerKey = Union[str, Tuple[str, Tuple[int, int, int]]]
UNET_PREFIX = "diffusion_model."


class LoraError(ValueError):
    """A LoRA problem the user can act on (wrong architecture, bad rank, unreadable file...)."""


def base_key(key: LayerKey) -> str:
    return key[0] if isinstance(key, tuple) else key


def is_model_key(key: LayerKey) -> bool:
    return base_key(key).startswith(UNET_PREFIX)


def key_text(key: LayerKey) -> str:
    if isinstance(key, tuple):
        return f"{key[0]}[{key[1][0]}:{key[1][1]}+{key[1][2]}]"
    return key


def _identity(t, *args, **kwargs):
    return t


@dataclass(frozen=True, eq=False)
class LoraLayer:
    kind: str                                   # lora | diff | patch
    shape: Tuple[int, ...]                      # shape of the target weight (or slice)
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    mid: Optional[torch.Tensor] = None
    diff: Optional[torch.Tensor] = None
    patch: Any = None
    # a patch that is not a fixed difference (DoRA, OFT, ...) applies at this strength times the Apply
    # strength, as ComfyUI's loader at that strength would: what LoRA Stack makes of one at a strength ≠ 1
    strength: float = 1.0
    # a DoRA patch: the weight it was loaded against (a :class:`BaseWeight`), from which its difference is
    # taken where one is needed (Merge LoRAs, Resize LoRA)
    base: Any = None

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def from_factors(shape: Sequence[int], up2d: torch.Tensor, down2d: torch.Tensor,
                     alpha: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> "LoraLayer":
        """A layer from 2-D factors (m, r) and (r, n), reshaped for convolutions (LoCon layout)."""
        shape = tuple(int(s) for s in shape)
        r = up2d.shape[1]
        up, down = up2d, down2d
        if len(shape) > 2:
            up = up2d.reshape(shape[0], r, *([1] * (len(shape) - 2)))
            down = down2d.reshape(r, *shape[1:])
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        return LoraLayer("lora", shape, up=up.contiguous(), down=down.contiguous(),
                         alpha=float(r) if alpha is None else float(alpha))

    @staticmethod
    def from_diff(diff: torch.Tensor) -> "LoraLayer":
        return LoraLayer("diff", tuple(diff.shape), diff=diff)

    # -- properties -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.kind == "lora" else 0

    @property
    def scale(self) -> float:
        if self.kind != "lora" or self.alpha is None:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return len(self.shape) > 2 and any(s > 1 for s in self.shape[2:])

    def numel(self) -> int:
        n = 0
        for t in (self.up, self.down, self.mid, self.diff):
            if t is not None:
                n += t.numel()
        if self.kind == "patch":        # a kept ComfyUI patch (DoRA, LoHa, ...): the tensors it holds
            n += sum(t.numel() for t in (getattr(self.patch, "weights", None) or ()) if isinstance(t, torch.Tensor))
        return n

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.up, self.down, self.mid, self.diff) if t is not None]

    # -- math -----------------------------------------------------------------------------------
    def factors_2d(self, device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(U, D)`` with ``ΔW_2d = U @ D`` exactly: the scale is folded into U, a Tucker ``mid`` into D."""
        if self.kind != "lora":
            raise LoraError(f"a '{self.kind}' layer has no LoRA factors")
        up = self.up.to(device=device, dtype=dtype)
        down = self.down.to(device=device, dtype=dtype)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=dtype)
            # ComfyUI's LoRAAdapter: down_eff[j, c, ...] = Σ_i mid[j, i, ...] · down[i, c]
            down = torch.einsum("ji...,ic->jc...", mid, down.reshape(down.shape[0], down.shape[1]))
        u = up.reshape(up.shape[0], -1)
        d = down.reshape(down.shape[0], -1)
        if self.scale != 1.0:
            u = u * self.scale
        return u, d

    def delta(self, device=None, dtype=torch.float32, key: LayerKey = "") -> torch.Tensor:
        """The full difference ΔW this layer adds at strength 1, in the target's shape."""
        if self.kind == "lora":
            u, d = self.factors_2d(device, dtype)
            return (u @ d).reshape(self.shape)
        if self.kind == "diff":
            return self.diff.to(device=device, dtype=dtype).reshape(self.shape)
        delta = _patch_delta(self.patch, self.shape, device, dtype, key, self.base)
        return delta if self.strength == 1.0 else delta * self.strength

    def comfy_patch(self):
        """The value ComfyUI's loader would put in its patch dict for this layer."""
        if self.kind == "lora":
            from comfy.weight_adapter import LoRAAdapter
            return LoRAAdapter(set(), (self.up, self.down, self.alpha, self.mid, None, None))
        if self.kind == "diff":
            return ("diff", (self.diff,))
        return self.patch

    def to(self, device=None, dtype=None) -> "LoraLayer":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        if self.kind == "patch":
            return self
        return LoraLayer(self.kind, self.shape, mv(self.up), mv(self.down), self.alpha, mv(self.mid),
                         mv(self.diff), None)


# where ComfyUI's weight adapters keep their DoRA scale (comfy/weight_adapter/*.py: the weights tuple)
_DORA_SCALE_AT = {"lora": 4, "loha": 7, "lokr": 8, "glora": 5}


def dora_scale(patch) -> Optional[torch.Tensor]:
    """The DoRA magnitude of a ComfyUI LoRA / LoHa / LoKr / GLoRA patch, or None (not DoRA)."""
    from comfy.weight_adapter import WeightAdapterBase
    if not isinstance(patch, WeightAdapterBase):
        return None
    at, weights = _DORA_SCALE_AT.get(getattr(patch, "name", "")), getattr(patch, "weights", None)
    return weights[at] if at is not None and weights is not None and len(weights) > at else None


def not_a_difference(patch) -> Optional[str]:
    """Why a ComfyUI patch has no fixed difference ΔW (its result depends on the base weight), or None."""
    from comfy.weight_adapter import WeightAdapterBase
    if isinstance(patch, WeightAdapterBase):
        name = getattr(patch, "name", "")
        weights = getattr(patch, "weights", None)
        if dora_scale(patch) is not None:
            return f"DoRA ({name}): its change depends on the base weight"
        if name == "lora" and weights is not None and len(weights) > 5 and weights[5] is not None:
            return "a LoRA that reshapes (pads) the weight, as a Flux Control LoRA's img_in does: not a difference"
        if name == "glora":
            return "GLoRA: its change (W·a1·a2 + b1·b2) depends on the base weight"
        if name in ("oft", "boft"):
            return f"{name.upper()}: a rotation of the base weight, not a difference"
        return None
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return None
    kind = patch[0] if isinstance(patch, tuple) and patch and isinstance(patch[0], str) else type(patch).__name__
    return f"a '{kind}' patch (it replaces the weight), not a difference"


class BaseWeight:
    """The weight of a model key as the MODEL / CLIP a LoRA was loaded with holds it (its patches
    applied), read when asked.  It keeps only a weak reference: a LORA does not keep a model in memory."""

    def __init__(self, obj):
        import weakref
        self._obj = weakref.ref(obj)

    def __call__(self, key: LayerKey, device) -> Optional[torch.Tensor]:
        obj = self._obj()
        if obj is None:
            return None
        from .weights import key_source_for
        w = key_source_for(obj, [base_key(key)]).read(base_key(key), torch.device(device or "cpu"))
        if isinstance(key, tuple):
            dim, start, length = key[1]
            w = w.narrow(dim, start, length)
        return w


def _patch_delta(patch, shape, device, dtype, key, base: Optional[BaseWeight] = None) -> torch.Tensor:
    """ΔW of an opaque ComfyUI patch, by ComfyUI's own formula on a zero weight; of a DoRA patch, by its
    formula on the weight it was loaded against (``base``), minus that weight: exact on that model, at any
    strength (ComfyUI applies DoRA at strength s as W + s·(DoRA(W) − W))."""
    from comfy.weight_adapter import WeightAdapterBase
    name = key_text(key)
    why = not_a_difference(patch)
    if why is not None and base is not None and dora_scale(patch) is not None:
        w0 = base(key, device)
        if w0 is None:
            raise LoraError(f"layer {name} is {why}, and the model Load LoRA was given is no longer in memory: "
                            "ComfyUI freed it before this node ran (--cache-none, or evicted from its cache). Use "
                            "that model after this node too (e.g. in Apply LoRA), or run with ComfyUI's default cache")
        w0 = w0.reshape(shape)
        out = patch.calculate_weight(w0.clone(), name, 1.0, 1.0, None, _identity, torch.float32, None)
        return out.sub_(w0).to(dtype)
    if why is not None:
        raise LoraError(f"layer {name} is {why}; it has no fixed difference to merge, resize or save as LoRA "
                        "factors")
    if isinstance(patch, WeightAdapterBase):
        zero = torch.zeros(shape, device=device, dtype=torch.float32)
        out = patch.calculate_weight(zero, name, 1.0, 1.0, None, _identity, torch.float32, None)
        return out.to(dtype)
    return patch[1][0].to(device=device, dtype=dtype).reshape(shape)


def _freeze_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


@dataclass(frozen=True, eq=False)
class Lora:
    """An immutable LoRA: layers, the kohya-style file name of each target, the architecture it was
    made for, and its provenance (JSON)."""

    layers: Mapping[LayerKey, LoraLayer]
    names: Mapping[LayerKey, str] = field(default_factory=dict)
    arch: Mapping[str, Any] = field(default_factory=dict)
    source_json: str = "{}"
    # the shapes of the weights that layers address in slices (a diffusers Flux LoRA's q/k/v of the fused
    # img_attn.qkv): what a file needs to write the slices as one layer of the whole weight
    whole_shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "names", MappingProxyType(dict(self.names)))
        object.__setattr__(self, "arch", MappingProxyType(dict(self.arch)))
        object.__setattr__(self, "whole_shapes", MappingProxyType(
            {k: tuple(v) for k, v in dict(self.whole_shapes).items()}))

    @property
    def source(self) -> Dict[str, Any]:
        return json.loads(self.source_json)

    @staticmethod
    def make(layers, names, arch, source: Dict[str, Any], whole_shapes=None) -> "Lora":
        sliced = {base_key(k) for k in layers if isinstance(k, tuple)}
        shapes = {k: v for k, v in dict(whole_shapes or {}).items() if k in sliced}
        return Lora(layers, names, arch, _freeze_json(source), shapes)

    @property
    def name(self) -> str:
        return str(self.source.get("name", "lora"))

    def model_keys(self) -> List[LayerKey]:
        return [k for k in self.layers if is_model_key(k)]

    def clip_keys(self) -> List[LayerKey]:
        return [k for k in self.layers if not is_model_key(k)]

    def max_rank(self) -> int:
        return max((l.rank for l in self.layers.values()), default=0)

    def numel(self) -> int:
        return sum(l.numel() for l in self.layers.values())

    def summary(self) -> str:
        kinds: Dict[str, int] = {}
        ranks_seen = set()
        for l in self.layers.values():
            dora = l.kind == "patch" and dora_scale(l.patch) is not None
            kind = "DoRA" if dora else l.kind
            kinds[kind] = kinds.get(kind, 0) + 1
            if l.kind == "lora":
                ranks_seen.add(l.rank)
            elif dora and getattr(l.patch, "name", "") == "lora":
                ranks_seen.add(int(l.patch.weights[1].shape[0]))
        ranks = sorted(ranks_seen)
        rank_txt = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}") if ranks else "no rank"
        return (f"LoRA '{self.name}': {len(self.model_keys())} model + {len(self.clip_keys())} text-encoder layers "
                f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), {rank_txt}, "
                f"{self.numel() / 1e6:.2f} M values")

    def __repr__(self) -> str:
        return f"<Lora {self.summary()}>"


# -- architecture ------------------------------------------------------------------------------------

def arch_of(model=None, clip=None) -> Dict[str, Any]:
    """What a LoRA was made for: the model's family and config, the text encoders present."""
    from .weights import model_family
    arch: Dict[str, Any] = {}
    if model is not None:
        arch["model"] = model_family(model)            # model_base class : config class, e.g. BaseModel:SD15
        cfg = getattr(model.model, "model_config", None)
        arch["model_config"] = type(cfg).__name__ if cfg is not None else "?"
    if clip is not None:
        arch["clip"] = model_family(clip)
        heads = sorted({k.split(".", 1)[0] for k in clip.cond_stage_model.state_dict().keys()})
        arch["text_encoders"] = heads
    return arch


def merge_arch(archs: Iterable[Mapping[str, Any]], names: Sequence[str]) -> Dict[str, Any]:
    """The common architecture of several LoRAs; raises LoraError when they were made for different ones."""
    out: Dict[str, Any] = {}
    owner: Dict[str, str] = {}
    for a, n in zip(archs, names):
        for field_ in ("model", "clip"):
            v = a.get(field_)
            if v is None:
                continue
            if field_ in out and out[field_] != v:
                raise LoraError(f"cannot combine LoRAs made for different architectures: {owner[field_]} is "
                                f"for {out[field_]}, {n} is for {v}")
            out[field_] = v
            owner[field_] = n
        for extra in ("model_config", "text_encoders"):
            if extra in a and extra not in out:
                out[extra] = a[extra]
    return out


# -- stacking (exact) ---------------------------------------------------------------------------------

def concat_layers(parts: Sequence[Tuple[LoraLayer, float]], key: LayerKey) -> LoraLayer:
    """Σ cᵢ·ΔWᵢ as one layer, exactly: LoRA factors concatenated (rank = Σ rᵢ, scale folded into up,
    alpha = rank), diffs summed; a mix, or opaque patches, become one full difference."""
    parts = [(l, float(c)) for l, c in parts if c != 0.0]
    if not parts:
        raise LoraError(f"nothing to combine for {key_text(key)}")
    shape = parts[0][0].shape
    for l, _ in parts:
        if tuple(l.shape) != tuple(shape):
            raise LoraError(f"layer {key_text(key)} has shape {tuple(l.shape)} in one LoRA and {tuple(shape)} in "
                            "another: the LoRAs were made for different architectures")
    kinds = {l.kind for l, _ in parts}
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    odd = [(l, c) for l, c in parts if l.kind == "patch" and not_a_difference(l.patch) is not None]
    if odd:
        if len(parts) == 1:     # alone on its weight: kept, at the product of the strengths
            l, c = parts[0]
            return LoraLayer("patch", l.shape, patch=l.patch, strength=l.strength * c, base=l.base)
        raise LoraError(f"layer {key_text(key)}: a {not_a_difference(odd[0][0].patch)}, cannot be summed with "
                        f"another LoRA's layer on the same weight; apply these LoRAs one after the other "
                        "(Apply LoRA or ComfyUI's LoraLoader) instead of stacking them")
    if kinds == {"lora"}:
        ups, downs = [], []
        for l, c in parts:
            u, d = l.factors_2d(device="cpu", dtype=torch.float32)
            ups.append(u * c)
            downs.append(d)
        up = torch.cat(ups, dim=1)
        down = torch.cat(downs, dim=0)
        return LoraLayer.from_factors(shape, up, down)
    total = None
    for l, c in parts:
        d = l.delta("cpu", torch.float32, key) * c
        total = d if total is None else total.add_(d)
    return LoraLayer.from_diff(total)


def block_factors(lora: Lora, block_weights) -> Dict[LayerKey, float]:
    """Per layer, the factor block weights (a BLOCK_WEIGHTS value scaling ``weight``) give this LoRA's
    strength (LoRA Block Weight): the factor of the block the layer's weight is in; text-encoder layers
    take the text-encoder names' factors (MBW BASE).  Checked against the LoRA's architecture."""
    from .blocks import arch_of_config
    params = block_weights.params()
    if any(p != "weight" for p in params):
        raise LoraError(f"block weights on a LoRA scale its strength: set their param to 'weight' (these scale "
                        f"{', '.join(params)})")
    cfg = lora.arch.get("model_config")
    arch = arch_of_config(cfg) if cfg and cfg != "?" else None
    keys = [base_key(k) for k in lora.layers]
    try:
        block_weights.check(arch, keys)
        out = {}
        for k in lora.layers:
            f = block_weights.factors(base_key(k), 1).get("weight")
            out[k] = float(f[0]) if f else 1.0
    except ValueError as e:
        raise LoraError(f"LoRA '{lora.name}': {e}") from None
    return out


@torch.no_grad()
def stack_loras(entries: Sequence[Tuple], name: str = "stack",
                progress: Optional[Callable[[int, int], None]] = None) -> Lora:
    """``Σ strength·LoRA``: the model strength scales diffusion-model layers, the CLIP strength the
    text-encoder layers.  Exact (factors concatenated).  An entry is ``(lora, strength_model,
    strength_clip)`` or ``(lora, strength_model, strength_clip, block_weights)``: block weights scale each
    layer's strength by its block's factor (see :func:`block_factors`).  ``progress(i, n)`` after each
    layer (it may raise to cancel)."""
    entries = [(e[0], float(e[1]), float(e[2]), e[3] if len(e) > 3 else None) for e in entries]
    if not entries:
        raise LoraError("LoRA stack: no LoRA given")
    arch = merge_arch([l.arch for l, _, _, _ in entries], [l.name for l, _, _, _ in entries])
    keys: Dict[LayerKey, List[Tuple[LoraLayer, float]]] = {}
    names: Dict[LayerKey, str] = {}
    whole: Dict[str, Tuple[int, ...]] = {}
    for l, sm, sc, bw in entries:
        whole.update(l.whole_shapes)
        per_layer = block_factors(l, bw) if bw is not None else {}
        for k, layer in l.layers.items():
            c = (sm if is_model_key(k) else sc) * per_layer.get(k, 1.0)
            keys.setdefault(k, []).append((layer, c))
        for k, n in l.names.items():
            names.setdefault(k, n)
    layers = {}
    for i, (k, parts) in enumerate(keys.items()):
        if progress is not None:
            progress(i, len(keys))
        if all(c == 0.0 for _, c in parts):
            continue
        layers[k] = concat_layers(parts, k)
    if progress is not None:
        progress(len(keys), len(keys))
    parts = []
    for l, sm, sc, bw in entries:
        part = {"strength_model": sm, "strength_clip": sc, "lora": l.source}
        if bw is not None:
            part["block_weights"] = bw.to_dict()
        parts.append(part)
    return Lora.make(layers, names, arch, {"kind": "stack", "name": name, "parts": parts}, whole)


# -- applying -------------------------------------------------------------------------------------

def weight_shapes(obj) -> Dict[str, Tuple[int, ...]]:
    """Shapes of every weight of a MODEL patcher or CLIP, by ComfyUI key (no copy)."""
    from .weights import patcher_of
    model = patcher_of(obj).model
    out = {}
    for k, v in model.state_dict().items():
        if v.device.type == "meta":
            # ComfyUI-GGUF's state_dict holds meta placeholders of its quantized weights, shaped as their
            # bytes, and a fake '<layer>.temp.weight': the logical shape is the layer's tensor_shape
            path, _, name = k.rpartition(".")
            try:
                real = getattr(model.get_submodule(path), name)
            except AttributeError:
                continue
            v = real if real is not None else v
        out[k] = tuple(getattr(v, "tensor_shape", None) or v.shape)
    return out


def target_shape(shapes: Mapping[str, Tuple[int, ...]], key: LayerKey) -> Optional[Tuple[int, ...]]:
    k = base_key(key)
    if k not in shapes:
        return None
    s = list(shapes[k])
    if isinstance(key, tuple):
        dim, start, length = key[1]
        s[dim] = length
    return tuple(s)


def check_fits(lora: Lora, obj, keys: Sequence[LayerKey], what: str) -> List[LayerKey]:
    """The keys of ``lora`` found in ``obj``; raises LoraError for shape mismatches (other architecture)."""
    shapes = weight_shapes(obj)
    found, missing, bad = [], [], []
    for k in keys:
        s = target_shape(shapes, k)
        if s is None:
            missing.append(k)
        elif tuple(s) != tuple(lora.layers[k].shape):
            bad.append(f"{key_text(k)}: LoRA {tuple(lora.layers[k].shape)} vs {what} {tuple(s)}")
        else:
            found.append(k)
    if bad:
        raise LoraError(f"LoRA '{lora.name}' does not fit this {what}: {len(bad)} layer(s) have other shapes "
                        f"(e.g. {'; '.join(bad[:3])}). It was made for another architecture "
                        f"({lora.arch.get('model' if what == 'MODEL' else 'clip', 'unknown')}).")
    if keys and not found:
        raise LoraError(f"none of the {len(keys)} {what} layers of LoRA '{lora.name}' exist in this {what} "
                        f"(e.g. {key_text(keys[0])}): it was made for another architecture "
                        f"({lora.arch.get('model' if what == 'MODEL' else 'clip', 'unknown')}).")
    if missing:
        log.warning("MergeLab: LoRA '%s': %d %s layer(s) not in this %s are ignored (e.g. %s)", lora.name,
                    len(missing), what, what, key_text(missing[0]))
    return found


def apply_lora(lora: Lora, model, clip, strength_model: float, strength_clip: float):
    """Clones of ``model`` and ``clip`` with the LoRA added as ComfyUI LoRA patches (the same patch
    objects ComfyUI's LoraLoader creates, so ComfyUI computes the weights exactly as for its own
    loader).  Inputs are never modified; a strength of 0 returns the input itself."""
    new_model, new_clip = model, clip
    mkeys, ckeys = lora.model_keys(), lora.clip_keys()
    if model is not None and strength_model != 0 and mkeys:
        found = check_fits(lora, model, mkeys, "MODEL")
        new_model = model.clone()
        _report_not_added(lora, found, _add_patches(new_model, lora, found, float(strength_model)), "MODEL")
    if clip is not None and strength_clip != 0 and ckeys:
        found = check_fits(lora, clip, ckeys, "CLIP")
        new_clip = clip.clone()
        _report_not_added(lora, found, _add_patches(new_clip, lora, found, float(strength_clip)), "CLIP")
    return new_model, new_clip


def _add_patches(target, lora: Lora, keys, strength: float) -> List[LayerKey]:
    """ComfyUI patches for ``keys``, one add_patches call per layer strength (1 except for a stacked DoRA)."""
    by_strength: Dict[float, Dict[LayerKey, Any]] = {}
    for k in keys:
        layer = lora.layers[k]
        by_strength.setdefault(layer.strength, {})[k] = layer.comfy_patch()
    added: List[LayerKey] = []
    for s, patches in by_strength.items():
        added += target.add_patches(patches, strength * s)
    return added


def _report_not_added(lora: Lora, wanted, added, what: str) -> None:
    added = set(added)
    lost = [k for k in wanted if k not in added]
    if lost:
        log.warning("MergeLab: LoRA '%s': ComfyUI did not accept %d %s patch(es) (e.g. %s)", lora.name,
                    len(lost), what, key_text(lost[0]))
