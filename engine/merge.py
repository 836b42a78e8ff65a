"""The key-by-key merge of ComfyUI models.

For every key: read each input's effective weight (its LoRAs applied, fp8 dequantized) onto the
compute device in fp32, resolve the per-key parameters (block weights scale them), run the merge
method, apply the mask, cast to the dtype of the model the result copies on the offload device and keep it as
a ``set`` patch on a clone of that model: the base (model 1 for add_difference and its kin, or without a
base).  Inputs are never modified; nothing is left on the GPU.
"""
from __future__ import annotations

import contextlib
import math
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..merge_methods import MergeError, MergeMethod, create, reuse_buffers
from .alloc import recycled_memory, trim_when_collected
from .precision import full_fp32_matmul
from .recipe import record_merge
from .settings import settings_not_kept
from .weights import (CLIP_OPTIONAL_SUFFIXES, KeySource, all_finite, fp16_overflow, is_clip, model_family, patcher_of,
                      set_weights, storage_dtype)

log = logging.getLogger("MergeLab")


@dataclass
class MergeInput:
    """One model to merge (a MODEL patcher or a CLIP) with its per-model parameter values."""

    model: Any
    params: Dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass
class MergeOptions:
    seed: int = 0
    device: str = "auto"            # auto | cpu | gpu
    compute_dtype: str = "fp32"     # fp32 | fp64
    on_mismatch: str = "error"      # error | skip: keys missing or with other shapes
    block_weights: Any = None       # engine.blocks.BlockWeights or None
    mask: Any = None                # a MODEL_MASK or None
    stats: Any = None               # an engine.report.MergeStats collector or None
    progress: Optional[Callable[[int, int], None]] = None


DEVICES = ("auto", "cpu", "gpu")
COMPUTE_DTYPES = ("fp32", "fp64")
ON_MISMATCH = ("error", "skip")


def check_choice(what: str, value: Any, options: Sequence[str]) -> None:
    """A combo value from an API prompt is not checked by ComfyUI (V3 combos): a typo must not silently
    mean the default."""
    if value not in options:
        raise MergeError(f"{what} must be one of {', '.join(options)}, got {value!r}")


def compute_device(choice: str) -> torch.device:
    import comfy.model_management as mm

    check_choice("device", choice, DEVICES)
    if choice == "cpu":
        return torch.device("cpu")
    dev = mm.get_torch_device()
    if choice == "gpu" and dev.type == "cpu":
        raise MergeError("compute device 'gpu' was chosen but ComfyUI has no GPU here (it runs on the CPU); "
                         "choose 'auto' or 'cpu'")
    return dev


def check_architectures(objs: Sequence[Any], names: Sequence[str]) -> None:
    """Models of different model_base classes, or text encoders of different CLIP classes (SD1's clip_l
    with Flux's clip_l + t5, SDXL's with SD1's...), cannot be merged: an error before any computation."""
    if objs and is_clip(objs[0]):
        fams = [model_family(o) for o in objs]                       # CLIP:<module>.<class>
        shown = [f.rsplit(".", 1)[-1] for f in fams]
        what = "text encoders (CLIP)"
    else:
        fams = shown = [_architecture(o) for o in objs]
        what = "models"
    if len(set(fams)) > 1:
        desc = ", ".join(f"{n}: {f}" for n, f in zip(names, shown))
        raise MergeError(f"cannot merge {what} of different architectures ({desc})")


def _fewer_input_channels(shape, ref_shape, channels: Optional[Tuple[int, int]] = None) -> bool:
    """``shape`` is ``ref_shape`` with fewer entries along dim 1 (the input channels of a conv or linear
    weight): the first layer of an SD1.5 / SDXL model (4 channels) against an inpainting (9) or
    instruct-pix2pix (8) one, Flux's img_in against Flux Fill's.  ``channels``: (the input's, the reference's)
    model input channels; then only a layer whose dim 1 grows in that proportion counts (the layer that takes
    the model's input: not SD2's wider cross-attention against SD1's)."""
    shape, ref_shape = tuple(shape), tuple(ref_shape)
    fewer = (len(shape) == len(ref_shape) >= 2 and shape[0] == ref_shape[0] and shape[2:] == ref_shape[2:]
             and 0 < shape[1] < ref_shape[1])
    if fewer and channels is not None:
        return channels[0] < channels[1] and shape[1] * channels[1] == ref_shape[1] * channels[0]
    return fewer


