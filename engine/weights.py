"""Reading the effective weights of ComfyUI models (MODEL patchers and CLIP objects) key by key.

"Effective" means with the model's own patches (LoRAs, earlier merges) applied and fp8 / quantized
storage dequantized, exactly as ComfyUI would compute the weight before sampling — but one key at a
time, on the device we choose, in fp32, without touching the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

CLIP_SKIP_SUFFIXES = (".position_ids", ".logit_scale")   # ComfyUI's CLIP merge nodes skip these too
UNET_PREFIX = "diffusion_model."
# CLIP weights that SD1.x/SD2.x checkpoints do not hold: ComfyUI leaves them uninitialized at load (any
# bytes, NaN included) and drops them on save (supported_models' pop_keys).  Merged and extracted when
# finite; kept as they are when not, instead of failing on a weight nobody uses.
CLIP_OPTIONAL_SUFFIXES = (".transformer.text_projection.weight",)


def all_finite(tensors) -> bool:
    """True when no tensor (None entries ignored) holds NaN or ±Inf; one min/max reduction each."""
    return all(bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
               for t in tensors if t is not None and t.numel())


def patcher_of(obj):
    """The ModelPatcher behind a MODEL (itself) or a CLIP (``.patcher``)."""
    return obj.patcher if hasattr(obj, "patcher") and hasattr(obj, "cond_stage_model") else obj


def is_clip(obj) -> bool:
    return hasattr(obj, "cond_stage_model") and hasattr(obj, "patcher")


def _identity(t, **kwargs):
    return t


@dataclass
class KeySource:
    """Lazy access to one model's weights: references only, nothing is copied until :meth:`read`."""

    entries: Dict[str, list]
    model: Any = None                   # the torch module the keys belong to
    copies: bool = True                 # False: see read_only()
    # ComfyUI's weight wrappers (a TrainLoraNode LoRA, ...): applied after the patches, as ComfyUI's ops do
    wrappers: Dict[str, list] = field(default_factory=dict)

    @classmethod
    def of(cls, obj) -> "KeySource":
        mp = patcher_of(obj)
        prefix = None if is_clip(obj) else UNET_PREFIX
        entries = _key_patches(mp, prefix)
        wrappers = {k: list(v) for k, v in (getattr(mp, "weight_wrapper_patches", None) or {}).items()
                    if v and k in entries}
        return cls(entries, mp.model, wrappers=wrappers)

    def read_only(self) -> "KeySource":
        """A KeySource whose :meth:`read` may return the stored weight itself (no copy, in its stored
        dtype) when it has no patches, no conversion, is already on the device and is stored in a dtype
        that serves the requested one (``_AS_IS``): for callers that only read the result (a merge stacks
        its inputs into a new fp32 or fp64 tensor anyway).  Never write into what it returns."""
        return KeySource(self.entries, self.model, copies=False, wrappers=self.wrappers)

    def _plain(self, key: str) -> bool:
        """No conversion function on this weight's layer (get_key_patches gives every key one)."""
        if self.model is None:
            return False
        try:
            from comfy.model_patcher import get_key_weight
            return get_key_weight(self.model, key)[2] is None
        except Exception:
            return False

    def keys(self) -> List[str]:
        """The keys to merge: float (or quantized) weights, without the scales of fp8 / quantized layers
        (:func:`quant_scale_keys`)."""
        keys = [k for k, e in self.entries.items() if _mergeable(k, _raw(e))]
        scales = quant_scale_keys(keys, self.raw)
        return [k for k in keys if k not in scales] if scales else keys

    def raw(self, key: str) -> torch.Tensor:
        return _raw(self.entries[key])

    def shape(self, key: str) -> torch.Size:
        return self.raw(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.raw(key).dtype

    def has_patches(self, key: str) -> bool:
        """Patches or weight wrappers change the stored weight of ``key``."""
        return len(self.entries[key]) > 1 or key in self.wrappers

    @torch.no_grad()
    def read(self, key: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight of ``key`` as a fresh tensor on ``device`` in ``dtype`` (never part of an
        autograd graph, though the stored weight is usually a parameter with requires_grad)."""
        import comfy.lora
        import comfy.model_management as mm

        entry = self.entries[key]
        first = entry[0]
        weight, convert = (first if isinstance(first, tuple) else (first, _identity))
        convert = convert or _identity
        if weight.device.type == "meta":
            raise RuntimeError(f"weight '{key}' is not materialized (meta device); load the model first")
        if not self.copies and not self.has_patches(key) and weight.device == device \
                and weight.dtype in _AS_IS.get(dtype, ()) \
                and type(weight) in (torch.Tensor, torch.nn.Parameter) and self._plain(key):
            return weight.detach()          # see read_only()
        if is_gguf(weight):
            t = _gguf_dequantized(self.model, key, weight, device)
        else:
            t = mm.cast_to_device(weight, device, torch.float32, copy=True)
            t = convert(t, inplace=True)
        if len(entry) > 1:
            t = comfy.lora.calculate_weight(entry[1:], t, key, intermediate_dtype=torch.float32)
        for f in self.wrappers.get(key, ()):
            t = _wrapped(f, t)
        if dtype != torch.float32:
            t = t.to(dtype)
        return t


def _wrapped(f, t: torch.Tensor) -> torch.Tensor:
    """``f(t)`` for a weight wrapper ``f``, run where the wrapper's own tensors are (they are never moved:
    the wrapper belongs to the input model), the result back on ``t``'s device in fp32."""
    dev = _tensor_device(f) or t.device
    out = f(t.to(dev))
    return out.to(device=t.device, dtype=torch.float32)


def _tensor_device(f) -> Optional[torch.device]:
    if isinstance(f, torch.nn.Module):
        for p in f.parameters():
            return p.device
        for b in f.buffers():
            return b.device
    for v in getattr(f, "__dict__", {}).values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def set_weights(patcher, values: Dict[str, torch.Tensor]) -> None:
    """Give ``patcher`` (a clone) ``values`` as ``set`` patches, replacing the keys' earlier patches and
    weight wrappers (the values are effective weights: they include both, see :meth:`KeySource.read`).  ComfyUI
    applies patches only to parameters of modules without parameters below them: a buffer, or a parameter
    such as WAN's ``blocks.N.modulation`` or SD3's ``pos_embed``, would keep its stored value when the model
    runs.  For those keys a load callback patches the weight in place the way ComfyUI patches the others
    (``patch_weight_to_device``: the stored value goes to the patcher's backup, where other readers of the
    shared module find it, and is copied back when the model is unloaded)."""
    unpatched = []
    for key, t in values.items():
        patcher.patches[key] = [(1.0, ("set", (t,)), 1.0, None, None)]
        if _unpatched_kind(patcher.model, key) is not None:
            unpatched.append(key)
    if unpatched:
        _patch_on_load(patcher, unpatched)
    _drop_wrappers(patcher, values)


_ON_LOAD_KEY = "mergelab_unpatched_weights"


def _patch_on_load(patcher, keys: List[str]) -> None:
    from comfy.patcher_extension import CallbacksMP
    earlier = [k for cb in patcher.callbacks.get(CallbacksMP.ON_LOAD, {}).get(_ON_LOAD_KEY, [])
               for k in getattr(cb, "keys", ())]
    keys = list(dict.fromkeys(earlier + list(keys)))

    def patch_weights(mp, *args, **kwargs):
        for key in keys:
            if key in mp.patches and key not in mp.backup:
                mp.patch_weight_to_device(key, device_to=None, inplace_update=True)
    patch_weights.keys = tuple(keys)
    patcher.remove_callbacks_with_key(CallbacksMP.ON_LOAD, _ON_LOAD_KEY)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, _ON_LOAD_KEY, patch_weights)


