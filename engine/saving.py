"""Streaming saves of MODEL / CLIP / VAE in the layout ComfyUI's own save nodes write.

ComfyUI's ``CheckpointSave`` / ``ModelSave`` load the whole model (patches applied) onto the GPU and
build the full state dict before writing it; ours computes each weight on the CPU in fp32 (the
model's patch list applied by :class:`engine.weights.KeySource`, LoRAs and our ``set`` patches
included), casts it to the output dtype and writes it, one tensor at a time.

**Key layout without tensors.**  The per-architecture conversions (``state_dict_for_saving``,
``process_unet/clip/vae_state_dict_for_saving``) are ComfyUI's own functions, run once on a dict of
*placeholders*: meta tensors of a small ``torch.Tensor`` subclass that records which source keys
every derived tensor depends on.  After the run each output entry is either

* a placeholder itself (a renamed key: the common case): written from its source key;
* a tensor derived from placeholders (SD2/SDXL OpenCLIP ``in_proj`` concatenation of q/k/v, the
  transposed ``text_projection``...): its shape/dtype come from the meta run, and its value is
  computed when it is written by running the same ComfyUI conversion on a dict holding only its
  source tensors (real, patched, fp32);
* a real tensor the conversion created (SDXL's ``position_ids``, ``v_pred`` markers): written as is.

So whatever a ComfyUI version's conversion does (renames, drops, concatenations, transposes), the
file holds what ComfyUI would have written, and the header can be computed before any weight is.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple, Union

import torch

from . import safetensors_writer as stw
from .weights import KeySource, UNET_PREFIX, is_quantized, overflow, overflow_limit, quant_scale_keys, storage_dtype

log = logging.getLogger("MergeLab")

SCALED_FP8 = "fp8_e4m3fn_scaled"
DTYPE_CHOICES = ("keep", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", SCALED_FP8)
CLIP_DTYPE_CHOICES = DTYPE_CHOICES[:-1]       # ComfyUI reads scaled fp8 text encoders only for T5 and Llama
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
           "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# dtypes with a range a weight may exceed (bf16 and fp32 have fp32's): a weight beyond it is an error
_NARROW = {torch.float16: "fp16", torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
_STD_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# CLIPSave's split of a CLIP's state dict into one file per text encoder (ComfyUI 0.3.64 / 0.3.75)
# ComfyUI's CLIPSave list, plus the Qwen encoders of Z-Image and Omnigen2: without their prefix stripped,
# ComfyUI's load_clip cannot detect the file (CLIPSave has the same gap)
CLIP_FILE_PREFIXES = ("clip_l.", "clip_g.", "clip_h.", "t5xxl.", "pile_t5xl.", "mt5xl.", "umt5xxl.", "t5base.",
                      "gemma2_2b.", "llama.", "hydit_clip.", "qwen3_4b.", "qwen25_3b.", "")


class SaveError(ValueError):
    pass


def output_dtype(mode: str) -> Optional[torch.dtype]:
    """The dtype every floating-point weight is converted to; None keeps each one's (``keep``, and the
    weights that ``fp8_e4m3fn_scaled`` does not quantize)."""
    if mode in ("keep", SCALED_FP8):
        return None
    try:
        return _DTYPES[mode]
    except KeyError:
        raise SaveError(f"unknown output dtype {mode!r}; choose one of {', '.join(DTYPE_CHOICES)}") from None


# ---------------------------------------------------------------------------------------------
# sources: where each tensor of a part (unet / clip / vae) comes from
# ---------------------------------------------------------------------------------------------
@dataclass
class _Item:
    shape: Tuple[int, ...]
    dtype: torch.dtype                      # the dtype ComfyUI would save it in ("keep")
    produce: Callable[[Optional[torch.dtype]], torch.Tensor]   # float target dtype (None: keep) -> CPU tensor
    weight: bool = True                     # a model weight (output dtype applies) vs a marker/constant


@dataclass
class Part:
    name: str                               # "unet" | "clip" | "vae"
    items: Dict[str, _Item] = field(default_factory=dict)


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype], key: str = "") -> torch.Tensor:
    """``t`` on the CPU in ``dtype`` (floats only); no copy when it already is.  A weight that does not
    fit fp16 or fp8 is an error naming it (it would be written as ±inf, or clamped to ±448 in e4m3fn)."""
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        name = _NARROW.get(dtype)
        big = overflow(t, overflow_limit(dtype)) if name is not None else None
        if big is not None:
            other = "fp8_e5m2, fp8_e4m3fn_scaled, bf16 or fp32" if dtype == torch.float8_e4m3fn else "bf16 or fp32"
            raise SaveError(f"weight '{key}' does not fit {name} (largest |value| {big:.6g}, {name} holds up to "
                            f"{torch.finfo(dtype).max:g}): save it with dtype {other}")
        return t.to(device="cpu", dtype=dtype)
    return t.to(device="cpu")


def _lone_set_patch(entry, raw) -> Optional[torch.Tensor]:
    """The tensor of a single whole-weight ``set`` patch (the result of our merges), or None.

    ComfyUI computes such a weight as ``fp32 copy of W; copy_(t)``, i.e. exactly ``t`` (converted to
    fp32 then to the output dtype, which equals converting ``t`` directly); the shortcut skips the
    fp32 copy of the original weight."""
    if len(entry) != 2:
        return None
    p = entry[1]
    if not (isinstance(p, tuple) and len(p) >= 4 and p[3] is None):
        return None
    v = p[1]
    if not (isinstance(v, tuple) and len(v) == 2 and v[0] == "set" and isinstance(v[1], (tuple, list))):
        return None
    t = v[1][0]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(raw.shape) or t.dtype not in _STD_FLOATS:
        return None
    if t.device.type == "meta":
        return None
    return t


def part_from_keysource(name: str, ks: KeySource, strip: str = "") -> Part:
    """The tensors of a MODEL (``strip="diffusion_model."``) or CLIP, with their patches applied."""
    part = Part(name)
    dropped = quant_scale_keys(ks.entries.keys(), ks.raw)
    cpu = torch.device("cpu")
    for key, entry in ks.entries.items():
        if key in dropped:
            continue
        local = key[len(strip):] if strip and key.startswith(strip) else key
        raw = ks.raw(key)
        if not isinstance(raw, torch.Tensor):
            continue
        is_float = is_quantized(raw) or raw.is_floating_point()
        dtype = storage_dtype(raw.dtype) if is_float else raw.dtype

        def produce(target, key=key, raw=raw, is_float=is_float, dtype=dtype):
            entry = ks.entries[key]
            if not is_float:
                return raw.detach().to(cpu)
            tgt = target or dtype
            if key in ks.wrappers:
                return _cast(ks.read(key, cpu, torch.float32), tgt, key)
            if len(entry) == 1 and raw.dtype in _STD_FLOATS and not is_quantized(raw):
                if raw.device.type == "meta":
                    raise SaveError(f"weight '{key}' is not materialized (meta device); it cannot be saved")
                return _cast(raw, tgt, key)
            t = _lone_set_patch(entry, raw)
            if t is not None:
                return _cast(t, tgt, key)
            return _cast(ks.read(key, cpu, torch.float32), tgt, key)

        part.items[local] = _Item(tuple(raw.shape), dtype, produce, weight=is_float)
    return part


def part_from_tensors(name: str, sd: Dict[str, Any], weight: bool = True) -> Part:
    """A part made of real tensors (a VAE's state dict, a tokenizer's state)."""
    part = Part(name)
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        is_float = t.is_floating_point()

        def produce(target, t=t, is_float=is_float, key=key):
            return _cast(t, (target or t.dtype) if is_float else None, key)

        part.items[key] = _Item(tuple(t.shape), t.dtype, produce, weight=weight and is_float)
    return part


def unet_part(model) -> Part:
    return part_from_keysource("unet", KeySource.of(model), strip=UNET_PREFIX)


def clip_part(clip) -> Part:
    part = part_from_keysource("clip", KeySource.of(clip))
    tok = getattr(clip, "tokenizer", None)
    tok_sd = tok.state_dict() if tok is not None and hasattr(tok, "state_dict") else {}
    for k, it in part_from_tensors("clip", tok_sd, weight=False).items.items():
        part.items[k] = it
    return part


def vae_part(vae) -> Part:
    return part_from_tensors("vae", vae.get_sd())


# ---------------------------------------------------------------------------------------------
# placeholders that record what derived tensors depend on
# ---------------------------------------------------------------------------------------------
_DEPS = "_mergelab_deps"


def _deps_of(x, acc: set) -> None:
    if isinstance(x, torch.Tensor):
        d = getattr(x, _DEPS, None)
        if d:
            acc.update(d)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _deps_of(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _deps_of(y, acc)


def _add_deps(x, deps) -> None:
    if isinstance(x, torch.Tensor):
        try:
            setattr(x, _DEPS, frozenset(getattr(x, _DEPS, frozenset())) | deps)
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types
            pass
    elif isinstance(x, (list, tuple)):
        for y in x:
            _add_deps(y, deps)


class _Placeholder(torch.Tensor):
    """A meta tensor that passes the set of source keys it depends on to every result computed from
    it (and to tensors written into in place, e.g. ``out[a:b] = placeholder``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        deps: set = set()
        _deps_of(args, deps)
        _deps_of(kwargs, deps)
        out = super().__torch_function__(func, types, args, kwargs)
        if deps:
            fd = frozenset(deps)
            _add_deps(out, fd)
            name = getattr(func, "__name__", "")
            if args and isinstance(args[0], torch.Tensor) and (
                    name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))):
                _add_deps(args[0], fd)
        return out