def input_channels(obj) -> Optional[int]:
    """The input channels of a MODEL's diffusion model (its config's ``in_channels``), None for a CLIP or
    a model whose config does not say."""
    if is_clip(obj):
        return None
    cfg = getattr(getattr(patcher_of(obj).model, "model_config", None), "unet_config", None) or {}
    value = cfg.get("in_channels")
    return int(value) if isinstance(value, int) else None


def _architecture(obj) -> str:
    """The model_base class of a MODEL; an instruct-pix2pix one (ComfyUI's IP2P mixin) counts as its plain
    class: it differs only in its first layer's input channels, which a merge handles (see :func:`plan_keys`)."""
    cls = type(patcher_of(obj).model)
    if any(c.__name__ == "IP2P" for c in cls.__mro__[1:]):
        cls = next((b for b in cls.__bases__ if b.__name__ != "IP2P"), cls)
    return cls.__name__


def plan_keys(base: Optional[KeySource], sources: List[KeySource], names: List[str], on_mismatch: str,
              notes: Optional[List[str]] = None, *, ref_index: int = 0,
              widened: Optional[Dict[str, int]] = None,
              channels: Optional[Sequence[Optional[int]]] = None) -> List[str]:
    """The keys to merge, in the reference model's order (``ref_index`` into base + sources); errors or warns
    about mismatches up front (the warning is logged and added to ``notes``, the merge report's).

    ``widened``: when given, a key where the other inputs have fewer input channels than the reference (all
    the same number, see :func:`_fewer_input_channels`) is merged on those channels, as supermerger does for
    inpainting models, instead of being a mismatch: ``widened[key]`` = that number.  Only where the models'
    own input channels (``channels``, per input, from :func:`input_channels`) differ in the same proportion."""
    all_sources = ([base] if base is not None else []) + list(sources)
    ref = all_sources[ref_index]
    ref_name = names[ref_index]
    keys = ref.keys()
    missing: Dict[str, List[str]] = {}
    shape_bad: Dict[str, List[str]] = {}
    narrower: Dict[str, Dict[str, int]] = {}          # key -> {input name: its input channels}
    for i, (src, name) in enumerate(zip(all_sources, names)):
        if src is ref:
            continue
        have = src.entries
        pair = None
        if channels is not None and channels[i] is not None and channels[ref_index] is not None:
            pair = (channels[i], channels[ref_index])
        for k in keys:
            if k not in have:
                missing.setdefault(name, []).append(k)
            elif src.shape(k) != ref.shape(k):
                if (widened is not None and pair is not None
                        and _fewer_input_channels(src.shape(k), ref.shape(k), pair)):
                    narrower.setdefault(k, {})[name] = int(src.shape(k)[1])
                    continue
                shape_bad.setdefault(name, []).append(f"{k} {tuple(src.shape(k))} vs {tuple(ref.shape(k))}")
    for k, widths in narrower.items():
        if len(set(widths.values())) == 1:
            widened[k] = next(iter(widths.values()))
        else:                                           # inputs that differ among themselves
            for name, w in widths.items():
                shape = (ref.shape(k)[0], w) + tuple(ref.shape(k)[2:])
                shape_bad.setdefault(name, []).append(f"{k} {shape} vs {tuple(ref.shape(k))}")
    absent_anywhere = {k for ks in missing.values() for k in ks}
    bad_anywhere = {s.split(" ")[0] for ks in shape_bad.values() for s in ks}
    if widened is not None:
        for k in list(widened):
            if k in absent_anywhere or k in bad_anywhere:
                del widened[k]
        if widened:
            first = next(iter(widened))
            note = (f"{len(widened)} key(s) of {ref_name} have more input channels than the other inputs' ("
                    f"{first}: {tuple(ref.shape(first))} vs {widened[first]} channels, as an inpainting or "
                    f"instruct model's first layer): merged on the channels they share, the others keep "
                    f"{ref_name}'s values")
            log.warning("MergeLab: %s", note)
            if notes is not None:
                notes.append(note)
    extra = {name: [k for k in src.keys() if k not in ref.entries]
             for src, name in zip(all_sources, names) if src is not ref}
    extra = {n: ks for n, ks in extra.items() if ks}
    if not (missing or shape_bad or extra):
        return keys
    parts = []
    for name, ks in missing.items():
        parts.append(f"{len(ks)} key(s) of {ref_name} missing in {name}: {_preview(ks)}")
    for name, ks in shape_bad.items():
        parts.append(f"{len(ks)} key(s) with other shapes in {name}: {_preview(ks)}")
    for name, ks in extra.items():
        parts.append(f"{len(ks)} key(s) of {name} not in {ref_name}: {_preview(ks)}")
    if on_mismatch != "skip":
        hint = ""
        wider = [names[i] for i, c in enumerate(channels or ()) if c is not None and channels[ref_index] is not None
                 and c > channels[ref_index]]
        if widened is not None and wider:
            hint = (f"\n{', '.join(wider)} take(s) more input channels than {ref_name} (an inpainting or instruct "
                    f"model?): the result is a copy of {ref_name}, so such a model must be {ref_name} (with "
                    f"add_difference: model 1, A).")
        raise MergeError("the models do not have the same keys and shapes:\n  " + "\n  ".join(parts) + hint +
                         f"\nSet on_mismatch to 'skip' to merge only the keys they share (the rest keep {ref_name}'s "
                         f"values).")
    # counted once per key, however many inputs it is wrong in, so that the numbers add up
    absent = {k for ks in missing.values() for k in ks}
    other_shape = {s.split(" ")[0] for ks in shape_bad.values() for s in ks} - absent
    bad = absent | other_shape
    extra_keys = {k for ks in extra.values() for k in ks}
    note = (f"skipping {len(bad)} mismatched key(s) of {ref_name} ({len(absent)} missing in an input, "
            f"{len(other_shape)} with other shapes): they keep {ref_name}'s values; {len(extra_keys)} key(s) that "
            f"only other inputs have are left out")
    log.warning("MergeLab: %s", note)
    if notes is not None:
        notes.append(note)
    return [k for k in keys if k not in bad]