def _unpatched_kind(model, key: str) -> Optional[str]:
    """'parameter' / 'buffer' for a key ComfyUI's loader leaves unpatched, else None."""
    path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if name in getattr(module, "_buffers", {}):
        return "buffer"
    if name in getattr(module, "_parameters", {}):
        below = any(next(c.parameters(), None) is not None for c in module.children())
        return "parameter" if below else None
    return None


def _drop_wrappers(patcher, keys) -> None:
    """Remove the weight wrappers of ``keys`` from ``patcher``; the dict is replaced, never changed, as
    clones share it."""
    old = getattr(patcher, "weight_wrapper_patches", None)
    if old and any(k in old for k in keys):
        keys = set(keys)
        patcher.weight_wrapper_patches = {k: v for k, v in old.items() if k not in keys}


# Stored dtypes that read_only() hands over as they are, per requested dtype: a merge method computes in
# fp32 from any of the first, in fp64 from fp64 inputs, and returns its result in the stored dtype, which
# must hold the merged value as well as the result's own storage_dtype would: fp8 does not (its results
# are kept in bf16), so fp8 is always read as a copy in the requested dtype.
_AS_IS = {torch.float32: (torch.float16, torch.bfloat16, torch.float32), torch.float64: (torch.float64,)}


def _raw(entry) -> torch.Tensor:
    first = entry[0]
    return first[0] if isinstance(first, tuple) else first