def _placeholder(part: str, key: str, item: _Item) -> torch.Tensor:
    t = torch.empty(item.shape, dtype=item.dtype, device="meta").as_subclass(_Placeholder)
    setattr(t, _DEPS, frozenset({(part, key)}))
    return t


class _StubModule:
    """Stands in for ``diffusion_model`` during the planning run: its state dict is placeholders."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self, *args, **kwargs):
        return dict(self._sd)


def _planning_copy(base_model, unet_sd):
    """A shallow stand-in of a ComfyUI BaseModel whose ``diffusion_model.state_dict()`` returns
    ``unet_sd``; everything else (model_config, model_type, other submodules) is the real model's.
    Lets ComfyUI's own (possibly overridden) ``state_dict_for_saving`` run without touching weights."""
    cls = type(base_model)
    proxy = cls.__new__(cls)
    d = dict(base_model.__dict__)
    mods = dict(d.get("_modules") or {})
    if "diffusion_model" not in mods:
        raise SaveError(f"{cls.__name__} has no diffusion_model submodule; this model type cannot be saved")
    mods["diffusion_model"] = _StubModule(unet_sd)
    d["_modules"] = mods
    proxy.__dict__.update(d)
    return proxy


# ---------------------------------------------------------------------------------------------
# planning a file
# ---------------------------------------------------------------------------------------------
@dataclass
class FilePlan:
    tensors: List[stw.TensorPlan]
    dropped: List[str] = field(default_factory=list)     # entries of ComfyUI's dict not written

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.tensors)