def _preview(items: List[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


@lru_cache(maxsize=4096)
def _with_globals(method: MergeMethod, changes: tuple) -> MergeMethod:
    d = method.to_dict()
    d["params"] = {**d["params"], **dict(changes)}
    return create(d["method"], **d["params"])


def resolve_params(method: MergeMethod, inputs: List[MergeInput], factors: Dict[str, List[float]]):
    """Per-key method and per-model parameter lists with block-weight factors applied."""
    spec = method.spec
    per_model = {}
    for p in spec.per_model_params:
        vals = [inp.params.get(p.name, method.get(p.name)) for inp in inputs]
        if isinstance(vals[0], tuple):     # a per-model default list given to create()
            vals = [v[i] if isinstance(v, tuple) else v for i, v in enumerate(vals)]
        f = factors.get(p.name)
        if f is not None:
            vals = [v * fi for v, fi in zip(vals, f)]
        per_model[p.name] = vals
    changes = []
    for p in spec.global_params:
        f = factors.get(p.name)
        if f is not None and f[0] != 1.0:
            changes.append((p.name, method.get(p.name) * f[0]))
    m = _with_globals(method, tuple(changes)) if changes else method
    return m, per_model


@torch.no_grad()
@full_fp32_matmul()
def merge_models(base: Any, inputs: List[MergeInput], method: MergeMethod, options: MergeOptions):
    """Merge ``inputs`` (and ``base``) with ``method``; returns a patched clone of the base (of the first
    input when no base is given, or when the method changes model 1: ``spec.result_is_model1``).  Works for
    MODEL patchers and CLIP objects alike."""
    spec = method.spec
    check_choice("compute_dtype", options.compute_dtype, COMPUTE_DTYPES)
    check_choice("on_mismatch", options.on_mismatch, ON_MISMATCH)
    if len(inputs) < spec.min_models or (spec.max_models is not None and len(inputs) > spec.max_models):
        raise MergeError(f"merge method '{method.name}' takes {spec.models_text()} model(s) besides the base, "
                         f"got {len(inputs)}")
    if spec.base == "required" and base is None:
        raise MergeError(f"merge method '{method.name}' needs a base model: connect 'base'")
    if spec.base == "none" and base is not None:
        base_for_method = None
    else:
        base_for_method = base
    objs = ([base] if base is not None else []) + [i.model for i in inputs]
    names = (["base"] if base is not None else []) + [i.name or f"model {n + 1}" for n, i in enumerate(inputs)]
    # each input's own values, checked before any computation, naming the input (the per-key check
    # would stop at the first key without saying which input it was)
    for inp, name in zip(inputs, names[len(names) - len(inputs):]):
        for p in spec.per_model_params:
            if p.name in inp.params:
                p.coerce(inp.params[p.name], f"merge method '{method.name}', {name}")
    # the values as given (no block factors), with the method's rules across parameters, before any key
    method.check_values(len(inputs), resolve_params(method, inputs, {})[1])
    if len({is_clip(o) for o in objs}) > 1:
        raise MergeError("cannot merge a CLIP with a MODEL")
    check_architectures(objs, names)
    # the model the result is a copy of: the base (model 1 without one), or model 1 for the methods that
    # change it (add_difference: A + (B - C))
    ref_index = 1 if spec.result_is_model1 and base is not None else 0
    ref_obj, ref_name = objs[ref_index], names[ref_index]
    for note in settings_not_kept(ref_obj, ref_name, list(zip(objs, names))):
        _warn(options, note)

    base_src = KeySource.of(base).read_only() if base is not None else None
    sources = [KeySource.of(i.model).read_only() for i in inputs]
    # a method without a base returns model 1's dtype: where model 1 is stored in another dtype than the
    # base (whose dtype the result is kept in), its weight is read as a copy in the compute dtype, so the
    # result is rounded once, to the base's dtype (not first to model 1's bf16, say)
    first_copy = KeySource.of(inputs[0].model) if base is not None and base_for_method is None else None
    widened: Dict[str, int] = {}
    keys = plan_keys(base_src, sources, names, options.on_mismatch,
                     options.stats.notes if options.stats is not None else None, ref_index=ref_index, widened=widened,
                     channels=[input_channels(o) for o in objs])
    clip = is_clip(objs[0])
    ref_src = (([base_src] if base_src is not None else []) + sources)[ref_index]

    bw = options.block_weights
    if bw is not None:
        _check_block_params(bw, method)
        for note in bw.check(ref_obj, keys):        # (logged there)
            if options.stats is not None:
                options.stats.notes.append(note)
        _check_scaled_ranges(bw, method, inputs, keys)
        note = _cancelled_weight_factors(bw, method, len(inputs), keys)
        if note:
            _warn(options, note)
    device = compute_device(options.device)
    work_dtype = torch.float64 if options.compute_dtype == "fp64" else torch.float32
    offload = patcher_of(ref_obj).offload_device

    import comfy.model_management as mm
    import comfy.utils

    if device.type != "cpu":
        biggest = max((ref_src.raw(k).numel() for k in keys), default=0)
        mm.free_memory(biggest * work_dtype.itemsize * (len(inputs) + 4), device)
    pbar = comfy.utils.ProgressBar(len(keys))

    def advance(i: int) -> None:        # key i is done (merged or kept)
        pbar.update(1)
        if options.progress:
            options.progress(i + 1, len(keys))
    merged: Dict[str, torch.Tensor] = {}
    memory = contextlib.ExitStack()
    memory.enter_context(recycled_memory())
    memory.enter_context(reuse_buffers())
    try:
        for i, key in enumerate(keys):
            mm.throw_exception_if_processing_interrupted()
            factors = bw.factors(key, len(inputs)) if bw is not None else {}
            m, per_model = resolve_params(method, inputs, factors)
            width = widened.get(key)
            if options.mask is not None and options.mask.state(key) == "none":
                # the mask selects nothing here: the key keeps the value of the model the result is a copy
                # of, which it already has: no computation, and no patch holding a copy
                if options.stats is not None:
                    b = base_src.read(key, device, work_dtype) if base_src is not None else None
                    xs = [s.read(key, device, work_dtype) for s in sources]
                    b, xs, own = _shared_channels(b, xs, ref_index, width)
                    options.stats.add(key, own, b, xs)
                    del b, xs, own
                advance(i)
                continue
            b = base_src.read(key, device, work_dtype) if base_src is not None else None
            xs = [s.read(key, device, work_dtype) for s in sources]
            if first_copy is not None and xs[0].dtype not in (work_dtype, storage_dtype(ref_src.dtype(key))):
                xs[0] = first_copy.read(key, device, work_dtype)
            full = (([b] if b is not None else []) + xs)[ref_index] if width is not None else None   # whole
            b, xs, own = _shared_channels(b, xs, ref_index, width)
            if clip and key.endswith(CLIP_OPTIONAL_SUFFIXES) and not all_finite([b] + xs):
                _warn(options, _kept_note(key, "not finite in an input"))
                del b, xs
                advance(i)
                continue
            out = m.merge(b if base_for_method is not None else None, xs, key=key, seed=options.seed,
                          **per_model)
            if clip and key.endswith(CLIP_OPTIONAL_SUFFIXES) and storage_dtype(ref_src.dtype(key)) == torch.float16 \
                    and fp16_overflow(out) is not None:
                # the uninitialized bytes can be large finite fp16 values whose merge overflows: kept too
                _warn(options, _kept_note(key, "its merged values do not fit fp16"))
                del b, xs, out
                advance(i)
                continue
            if width is not None and options.mask is not None and options.mask.shape(key) == tuple(out.shape):
                # a mask made for the narrower models (the base C of an inpainting A + (B - C)): on the shared
                # channels; the reference's others are kept whole
                sel = options.mask.selection(key, out.shape, device)
                if sel is not None:
                    out = torch.where(sel, out, own)
                del sel
                masked = True
            else:
                masked = False
            if width is not None:           # the reference's other input channels are kept
                whole = full.clone()
                whole[:, :width] = out
                out, own = whole, full
                del whole
            if options.mask is not None and not masked:
                sel = options.mask.selection(key, out.shape, device)
                if sel is not None:
                    out = torch.where(sel, out, own)
            if options.stats is not None:
                options.stats.add(key, out[:, :width] if width is not None else out, b, xs)
            merged[key] = to_storage(key, out, storage_dtype(ref_src.dtype(key)), offload)
            del out, b, xs, own, full
            advance(i)
    finally:
        memory.close()
        if device.type != "cpu":
            mm.soft_empty_cache()
    result = _patched_clone(ref_obj, merged)
    record_merge(result, method, inputs, options, base=base, keys=keys)
    return result




def _shared_channels(b: Optional[torch.Tensor], xs: List[torch.Tensor], ref_index: int, width: Optional[int]):
    """``(b, xs, own)``: the base and the models as the method sees them, and the values of the model the result
    is a copy of; for a widened key (see :func:`plan_keys`) all of them cut to their first ``width`` input
    channels."""
    if width is not None:
        b = b[:, :width].contiguous() if b is not None and b.shape[1] != width else b
        xs = [x[:, :width].contiguous() if x.shape[1] != width else x for x in xs]
    return b, xs, (([b] if b is not None else []) + xs)[ref_index]


def _warn(options: MergeOptions, note: str) -> None:
    """A warning of the merge: in the log, and under the merge report's table."""
    log.warning("MergeLab: %s", note)
    if options.stats is not None:
        options.stats.notes.append(note)


def _kept_note(key: str, why: str) -> str:
    return (f"{key} kept as is: {why} (a weight the checkpoint does not hold, which ComfyUI leaves "
            "uninitialized and drops on save); not in the report's figures")


def to_storage(key: str, out: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """``out`` as kept in the result (``dtype`` on ``device``).  A result kept in fp16 must not round to
    ±inf (weights of 10 on large values can get there): an error naming the key instead of a model that is
    silently broken."""
    if dtype == torch.float16 and out.numel():
        _check_fits_fp16(key, out)
    return out.to(device=device, dtype=dtype)


def _check_fits_fp16(key: str, out: torch.Tensor) -> None:
    big = fp16_overflow(out)
    if big is not None:
        # a method that returns the inputs' fp16 has already rounded the overflow to inf
        size = f"largest |value| {big:.6g}" if math.isfinite(big) else "some values round to ±inf"
        raise MergeError(f"the new values of {key} do not fit the model's fp16 ({size}, fp16 holds up to "
                         "65504): lower the weights or strength, or use a bf16 or fp32 base")


def _cancelled_weight_factors(bw, method: MergeMethod, n: int, keys: List[str]) -> Optional[str]:
    """A note when block factors scale 'weight' alike for every model under a method that divides by the
    summed weights (normalize on: linear, TIES, DARE, ...): there such a factor cancels out, and the block
    weights silently change nothing (the block nodes scale 'weight' of all models by default)."""
    if "weight" not in bw.params() or not any(p.name == "normalize" for p in method.spec.params) \
            or not method.get("normalize"):
        return None
    from .blocks import block_of
    alike = {}
    for key in keys:
        f = bw.factors(key, n).get("weight")
        if f is not None and f[0] != 1.0 and all(v == f[0] for v in f):
            alike.setdefault(block_of(key), None)
    if not alike:
        return None
    names = list(alike)
    return (f"block weights scale 'weight' by the same factor for every model in {len(names)} block(s) "
            f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}), but '{method.name}' divides by the "
            "summed weights (normalize is on), so there the factor cancels out and changes nothing: set "
            "'models' on the block-weights node to the model(s) it is for, turn normalize off, or scale "
            "another parameter (density, lambda, ...)")


def _check_scaled_ranges(bw, method: MergeMethod, inputs: List[MergeInput], keys: List[str]) -> None:
    """Every parameter value the block factors make is in its range, checked before any computation (a
    density of 0.8 times an OUT11 factor of 2 stopped the merge at the last block, naming no block)."""
    from .blocks import block_of
    seen = set()
    for key in keys:
        factors = bw.factors(key, len(inputs))
        sig = tuple(sorted((p, tuple(v)) for p, v in factors.items()))
        if not factors or sig in seen:
            continue
        seen.add(sig)
        try:
            m, per_model = resolve_params(method, inputs, factors)
            m.check_values(len(inputs), per_model)
        except (MergeError, ValueError) as e:
            scaled = ", ".join(f"{p} × {', '.join(f'{x:g}' for x in v)}" for p, v in factors.items())
            raise MergeError(f"block weights take a parameter out of its range in block '{block_of(key)}' "
                             f"(e.g. {key}; factors: {scaled}): {e}") from None


def _check_block_params(bw, method: MergeMethod) -> None:
    names = {p.name for p in method.spec.params if p.kind in ("float", "int")}
    for param in bw.params():
        if param not in names:
            raise MergeError(f"block weights scale '{param}', but merge method '{method.name}' has no numeric "
                             f"parameter of that name (its numeric parameters: {', '.join(sorted(names)) or 'none'})")
    global_names = {p.name for p in method.spec.global_params}
    for entry in bw.entries:
        if entry.param in global_names and entry.models is not None:
            chosen = ", ".join(str(m) for m in entry.models)
            raise MergeError(f"block weights scale '{entry.param}' for model(s) {chosen} only, but '{entry.param}' is "
                             f"a global parameter of '{method.name}' (one value for all models): set 'models' to "
                             f"'all' on that block-weights node ({entry.label})")


def _patched_clone(obj, merged: Dict[str, torch.Tensor]):
    """A clone of ``obj`` whose merged keys are replaced (``set`` patches, earlier patches and weight
    wrappers dropped: the merged values already include them)."""
    import uuid

    clone = obj.clone()
    mp = patcher_of(clone)
    set_weights(mp, merged)
    mp.patches_uuid = uuid.uuid4()
    trim_when_collected(mp)
    return clone