def _mergeable(key: str, t: torch.Tensor) -> bool:
    if key.endswith(CLIP_SKIP_SUFFIXES):
        return False
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or is_quantized(t))


def fp16_overflow(t: torch.Tensor) -> Optional[float]:
    """The largest |value| of ``t`` when some value rounds to ±inf in fp16 (inf itself included), else
    None: the check before a result is kept or saved in fp16."""
    return overflow(t, overflow_limit(torch.float16))


def overflow_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that does not round to a finite value of ``dtype``: its largest value plus
    half a step there (fp16 65520, fp8 e4m3fn 464, fp8 e5m2 61440).  torch's cast to e4m3fn, which has
    no infinity, clamps such values to ±448 without a word."""
    fi = torch.finfo(dtype)
    return fi.max + 2.0 ** (math.floor(math.log2(fi.max))) * fi.eps / 2


def overflow(t: torch.Tensor, limit: float) -> Optional[float]:
    """The largest |value| of ``t`` when it reaches ``limit`` (inf included), else None."""
    if not t.numel() or not t.is_floating_point():
        return None
    lo, hi = torch.aminmax(t)
    big = torch.maximum(-lo, hi)
    return float(big) if bool(big >= limit) else None


def is_quantized(t) -> bool:
    return type(t).__name__ == "QuantizedTensor" or is_gguf_quantized(t)


# ComfyUI-GGUF (city96) keeps a GGUF model's tensors as a torch.Tensor subclass (GGMLTensor) with the
# attributes tensor_type (the GGML type), tensor_shape (the logical shape; .shape returns it) and patches
# (what its GGUFModelPatcher attaches while a clone is loaded); quantized types (Q*_*, K-quants, BF16) hold
# raw uint8 blocks, F16/F32 plain floats.  Its layers dequantize with get_weight(tensor, dtype).  Duck typed:
# ComfyUI-GGUF is never imported.
def is_gguf(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "tensor_type") and hasattr(t, "tensor_shape")


def is_gguf_quantized(t) -> bool:
    return is_gguf(t) and not t.is_floating_point()


def _gguf_dequantized(model, key: str, weight: torch.Tensor, device) -> torch.Tensor:
    """``weight`` as the owning layer computes it for its forward pass (``layer.get_weight``: ComfyUI-GGUF's
    own dequantization, with the loader's dequant_dtype), as a fresh fp32 tensor on ``device``, without the
    ``.patches`` ComfyUI-GGUF attached to the shared tensor for whichever clone is loaded (the caller applies
    this model's own patch list)."""
    layer = model.get_submodule(key.rpartition(".")[0])
    get_weight = getattr(layer, "get_weight", None)
    if get_weight is None:
        raise RuntimeError(f"weight '{key}' is a GGUF tensor on a layer without get_weight(); cannot read it")
    bare = weight.as_subclass(type(weight))            # an alias of the same storage, without attributes
    bare.tensor_type, bare.tensor_shape, bare.patches = weight.tensor_type, weight.tensor_shape, []
    w = get_weight(bare.to(device), torch.float32)
    w = w if type(w) is torch.Tensor else w.as_subclass(torch.Tensor)
    if tuple(w.shape) != tuple(weight.tensor_shape):
        raise RuntimeError(f"GGUF weight '{key}' dequantized to shape {tuple(w.shape)}, "
                           f"expected {tuple(weight.tensor_shape)}")
    if w.dtype != torch.float32 or w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        w = w.to(torch.float32, copy=True)               # F32 tensors come back as the stored tensor itself
    return w


def key_source_for(obj, keys) -> KeySource:
    """A :class:`KeySource` of only ``keys`` of a MODEL or CLIP (their stored weights, as before any
    loaded-in patch, and their patch lists): cheaper than :meth:`KeySource.of` for a few keys."""
    mp = patcher_of(obj)
    entries = {k: _key_entry(mp, k) for k in keys}
    wrappers = {k: list(v) for k, v in (getattr(mp, "weight_wrapper_patches", None) or {}).items()
                if v and k in entries}
    return KeySource(entries, mp.model, wrappers=wrappers)


def _key_patches(mp, prefix=None) -> Dict[str, list]:
    """``mp.get_key_patches(prefix)``.  ComfyUI-GGUF's layers put fake meta entries
    (``<layer>.temp.weight``, for its VRAM estimate) into ``state_dict()``, on which get_key_patches raises
    AttributeError (city96/ComfyUI-GGUF#193); then the same dict without entries that are not attributes of
    the module."""
    try:
        return mp.get_key_patches(prefix)
    except AttributeError:
        pass
    out = {}
    for k in mp.model_state_dict(prefix):
        try:
            out[k] = _key_entry(mp, k)
        except AttributeError:
            continue
    return out


def _key_entry(mp, k: str) -> list:
    """``[(stored weight, convert function)] + patches`` of one key, as ``get_key_patches`` gives it (the
    weight as before any loaded-in patch)."""
    from comfy.model_patcher import get_key_weight
    weight, _set, convert = get_key_weight(mp.model, k)
    bk, hbk = mp.backup.get(k), mp.hook_backup.get(k)
    if bk is not None:
        weight = bk.weight
    if hbk is not None:
        weight = hbk[0]
    return [(weight, convert or _identity)] + list(mp.patches.get(k, []))

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))
# the per-layer scales that scaled-fp8 / quantized checkpoints store beside a layer's weight
QUANT_SIBLINGS = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale")