def plan_from_conversion(parts: Dict[str, Part], convert: Callable[[Dict[str, Dict[str, torch.Tensor]]], Dict[str, Any]],
                         part_converters: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]],
                         dtype: Optional[torch.dtype], extra: Optional[Dict[str, torch.Tensor]] = None,
                         keep_parts: Tuple[str, ...] = (),
                         fp8_scaled: Collection[Tuple[str, str]] = ()) -> FilePlan:
    """Run ``convert`` (ComfyUI's layout conversion) on placeholders of ``parts`` and turn its output
    into a list of tensors to write.  ``part_converters[part]`` is the conversion of one part alone,
    used to compute derived tensors from real source tensors.  ``dtype``: the output float dtype
    (None: keep).  ``extra``: tensors added as is (ComfyUI's extra keys).  ``keep_parts``: parts whose
    tensors keep their dtype whatever ``dtype`` is.  ``fp8_scaled``: the (part, key) of the weights written as
    scaled fp8 (see :func:`_scaled_fp8_plans`)."""
    ph: Dict[str, Dict[str, torch.Tensor]] = {}
    by_id: Dict[int, Tuple[str, str]] = {}
    for pname, part in parts.items():
        d = {}
        for key, item in part.items.items():
            t = _placeholder(pname, key, item)
            d[key] = t
            by_id[id(t)] = (pname, key)
        ph[pname] = d
    try:
        with torch.inference_mode(False), torch.no_grad():
            out = convert({k: dict(v) for k, v in ph.items()})
    except SaveError:
        raise
    except Exception as e:  # noqa: BLE001 - a conversion that needs real values
        raise SaveError(f"ComfyUI's key conversion for this model cannot be planned without computing the "
                        f"weights ({type(e).__name__}: {e}); MergeLab cannot stream-save this model type") from e
    if extra:
        out = dict(out)
        out.update(extra)

    plans: List[stw.TensorPlan] = []
    dropped: List[str] = []
    for name, value in out.items():
        if not isinstance(value, torch.Tensor):
            dropped.append(name)
            continue
        src = by_id.get(id(value))
        if src is not None and value is ph[src[0]].get(src[1]):
            item = parts[src[0]].items[src[1]]
            if src in fp8_scaled and name.endswith(".weight"):
                plans.extend(_scaled_fp8_plans(name, item))
                continue
            tgt = _target(item.dtype, None if src[0] in keep_parts else dtype, item.weight)
            plans.append(stw.TensorPlan(name, tgt, item.shape, _identity_producer(item, tgt)))
            continue
        deps = getattr(value, _DEPS, None)
        if deps:
            pnames = {p for p, _ in deps}
            if len(pnames) != 1:
                raise SaveError(f"cannot stream '{name}': ComfyUI's conversion combines tensors of several "
                                f"parts ({', '.join(sorted(pnames))})")
            pname = next(iter(pnames))
            if pname not in part_converters:
                raise SaveError(f"cannot stream '{name}': it is derived from {pname} tensors and there is no "
                                f"conversion to recompute it")
            weight = any(parts[pname].items[k].weight for _, k in deps)
            tgt = _target(value.dtype, None if pname in keep_parts else dtype, weight)
            plans.append(stw.TensorPlan(name, tgt, tuple(value.shape),
                                        _derived_producer(name, parts[pname], sorted(k for _, k in deps),
                                                          part_converters[pname], tgt, tuple(value.shape))))
            continue
        if value.device.type == "meta":
            raise SaveError(f"cannot stream '{name}': ComfyUI's conversion produced it in a way MergeLab cannot "
                            f"trace back to the model's weights")
        const = value.detach().cpu().contiguous().clone()
        plans.append(stw.TensorPlan(name, const.dtype, tuple(const.shape), lambda c=const: c))
    return FilePlan(plans, dropped)


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max       # 448


def _scaled_fp8_plans(name: str, item: _Item) -> List[stw.TensorPlan]:
    """A weight as ComfyUI's scaled fp8 layers hold it: ``name`` = fp8 e4m3fn of W / s and
    ``<layer>.scale_weight`` = s = max|W| / 448 (fp32, 1 for an all-zero W), which ComfyUI multiplies back
    (``weight.to(fp32) * scale_weight``).  The scale is planned just before the weight; whichever of the
    two is produced first computes both from one read of W."""
    held: Dict[str, torch.Tensor] = {}

    def compute() -> None:
        w = item.produce(torch.float32)
        amax = w.abs().amax() if w.numel() else torch.zeros((), dtype=torch.float32)
        if not bool(torch.isfinite(amax)):
            raise SaveError(f"weight '{name}' holds inf or NaN; it cannot be saved as scaled fp8")
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
        held["weight"] = (w / scale).to(torch.float8_e4m3fn)       # |W / s| <= 448: no clamping
        held["scale"] = scale

    def take(which: str):
        def produce() -> torch.Tensor:
            if which not in held:
                compute()
            return held.pop(which)
        return produce

    scale_name = name[: -len("weight")] + "scale_weight"
    return [stw.TensorPlan(scale_name, torch.float32, (), take("scale")),
            stw.TensorPlan(name, torch.float8_e4m3fn, tuple(item.shape), take("weight"))]


def _linear_weight_keys(base_model) -> set:
    """The weights of the diffusion model's Linear layers, by their key in the UNet part: the layers that
    ComfyUI's scaled fp8 operations hold in fp8 (other layers keep the model's dtype)."""
    dm = base_model.diffusion_model
    # ComfyUI's operations only (they have comfy_cast_weights): a plain torch Linear stays unscaled when loaded
    return {f"{n}.weight" for n, m in dm.named_modules()
            if isinstance(m, torch.nn.Linear) and hasattr(m, "comfy_cast_weights")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}


def _target(native: torch.dtype, dtype: Optional[torch.dtype], weight: bool) -> torch.dtype:
    if weight and dtype is not None and native.is_floating_point:
        return dtype
    return native


def _identity_producer(item: _Item, tgt: torch.dtype):
    def produce():
        return item.produce(tgt if tgt.is_floating_point else None)
    return produce


def _derived_producer(name: str, part: Part, keys: List[str], conv, tgt: torch.dtype, shape):
    def produce():
        real = {}
        for k in keys:
            it = part.items[k]
            real[k] = it.produce(torch.float32 if it.dtype.is_floating_point else None)
        with torch.inference_mode(False), torch.no_grad():
            res = conv(real)
        if name not in res:
            raise SaveError(f"recomputing '{name}' from {len(keys)} source tensor(s) did not produce it; "
                            f"ComfyUI's conversion depends on other keys")
        t = res[name]
        if tuple(t.shape) != tuple(shape):
            raise SaveError(f"recomputing '{name}' gave shape {tuple(t.shape)}, planned {tuple(shape)}")
        return _cast(t, tgt if tgt.is_floating_point else None, name).contiguous()
    return produce