def quant_scale_keys(keys, raw_of) -> set:
    """The scale keys of fp8 / quantized layers among ``keys`` (``raw_of(key)``: the stored tensor).  The
    weight a KeySource reads is already dequantized by them, so they are neither merged nor saved: a merged
    scale would be swapped in after ComfyUI re-quantized the merged weight with the old one, and a saved
    file holds dequantized weights."""
    keys = list(keys)
    present = set(keys)
    out = set()
    for k in keys:
        for suf in QUANT_SIBLINGS:
            if k.endswith(suf):
                w = k[: -len(suf)] + ".weight"
                if w in present:
                    r = raw_of(w)
                    if getattr(r, "dtype", None) in _FLOAT8 or is_quantized(r):
                        out.add(k)
    return out


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merged results are kept in: the base's, except fp8, kept as bf16 (ComfyUI re-quantizes
    them through the layer's own set function when it patches the weight)."""
    if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return dtype
    return torch.bfloat16


def model_family(obj) -> str:
    """Class names that identify an architecture: the model_base class and the config class."""
    if is_clip(obj):
        cls = type(obj.cond_stage_model)
        return f"CLIP:{cls.__module__}.{cls.__name__}"
    m = patcher_of(obj).model
    cfg = getattr(m, "model_config", None)
    return f"{type(m).__name__}:{type(cfg).__name__ if cfg is not None else '?'}"