def _drop_markers(sd: Dict[str, Any], parts: Dict[str, Part], scaled: bool = False) -> Dict[str, Any]:
    """Drop ComfyUI's scaled-fp8 / quantization markers: MergeLab writes fp8 weights dequantized (unless
    ``scaled``: then the marker set for the scaled fp8 file stays).

    ``state_dict_for_saving`` adds them to the UNet dict before its keys get their prefix, so they arrive
    as ``model.diffusion_model.scaled_fp8``: a file keeping that marker is loaded back as scaled fp8, its
    dequantized weights pushed into fp8 layers with a scale of 1."""
    markers = ("_quantization_metadata",) if scaled else ("scaled_fp8", "_quantization_metadata")
    for k in [k for k in sd if k.rsplit(".", 1)[-1] in markers]:
        sd.pop(k)
    return sd


def plan_checkpoint(model, clip=None, vae=None, dtype: str = "keep",
                    extra_keys: Optional[Dict[str, torch.Tensor]] = None) -> FilePlan:
    """What ComfyUI's ``save_checkpoint(model, clip, vae)`` would write, as a streaming plan."""
    base = model.model
    cfg = base.model_config
    parts: Dict[str, Part] = {"unet": unet_part(model)}
    if clip is not None:
        parts["clip"] = clip_part(clip)
    if vae is not None:
        parts["vae"] = vae_part(vae)

    scaled = dtype == SCALED_FP8

    def convert(ph):
        proxy = _planning_copy(base, ph["unet"])
        if scaled:      # ComfyUI's own save of a scaled fp8 model writes the marker where its loader looks
            proxy.model_config = copy.copy(cfg)
            proxy.model_config.scaled_fp8 = torch.float8_e4m3fn
        sd = _drop_markers(type(base).state_dict_for_saving(proxy, ph.get("clip"), ph.get("vae"), None), parts, scaled)
        for k in [k for k in sd if scaled and k.rsplit(".", 1)[-1] == "scaled_fp8"]:
            # two entries: ComfyUI's loader then computes in the model's dtype (its fp8 matmul, which the empty
            # marker of its own saves allows, would clamp the activations to ±448 with an input scale of 1)
            sd[k] = torch.zeros(2, dtype=torch.float8_e4m3fn)
        return sd

    converters = {"unet": cfg.process_unet_state_dict_for_saving,
                  "clip": cfg.process_clip_state_dict_for_saving,
                  "vae": cfg.process_vae_state_dict_for_saving}
    out = output_dtype(dtype)
    # ComfyUI runs a VAE in fp16/bf16/fp32 only: fp8 is for the diffusion model and the text encoders (what
    # ComfyUI holds in fp8 when it loads them with weight_dtype fp8)
    linear = {("unet", k) for k in _linear_weight_keys(base)} if scaled else ()
    return plan_from_conversion(parts, convert, converters, out, extra=extra_keys,
                                keep_parts=("vae",) if out in FP8_DTYPES else (), fp8_scaled=linear)


def clip_file_groups(clip) -> List[Tuple[str, Part]]:
    """CLIPSave's split of a CLIP into one part per text encoder: ``[(prefix, part)]``."""
    part = clip_part(clip)
    rest = dict(part.items)
    groups = []
    for prefix in CLIP_FILE_PREFIXES:
        keys = [k for k in rest if k.startswith(prefix)]
        if not keys:
            continue
        groups.append((prefix, Part("clip", {k: rest.pop(k) for k in keys})))
    return groups


def plan_clip_file(prefix: str, part: Part, dtype: str = "keep") -> FilePlan:
    import comfy.utils
    if dtype == SCALED_FP8:
        raise SaveError(f"dtype {SCALED_FP8} is for diffusion models (Save Model / Save Checkpoint); save text "
                        f"encoders with fp8_e4m3fn")
    replace = {}
    if prefix:
        replace[prefix] = ""
    replace["transformer."] = ""

    def conv(sd):
        return comfy.utils.state_dict_prefix_replace(sd, dict(replace))

    return plan_from_conversion({"clip": part}, lambda ph: conv(ph["clip"]), {"clip": conv}, output_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# metadata as ComfyUI writes it, plus modelspec for every architecture
# ---------------------------------------------------------------------------------------------
_ARCH_BY_CONFIG = {
    "SD15": "stable-diffusion-v1", "SD15_instructpix2pix": "stable-diffusion-v1-edit",
    "SD21UnclipL": "stable-diffusion-v2-unclip-l", "SD21UnclipH": "stable-diffusion-v2-unclip-h",
    "Flux": "flux-1-dev", "FluxSchnell": "flux-1-schnell", "FluxInpaint": "flux-1-fill-dev",
    "SD35": "stable-diffusion-v3.5", "AuraFlow": "auraflow", "Chroma": "chroma",
}


def modelspec_architecture(model) -> Tuple[str, str]:
    """``(architecture, implementation)`` for modelspec: ComfyUI's own values for SDXL, the SDXL
    refiner, SVD and SD3, and names from the same spec family for the rest."""
    import comfy.model_base as mb
    m = model.model
    if isinstance(m, mb.SDXL):
        arch = "stable-diffusion-xl-v1-edit" if isinstance(m, mb.SDXL_instructpix2pix) else "stable-diffusion-xl-v1-base"
        return arch, "sgm"
    if isinstance(m, mb.SDXLRefiner):
        return "stable-diffusion-xl-v1-refiner", "sgm"
    if isinstance(m, mb.SVD_img2vid):
        return "stable-video-diffusion-img2vid-v1", "sgm"
    if isinstance(m, mb.SD3):
        return "stable-diffusion-v3-medium", "sgm"
    cfg = m.model_config
    name = type(cfg).__name__
    uc = getattr(cfg, "unet_config", {}) or {}
    if name == "SD15" and uc.get("in_channels") == 9:
        return "stable-diffusion-v1-inpainting", "sgm"
    if name == "SD20":
        v = m.model_type == mb.ModelType.V_PREDICTION
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        return (arch if uc.get("in_channels", 4) != 9 else "v2-inpainting"), "sgm"
    if name in _ARCH_BY_CONFIG:
        arch = _ARCH_BY_CONFIG[name]
        impl = "https://github.com/black-forest-labs/flux" if arch.startswith("flux") else (
            "sgm" if arch.startswith("stable-diffusion") else "https://github.com/comfyanonymous/ComfyUI")
        return arch, impl
    slug = re.sub(r"[^a-z0-9.]+", "-", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()).strip("-")
    return slug or "unknown", "https://github.com/comfyanonymous/ComfyUI"


def checkpoint_metadata(model, title: str, prompt=None, extra_pnginfo=None,
                        include_modelspec: bool = True) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """``(metadata, extra_keys)`` as ComfyUI's save_checkpoint builds them (modelspec, predict_key,
    v_pred / ztsnr / EDM sigma keys, prompt and workflow unless --disable-metadata), with modelspec
    architecture, title and date for every architecture."""
    import comfy.model_base
    import comfy.model_sampling

    metadata: Dict[str, str] = {}
    if include_modelspec:
        arch, impl = modelspec_architecture(model)
        metadata["modelspec.sai_model_spec"] = "1.0.0"
        metadata["modelspec.architecture"] = arch
        metadata["modelspec.implementation"] = impl
        metadata["modelspec.title"] = title
        metadata["modelspec.date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    extra: Dict[str, torch.Tensor] = {}
    ms = model.get_model_object("model_sampling")
    if isinstance(ms, comfy.model_sampling.ModelSamplingContinuousEDM):
        if isinstance(ms, comfy.model_sampling.V_PREDICTION):
            extra["edm_vpred.sigma_max"] = torch.tensor(ms.sigma_max).float()
            extra["edm_vpred.sigma_min"] = torch.tensor(ms.sigma_min).float()
    mt = model.model.model_type
    if mt == comfy.model_base.ModelType.EPS:
        metadata["modelspec.predict_key"] = "epsilon"
    elif mt == comfy.model_base.ModelType.V_PREDICTION:
        metadata["modelspec.predict_key"] = "v"
        extra["v_pred"] = torch.tensor([])
        if getattr(ms, "zsnr", False):
            extra["ztsnr"] = torch.tensor([])
    metadata.update(prompt_metadata(prompt, extra_pnginfo))
    return metadata, extra


def prompt_metadata(prompt=None, extra_pnginfo=None, always_prompt: bool = True) -> Dict[str, str]:
    """ComfyUI's ``prompt`` and workflow (extra_pnginfo) metadata, unless ``--disable-metadata``."""
    from comfy.cli_args import args
    out: Dict[str, str] = {}
    if getattr(args, "disable_metadata", False):
        return out
    if prompt is not None or always_prompt:
        out["prompt"] = json.dumps(prompt) if prompt is not None else ""
    if extra_pnginfo is not None:
        for k, v in extra_pnginfo.items():
            out[str(k)] = json.dumps(v)
    return out


def metadata_disabled() -> bool:
    from comfy.cli_args import args
    return bool(getattr(args, "disable_metadata", False))


# ---------------------------------------------------------------------------------------------
# file names: inside the output folder, never overwriting
# ---------------------------------------------------------------------------------------------
_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*]')


def sanitize_prefix(prefix: str, default: str) -> str:
    """A relative ``folder/name`` prefix that cannot leave the output folder: absolute paths, drive
    letters, ``..`` and ``.`` components and characters that are invalid in file names are removed."""
    p = str(prefix or "").replace("\\", "/")
    parts = []
    for seg in p.split("/"):
        seg = _BAD_CHARS.sub("_", seg.strip())
        if seg in ("", ".", ".."):
            continue
        seg = seg.rstrip(". ")                 # Windows drops trailing dots/spaces
        if not seg or set(seg) <= {"."}:
            continue
        parts.append(seg)
    if not parts:
        parts = [x for x in default.split("/") if x]
    return "/".join(parts)


@dataclass
class Destination:
    output_dir: str
    folder: str
    filename: str
    counter: int
    subfolder: str

    def path(self, counter: Optional[int] = None) -> str:
        return os.path.join(self.folder, f"{self.filename}_{(counter or self.counter):05}_.safetensors")

    @property
    def final_path(self) -> str:
        return self.path()


def destination(prefix: str, default: str, output_dir: Optional[str] = None) -> Destination:
    """Where ComfyUI's save nodes would put ``<prefix>_<counter>_.safetensors`` (the next free counter)."""
    import folder_paths
    out = os.path.abspath(output_dir or folder_paths.get_output_directory())
    safe = sanitize_prefix(prefix, default)
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(safe, out)
    folder = os.path.abspath(folder)
    if os.path.commonpath([out, folder]) != out:      # belt and braces: get_save_image_path checks too
        raise SaveError(f"refusing to write outside the output folder: {folder}")
    for p in stw.cleanup_stale_temps(folder):
        log.info("MergeLab: removed %s, left by a save that was killed", p)
    return Destination(out, folder, filename, counter, subfolder)


def _committer(dest: Destination, relabel: Optional[Callable[[str], None]] = None) -> Callable[[str], str]:
    """Gives the written temporary file the first free name from ``dest.counter`` on.  When that is not
    the name the file was written for (another program took it meanwhile), ``relabel(tmp)`` first
    rewrites the metadata that names the file (title, recipe) for the new counter, set in ``dest``."""
    def commit(tmp: str) -> str:
        first = counter = dest.counter
        for _ in range(1000):
            if counter != first and relabel is not None:
                dest.counter = counter
                relabel(tmp)
            final = dest.path(counter)
            try:
                stw.commit_no_clobber(tmp, final)
                dest.counter = counter
                return final
            except FileExistsError:
                counter += 1
        raise SaveError(f"no free file name for {dest.filename} in {dest.folder}")
    return commit


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
@dataclass
class SaveResult:
    path: str
    relpath: str
    nbytes: int
    tensors: int
    seconds: float
    dropped: List[str] = field(default_factory=list)


def _check_space(folder: str, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    need = nbytes + (16 << 20)
    if free < need:
        raise SaveError(f"not enough disk space in {folder}: the file needs {need / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB are free. Free some space or save with dtype fp16/bf16.")


_HEADER_SLACK = 64     # room in the header for metadata naming a later counter (see _committer)


def write_plan(plan: FilePlan, dest: Destination, metadata: Union[Dict[str, str], Callable[[Destination], Dict[str, str]]],
               progress: Optional[Callable[[int, int], None]] = None, threaded: bool = True,
               fsync: bool = True) -> SaveResult:
    """Write ``plan`` to ``dest`` atomically; ``progress(i, n)`` after each tensor (it may raise to
    cancel: nothing is left behind).  ``metadata``: a dict, or a function of the destination for
    metadata that names the file: it is called again if the file ends up under another counter."""
    meta_at = metadata if callable(metadata) else (lambda d, m=metadata: m)
    first = meta_at(dest)
    slack = _HEADER_SLACK if callable(metadata) else 0
    total_bytes = stw.file_size(plan.tensors, first, slack)
    _check_space(dest.folder, total_bytes)
    t0 = time.perf_counter()

    def on_tensor(i, n, p):
        if progress is not None:
            progress(i, n)

    planned = dest.counter

    def relabel(tmp: str) -> None:
        if not stw.rewrite_metadata(tmp, plan.tensors, meta_at(dest), fsync=fsync):
            log.warning("MergeLab: %s takes counter %d (%d was taken meanwhile), but its metadata still names "
                        "counter %d: the rewritten metadata did not fit in the header", dest.filename,
                        dest.counter, planned, planned)

    path = stw.write_file(dest.final_path, plan.tensors, first, on_tensor=on_tensor, threaded=threaded,
                          fsync=fsync, commit=_committer(dest, relabel if callable(metadata) else None),
                          header_slack=slack)
    rel = os.path.relpath(path, dest.output_dir).replace(os.sep, "/")
    return SaveResult(path, rel, total_bytes, len(plan.tensors), time.perf_counter() - t0, plan.dropped)


def comfy_progress(total_hint: int = 0):
    """A progress callback that drives ComfyUI's progress bar and honours Cancel."""
    import comfy.model_management as mm
    import comfy.utils
    pbar = comfy.utils.ProgressBar(max(1, total_hint))
    state = {"last": -1}

    def progress(i, n):
        mm.throw_exception_if_processing_interrupted()
        step = max(1, n // 200)
        if i == n or i < state["last"] or i - state["last"] >= step:      # (a new phase starts at 0)
            state["last"] = i
            pbar.update_absolute(i, n)
    return progress


def save_checkpoint(model, clip=None, vae=None, filename_prefix: str = "checkpoints/MergeLab", dtype: str = "keep",
                    prompt=None, extra_pnginfo=None, extra_metadata: Optional[Dict[str, str]] = None,
                    output_dir: Optional[str] = None, default_prefix: str = "checkpoints/MergeLab",
                    progress: Optional[Callable[[int, int], None]] = None,
                    metadata_fn: Optional[Callable[[Destination], Dict[str, str]]] = None,
                    threaded: bool = True, fsync: bool = True) -> SaveResult:
    """Stream ``model`` (+ ``clip`` + ``vae``) to ``<output>/<prefix>_<counter>_.safetensors`` in the layout
    of ComfyUI's CheckpointSave (ModelSave when clip and vae are None).  ``metadata_fn(dest)`` may
    add metadata once the file name is known (e.g. the recipe)."""
    if model is None or not hasattr(model, "model") or not hasattr(model.model, "model_config"):
        raise SaveError("connect a diffusion model (MODEL) to save")
    dest = destination(filename_prefix, default_prefix, output_dir)
    _, extra = checkpoint_metadata(model, "", prompt, extra_pnginfo)

    def metadata_at(d: Destination) -> Dict[str, str]:     # the title and the recipe name the file
        metadata, _ = checkpoint_metadata(model, f"{d.filename} {d.counter}", prompt, extra_pnginfo)
        if metadata_fn is not None:
            metadata.update(metadata_fn(d))
        if extra_metadata:
            metadata.update(extra_metadata)
        return metadata

    plan = plan_checkpoint(model, clip, vae, dtype, extra_keys=extra)
    return write_plan(plan, dest, metadata_at, progress=progress, threaded=threaded, fsync=fsync)


def save_clip(clip, filename_prefix: str = "clip/MergeLab", dtype: str = "keep", prompt=None, extra_pnginfo=None,
              extra_metadata: Optional[Dict[str, str]] = None, output_dir: Optional[str] = None,
              default_prefix: str = "clip/MergeLab",
              progress_factory: Optional[Callable[[int], Callable[[int, int], None]]] = None,
              threaded: bool = True, fsync: bool = True,
              metadata_fn: Optional[Callable[[Destination], Dict[str, str]]] = None) -> List[SaveResult]:
    """Stream a CLIP to one file per text encoder, as ComfyUI's CLIPSave does
    (``<prefix>_<encoder>_<counter>_.safetensors``, prefix and ``transformer.`` stripped).
    ``metadata_fn(dest)``: more metadata for each file (e.g. a recipe naming it)."""
    if clip is None or not hasattr(clip, "cond_stage_model"):
        raise SaveError("connect a text encoder (CLIP) to save")
    metadata: Dict[str, str] = {}
    if not metadata_disabled():
        metadata["format"] = "pt"
        metadata.update(prompt_metadata(prompt, extra_pnginfo))
    if extra_metadata:
        metadata.update(extra_metadata)
    safe = sanitize_prefix(filename_prefix, default_prefix)
    results: List[SaveResult] = []
    groups = clip_file_groups(clip)
    try:
        for prefix, part in groups:
            p = safe if not prefix else f"{safe}_{prefix[:-1]}"
            dest = destination(p, default_prefix, output_dir)
            plan = plan_clip_file(prefix, part, dtype)
            prog = progress_factory(len(plan.tensors)) if progress_factory else None
            file_metadata = (lambda d: dict(metadata, **metadata_fn(d))) if metadata_fn is not None else metadata
            results.append(write_plan(plan, dest, file_metadata, progress=prog, threaded=threaded, fsync=fsync))
    except BaseException:           # Cancel (or a failure) at a later encoder: none of this save's files stay
        for r in results:
            try:
                os.unlink(r.path)
            except OSError:
                pass
        raise
    return results
