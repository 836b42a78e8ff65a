"""LoRA files: loading (every format ComfyUI's own key maps accept: kohya, diffusers/PEFT,
ComfyUI-native, LyCORIS LoCon) and saving (kohya or ComfyUI-native key names, fp16/bf16/fp32,
kohya metadata plus the recipe, counter file names, atomic write that never replaces a file).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .lora import (BaseWeight, Lora, LoraError, LoraLayer, LayerKey, UNET_PREFIX, arch_of, base_key, dora_scale,
                   is_model_key, key_text, not_a_difference, target_shape, weight_shapes)
from .weights import fp16_overflow

log = logging.getLogger("MergeLab")

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KEY_FORMATS = ("kohya", "comfyui")


# -- key maps --------------------------------------------------------------------------------------

def key_map_for(model=None, clip=None) -> Dict[str, Any]:
    """ComfyUI's own LoRA key map (LoRA name prefix → model key) for ``model`` and ``clip``, plus the
    PEFT/diffusers attention names without ``.processor`` that ComfyUI's SD1/SDXL map lacks."""
    import comfy.lora
    key_map: Dict[str, Any] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        _add_peft_unet_aliases(model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def _add_peft_unet_aliases(model, key_map: Dict[str, Any]) -> None:
    """PEFT-era diffusers UNet LoRAs name attention layers ``unet.<block>.attn1.to_q`` and
    ``...to_out.0``; ComfyUI maps only the older ``.processor.to_q`` spelling.  Add the PEFT names
    (never replacing an existing entry)."""
    import comfy.utils
    cfg = getattr(model.model, "model_config", None)
    unet_config = getattr(cfg, "unet_config", None)
    if not unet_config or "model_channels" not in unet_config:
        return
    try:
        diffusers_keys = comfy.utils.unet_to_diffusers(unet_config)
    except Exception:   # not a UNet ComfyUI can map
        return
    for k, v in diffusers_keys.items():
        if not k.endswith(".weight"):
            continue
        path = k[:-len(".weight")]
        for prefix in ("unet.", ""):
            key_map.setdefault(prefix + path, UNET_PREFIX + v)


def _inverse(key_map: Mapping[str, Any]) -> Dict[Any, List[str]]:
    inv: Dict[Any, List[str]] = {}
    for name, target in key_map.items():
        inv.setdefault(target, []).append(name)
    return inv


def _uses_diffusers_unet_names(arch: Mapping[str, Any]) -> bool:
    """kohya names SD1/SD2 UNet layers by their diffusers module paths (SDXL by its own paths)."""
    return str(arch.get("model_config", "")).startswith(("SD15", "SD20", "SD21"))


def kohya_names(model, clip, targets: Iterable[LayerKey], arch: Mapping[str, Any]) -> Dict[LayerKey, str]:
    """The kohya-style name prefix for each target weight key, chosen among the names ComfyUI's own
    key map accepts for it (so a file written with them loads back onto the same keys)."""
    import comfy.lora
    km: Dict[str, Any] = {}
    if model is not None:
        km = comfy.lora.model_lora_keys_unet(model.model, km)
    if clip is not None:
        km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, km)
    inv = _inverse(km)
    sd1 = _uses_diffusers_unet_names(arch)
    n_te = len(arch.get("text_encoders", []) or [])
    out: Dict[LayerKey, str] = {}
    for t in targets:
        cands = sorted(inv.get(t, []))
        if not cands:
            continue
        k = base_key(t)
        if isinstance(t, tuple):
            pick = [c for c in cands if c.startswith(("lora_unet_", "lora_transformer_"))] or cands
            out[t] = pick[0]
        elif k.startswith(UNET_PREFIX):
            own = "lora_unet_" + k[len(UNET_PREFIX):].rsplit(".", 1)[0].replace(".", "_") if k.endswith(".weight") else None
            diff_names = [c for c in cands if c.startswith("lora_unet_") and c != own]
            if sd1 and diff_names:
                out[t] = diff_names[0]
            elif own in cands:
                out[t] = own
        else:
            te = [c for c in cands if re.match(r"lora_te\d*_", c)]
            numbered = [c for c in te if re.match(r"lora_te\d+_", c)]
            plain = [c for c in te if c.startswith("lora_te_")]
            pick = (numbered or plain) if n_te > 1 else (plain or numbered)
            if pick:
                # kohya's Flux/SD3 scripts name T5 lora_te3_ (OneTrainer's lora_te2_ is also mapped by ComfyUI)
                out[t] = pick[-1] if k.startswith("t5xxl.") else pick[0]
    return out


def comfy_name(key: LayerKey, names: Mapping[LayerKey, str]) -> str:
    """ComfyUI's generic names (what its LoraSave writes): ``diffusion_model.<path>`` and
    ``text_encoders.<path>``."""
    if isinstance(key, tuple):
        if key in names:
            return names[key]
        raise LoraError(f"no file name known for the sliced layer {key_text(key)}")
    if key.startswith(UNET_PREFIX):
        return key[:-len(".weight")] if key.endswith(".weight") else key
    if key.endswith(".weight"):
        return "text_encoders." + key[:-len(".weight")]
    raise LoraError(f"text-encoder parameter {key} has no LoRA file name (only weights and their biases do)")


# -- loading ---------------------------------------------------------------------------------------

@contextmanager
def _collect_log(prefix: str):
    """Swallow ComfyUI's per-key ``prefix…`` log lines and collect them (we report once, with a count)."""
    items: List[str] = []

    class _F(logging.Filter):
        def filter(self, record):
            try:
                msg = record.getMessage()
            except Exception:
                return True
            if msg.startswith(prefix):
                items.append(msg[len(prefix):].strip())
                return False
            return True

    f = _F()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield items
    finally:
        root.removeFilter(f)


def read_lora_file(path: str, name: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and metadata of a LoRA file, or a LoraError that says what is wrong with it."""
    import comfy.utils
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file '{name}' not found ({path})")
    try:
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraError(f"cannot read LoRA file '{name}': {msg}. The file is truncated, corrupted or not a "
                        "LoRA; download or save it again.") from None
    if not isinstance(sd, dict) or not sd:
        raise LoraError(f"LoRA file '{name}' holds no tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraError(f"LoRA file '{name}' is not a tensor file (entry {bad[0]!r} is a {type(sd[bad[0]]).__name__})")
    return sd, dict(meta or {})


def load_lora_file(path: str, model=None, clip=None, name: Optional[str] = None) -> Lora:
    name = name or os.path.basename(path)
    sd, meta = read_lora_file(path, name)
    src = {"kind": "file", "name": name}
    for k in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name"):
        if k in meta:
            src[k] = meta[k]
    return lora_from_state_dict(sd, model, clip, name=name, source=src)


def lora_from_state_dict(sd: Mapping[str, torch.Tensor], model=None, clip=None, name: str = "lora",
                         source: Optional[Dict[str, Any]] = None) -> Lora:
    """Parse a LoRA state dict with ComfyUI's own converter, key maps and adapter loaders."""
    import comfy.lora
    import comfy.lora_convert

    if model is None and clip is None:
        raise LoraError("loading a LoRA needs the MODEL (and the CLIP for its text-encoder part) it is for")
    sd = comfy.lora_convert.convert_lora(dict(sd))
    key_map = key_map_for(model, clip)
    with _collect_log("lora key not loaded:") as unmatched:
        patches = comfy.lora.load_lora(sd, key_map, log_missing=True)
    shapes: Dict[str, Tuple[int, ...]] = {}
    if model is not None:
        shapes.update(weight_shapes(model))
    if clip is not None:
        shapes.update(weight_shapes(clip))

    layers: Dict[LayerKey, LoraLayer] = {}
    bad: List[str] = []
    for target, patch in patches.items():
        target, function = _split_target(target)
        shape = target_shape(shapes, target)
        if shape is None:
            bad.append(f"{key_text(target)}: not in the model")
            continue
        layer = _layer_from_patch(patch, shape)
        if layer.kind == "patch" and dora_scale(layer.patch) is not None:
            owner = model if is_model_key(target) else clip
            layer = dataclasses.replace(layer, base=BaseWeight(owner))
        if function is not None:
            layer = _rearranged(layer, function, target)
        problem = _fit_problem(layer, shape)
        if problem:
            bad.append(f"{key_text(target)}: {problem}")
            continue
        layers[target] = layer
    n_keys = len(sd)
    if bad:
        raise LoraError(f"LoRA '{name}' does not fit this model: {len(bad)} layer(s) have other shapes "
                        f"(e.g. {'; '.join(bad[:3])}). It was made for another architecture.")
    if not layers:
        hint = "" if clip is not None else " (no CLIP was connected, so text-encoder layers cannot match)"
        raise LoraError(f"none of the {n_keys} tensors of LoRA '{name}' match a layer of this "
                        f"{_what(model, clip)}{hint}: it was made for another architecture "
                        f"(first keys: {', '.join(list(sd)[:3])})")
    if unmatched:
        te_hint = ""
        if clip is None and any(k.startswith(("lora_te", "text_encoder", "te_", "text_encoders.")) for k in unmatched):
            te_hint = "; connect the CLIP to load the text-encoder part"
        log.warning("MergeLab: LoRA '%s': %d of %d tensors match no layer of this %s and are ignored "
                    "(e.g. %s)%s", name, len(unmatched), n_keys, _what(model, clip), ", ".join(unmatched[:3]),
                    te_hint)
    arch = arch_of(model, clip)
    wkeys = set()
    for t in layers:
        wkeys.add(t)
        k = base_key(t)
        if isinstance(t, str) and k.endswith(".bias"):
            wkeys.add(k[:-len(".bias")] + ".weight")
        if isinstance(t, tuple):
            wkeys.add(k)            # the whole weight's name: a file writes its slices as one layer
    names = kohya_names(model, clip, wkeys, arch)
    whole = {base_key(t): tuple(shapes[base_key(t)]) for t in layers
             if isinstance(t, tuple) and base_key(t) in shapes}
    src = dict(source or {"kind": "file", "name": name})
    src.setdefault("name", name)
    src["ignored_keys"] = len(unmatched)
    return Lora.make(layers, names, arch, src, whole)


def _what(model, clip) -> str:
    if model is not None and clip is not None:
        from .weights import model_family
        return f"MODEL ({model_family(model).split(':')[-1]}) and CLIP"
    if model is not None:
        from .weights import model_family
        return f"MODEL ({model_family(model).split(':')[-1]})"
    return "CLIP"


def _split_target(target):
    """ComfyUI's key maps give a few diffusers names a third part, a function ComfyUI applies to the
    layer's ΔW when it patches (``(key, None, swap_scale_shift)`` for Flux / SD3 ``norm_out.linear`` and
    AuraFlow ``modF``: diffusers orders those rows scale, shift).  ``(target as a LayerKey, function)``."""
    if isinstance(target, tuple) and len(target) > 2:
        key, offset, function = target[0], target[1], target[2]
        return (key if offset is None else (key, tuple(offset))), function
    return target, None


def _rearranged(layer: LoraLayer, function, target) -> LoraLayer:
    """``layer`` with ``function`` (applied by ComfyUI to its ΔW) made part of it: swap_scale_shift, which
    swaps the halves of the output rows, is applied to the up factor (the layer stays low-rank); any other
    function, to the full difference."""
    import comfy.utils
    if layer.kind == "patch":
        why = not_a_difference(layer.patch)
        if why is not None:
            raise LoraError(f"layer {key_text(target)} is {why}, on a weight whose rows ComfyUI rearranges when "
                            "it loads the LoRA: not supported")
    if (function is getattr(comfy.utils, "swap_scale_shift", None) and layer.kind == "lora"
            and layer.up.shape[0] % 2 == 0):
        return LoraLayer("lora", layer.shape, up=function(layer.up), down=layer.down, alpha=layer.alpha,
                         mid=layer.mid)
    return LoraLayer.from_diff(function(layer.delta(key=target)).reshape(layer.shape).contiguous())


def _layer_from_patch(patch, shape) -> LoraLayer:
    from comfy.weight_adapter import LoRAAdapter
    if isinstance(patch, LoRAAdapter):
        up, down, alpha, mid, dora, reshape = patch.weights
        if dora is None and reshape is None:
            return LoraLayer("lora", tuple(shape), up=up, down=down, alpha=None if alpha is None else float(alpha),
                             mid=mid)
        return LoraLayer("patch", tuple(shape), patch=patch)
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff" and len(patch[1]) == 1:
        return LoraLayer("diff", tuple(shape), diff=patch[1][0])
    return LoraLayer("patch", tuple(shape), patch=patch)


def _fit_problem(layer: LoraLayer, shape) -> Optional[str]:
    shape = tuple(shape)
    numel_in = 1
    for s in shape[1:]:
        numel_in *= s
    if layer.kind == "lora":
        up, down, mid = layer.up, layer.down, layer.mid
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            return f"LoRA factors {tuple(up.shape)} and {tuple(down.shape)} do not chain"
        out = up.shape[0]
        inner = down[0].numel() if mid is None else down.shape[1] * mid[0, 0].numel()
        if mid is not None and (mid.shape[0] != mid.shape[1] or mid.shape[1] != down.shape[0]):
            return f"LoCon mid {tuple(mid.shape)} does not match down {tuple(down.shape)}"
        if len(shape) < 2 or out != shape[0] or inner != numel_in:
            return f"LoRA {out}×{inner} vs weight {shape}"
        return None
    if layer.kind == "diff":
        if tuple(layer.diff.shape) != shape:
            return f"difference {tuple(layer.diff.shape)} vs weight {shape}"
    return None


# -- saving ----------------------------------------------------------------------------------------

_FP16_TINY = 2.0 ** -14      # below this fp16 has subnormals: fewer significant bits


def _poor_in_fp16(t: torch.Tensor) -> bool:
    """More than 1 % of the non-zero entries would be fp16 subnormals, or some would overflow."""
    a = t.detach().abs()
    nz = int(torch.count_nonzero(a))
    return nz > 0 and (int(((a < _FP16_TINY) & (a > 0)).sum()) > 0.01 * nz or bool(a.max() > 65504))


def _balanced(up: torch.Tensor, down: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank component's up column and down row at the same norm.  A LoRA whose
    scale was folded into its up factor (Stack, Merge LoRAs: alpha 1 of rank 128 at strength 0.5 gives up
    values near 1e-5) would be stored in fp16 mostly as subnormals, ~10x less accurate than fp16 rounding."""
    u, d = up.float(), down.float()
    un = torch.linalg.vector_norm(u.reshape(u.shape[0], u.shape[1], -1), dim=(0, 2))
    dn = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
    g = torch.where((un > 0) & (dn > 0), (dn / un.clamp_min(1e-30)).sqrt(), torch.ones_like(un))
    return (u * g.view(1, -1, *([1] * (u.dim() - 2))), d / g.view(-1, *([1] * (d.dim() - 1))))


def lora_state_dict(lora: Lora, key_format: str = "kohya", dtype: torch.dtype = torch.float16,
                    progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a LoRA file.  kohya: ``lora_unet_…``/``lora_te…`` names (layers without such a name
    are left out: see :func:`kohya_unnamed`); comfyui: ``diffusion_model.…``/``text_encoders.…``.  Layers
    on slices of one weight (a diffusers Flux LoRA's q/k/v of ``img_attn.qkv``) are written as one layer
    of the whole weight, the way kohya's own Flux files hold them.  ``progress(i, n)`` after each layer
    (it may raise to cancel)."""
    if key_format not in KEY_FORMATS:
        raise LoraError(f"unknown key format {key_format!r}; choose one of {', '.join(KEY_FORMATS)}")
    layers = _whole_weight_layers(lora)
    skip = set(kohya_unnamed(lora)) if key_format == "kohya" else set()

    def prefix_for(k: LayerKey) -> str:
        if key_format == "kohya" and k in lora.names:
            return lora.names[k]
        return comfy_name(k, lora.names)

    out: Dict[str, torch.Tensor] = {}
    owner: Dict[str, LayerKey] = {}

    def put(name: str, t: torch.Tensor, k: LayerKey, to: Optional[torch.dtype] = dtype):
        if name in out:
            raise LoraError(f"two layers would be written as '{name}' ({key_text(owner[name])} and {key_text(k)})")
        big = fp16_overflow(t) if to == torch.float16 else None
        if big is not None:
            raise LoraError(f"layer {key_text(k)} does not fit fp16 (largest |value| in '{name}' {big:.6g}, fp16 "
                            "holds up to 65504): save it with dtype bf16 or fp32")
        owner[name] = k
        out[name] = t.detach().to(device="cpu", dtype=to).contiguous()

    for i, (k, layer) in enumerate(layers.items()):
        if progress is not None:
            progress(i, len(layers))
        if k in skip:
            continue
        bk = base_key(k)
        dora = _native_dora(layer) if isinstance(k, str) else None
        if dora is not None:            # kept as DoRA (its factors and magnitude): it applies as loaded
            up, down, alpha, mid, scale = dora
            p = prefix_for(k)
            put(p + ".lora_up.weight", up, k)
            put(p + ".lora_down.weight", down, k)
            if mid is not None:
                put(p + ".lora_mid.weight", mid, k)
            put(p + ".alpha", torch.tensor(float(alpha if alpha is not None else down.shape[0])), k,
                to=torch.float32)
            put(p + ".dora_scale", scale, k)
            continue
        if layer.kind == "patch" and dora_scale(layer.patch) is not None:
            _refuse_dora(k, layer)
        if layer.kind == "patch":
            try:
                layer = LoraLayer.from_diff(layer.delta("cpu", torch.float32, k))
            except LoraError as e:
                raise LoraError(f"cannot save: {e}") from None
        if isinstance(k, str) and bk.endswith(".bias") and layer.kind == "diff":
            wk = bk[:-len(".bias")] + ".weight"
            put(prefix_for(wk) + ".diff_b", layer.diff, k)
            continue
        if isinstance(k, str) and not bk.endswith(".weight") and not bk.startswith(UNET_PREFIX):
            raise LoraError(f"cannot save a difference of text-encoder parameter {bk}: LoRA files only address "
                            "weights and biases")
        p = prefix_for(k)
        if layer.kind == "diff":
            put(p + ".diff", layer.diff, k)
            continue
        up, down = layer.up, layer.down
        if (dtype == torch.float16 and layer.mid is None and torch.float16 not in (up.dtype, down.dtype)
                and (_poor_in_fp16(up) or _poor_in_fp16(down))):     # (fp16 factors are kept bit for bit)
            up, down = _balanced(up, down)
        put(p + ".lora_up.weight", up, k)
        put(p + ".lora_down.weight", down, k)
        if layer.mid is not None:
            put(p + ".lora_mid.weight", layer.mid, k)
        alpha = layer.alpha if layer.alpha is not None else float(layer.rank)
        put(p + ".alpha", torch.tensor(float(alpha)), k, to=torch.float32)
    if not out:
        raise LoraError(f"none of the {len(layers)} layers of LoRA '{lora.name}' has a kohya name (lora_unet_…, "
                        "lora_te…): save it with key_format 'comfyui'")
    return out


def _refuse_dora(k: LayerKey, layer: LoraLayer) -> None:
    """Why a DoRA layer cannot be written as DoRA, and what to do instead."""
    if isinstance(k, tuple):
        why = f"a DoRA on part of the fused weight {base_key(k)}, which a file cannot hold as DoRA"
    elif layer.strength != 1.0:
        why = (f"a DoRA at strength {layer.strength:g} (LoRA Stack's or block weights'); a file holds a DoRA at "
               "strength 1 only")
    else:
        why = f"a {getattr(layer.patch, 'name', '?')} DoRA; only a LoRA DoRA (up/down factors) is written as DoRA"
    raise LoraError(f"cannot save layer {key_text(k)}: {why}. Resize LoRA makes it a plain LoRA of the rank you "
                    "choose (its difference on the model it was loaded with)")


def _native_dora(layer: LoraLayer):
    """``(up, down, alpha, mid, dora_scale)`` of a DoRA LoRA layer a file can hold as it is (at strength 1, on
    a whole weight, not reshaped), else None."""
    from comfy.weight_adapter import LoRAAdapter
    if layer.kind != "patch" or layer.strength != 1.0 or not isinstance(layer.patch, LoRAAdapter):
        return None
    up, down, alpha, mid, scale, reshape = layer.patch.weights
    if scale is None or reshape is not None:
        return None
    return up, down, alpha, mid, scale


def kohya_unnamed(lora: Lora) -> List[LayerKey]:
    """The layers a kohya-format file leaves out: those no kohya-style name exists for (token and position
    embeddings, SD3's pos_embed, norms...).  kohya, A1111 and Forge would skip them anyway, and diffusers
    refuses a whole file that mixes in other names; the comfyui format keeps them."""
    out = []
    for k in _file_layer_keys(lora):
        bk = base_key(k)
        named = k if not (isinstance(k, str) and bk.endswith(".bias")) else bk[:-len(".bias")] + ".weight"
        if named not in lora.names:
            out.append(k)
    return out


def left_out_warning(lora: Lora, key_format: str) -> Optional[str]:
    """What a file of ``key_format`` leaves out of ``lora`` (kohya: :func:`kohya_unnamed`), or None."""
    keys = kohya_unnamed(lora) if key_format == "kohya" else []
    if not keys:
        return None
    shown = ", ".join(key_text(k) for k in keys[:3]) + (f", ... (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    return (f"{len(keys)} layer(s) have no kohya name and are not in the kohya-format file ({shown}); "
            "key_format 'comfyui' keeps them (ComfyUI loads those files)")


def _file_layer_keys(lora: Lora) -> Dict[LayerKey, List[LayerKey]]:
    """The layers of a file, each with the LoRA's layers it is made of: one of its own, or, for a weight
    that layers address in slices (and maybe whole), where the weight's shape is known, all of them (in
    the order of the first)."""
    sliced = {k[0] for k in lora.layers if isinstance(k, tuple) and k[0] in lora.whole_shapes}
    sliced -= {k[0] for k in lora.layers if isinstance(k, tuple) and k[1][0] != 0}     # rows only
    out: Dict[LayerKey, List[LayerKey]] = {}
    for k in lora.layers:
        bk = base_key(k)
        out.setdefault(bk if bk in sliced else k, []).append(k)
    return out


def _whole_weight_layers(lora: Lora) -> Dict[LayerKey, LoraLayer]:
    """The layers of a file (see :func:`_file_layer_keys`): a weight's slices joined into one layer of the
    whole weight, the LoRA factors side by side (downs stacked, each up in its rows: ΔW is the same), or
    their summed difference when a part is not a plain linear LoRA."""
    return {k: lora.layers[parts[0]] if parts == [k] else
            _join_slices(lora.whole_shapes[base_key(k)], [(p, lora.layers[p]) for p in parts])
            for k, parts in _file_layer_keys(lora).items()}


def _rows(key: LayerKey, shape) -> Tuple[int, int]:
    return (key[1][1], key[1][2]) if isinstance(key, tuple) else (0, shape[0])


@torch.no_grad()
def _join_slices(shape: Tuple[int, ...], parts: List[Tuple[LayerKey, LoraLayer]]) -> LoraLayer:
    cpu = torch.device("cpu")
    if all(l.kind == "lora" and l.mid is None and len(l.shape) == 2 for _, l in parts) and len(shape) == 2:
        scales = {l.scale for _, l in parts}
        same = len(scales) == 1
        total = sum(l.rank for _, l in parts)
        dtype = parts[0][1].up.dtype
        for _, l in parts:              # the widest of the parts' dtypes (a stack may mix fp16 and fp32)
            dtype = torch.promote_types(torch.promote_types(dtype, l.up.dtype), l.down.dtype)
        up = torch.zeros(shape[0], total, dtype=torch.float32)
        downs, col = [], 0
        for k, l in parts:
            start, size = _rows(k, shape)
            u = l.up.reshape(l.up.shape[0], -1).float() if same else l.factors_2d(cpu)[0]
            up[start:start + size, col:col + l.rank] += u
            downs.append(l.down.reshape(l.rank, -1).float())
            col += l.rank
        alpha = (next(iter(scales)) if same else 1.0) * total
        return LoraLayer("lora", tuple(shape), up=up.to(dtype), down=torch.cat(downs).to(dtype), alpha=alpha)
    diff = torch.zeros(shape, dtype=torch.float32)
    for k, l in parts:
        if l.kind == "patch" and dora_scale(l.patch) is not None:
            _refuse_dora(k, l)      # its difference would hold only on the model it was loaded with
        start, size = _rows(k, shape)
        diff.narrow(0, start, size).add_(l.delta(cpu, torch.float32, k))
    return LoraLayer.from_diff(diff)


_BASE_VERSIONS = {"SD15": ("sd_v1", "stable-diffusion-v1"), "SD20": ("sd_v2", "stable-diffusion-v2-512"),
                  "SD21UnclipL": ("sd_v2", "stable-diffusion-v2-unclip"),
                  "SD21UnclipH": ("sd_v2", "stable-diffusion-v2-unclip"),
                  "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
                  "SDXLRefiner": ("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner"),
                  "SD3": ("sd3", "stable-diffusion-3-medium"), "Flux": ("flux1", "flux-1-dev"),
                  "FluxSchnell": ("flux1", "flux-1-schnell")}


def lora_metadata(lora: Lora, key_format: str, dtype_name: str, recipe: Optional[Any] = None) -> Dict[str, str]:
    """safetensors metadata: kohya's ``ss_*`` fields, a modelspec block and the recipe (JSON)."""
    def alpha(l) -> float:
        return float(l.alpha if l.alpha is not None else l.rank)

    # kohya: ss_network_dim / ss_network_alpha are the linear layers' (conv layers' only when there are no
    # linear ones); conv_dim / conv_alpha go into ss_network_args.  DoRA layers written as DoRA count as theirs.
    factored = [l for l in lora.layers.values() if l.kind == "lora"]
    for l in lora.layers.values():
        dora = _native_dora(l)
        if dora is not None:
            factored.append(LoraLayer("lora", l.shape, up=dora[0], down=dora[1],
                                      alpha=None if dora[2] is None else float(dora[2]), mid=dora[3]))
    conv = [l for l in factored if l.is_conv]
    lin = [l for l in factored if not l.is_conv]
    conv_ranks = sorted({l.rank for l in conv})
    lin_ranks = sorted({l.rank for l in lin})
    alphas = sorted({alpha(l) for l in (lin or conv)})
    cfg = str(lora.arch.get("model_config", ""))
    version, spec_arch = _BASE_VERSIONS.get(cfg, (cfg.lower() or "unknown", cfg or "unknown"))

    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _one_or_dynamic(lin_ranks or conv_ranks, num),
        "ss_network_alpha": _one_or_dynamic(alphas, num),
        "ss_base_model_version": version,
        "ss_v2": "True" if version == "sd_v2" else "False",
        "ss_output_name": lora.name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.title": lora.name,
        "mergelab.key_format": key_format,
        "mergelab.dtype": dtype_name,
        "mergelab.layers": str(len(lora.layers)),
    }
    args: Dict[str, str] = {}
    if conv_ranks:
        conv_alphas = sorted({alpha(l) for l in conv})
        args.update(conv_dim=_one_or_dynamic(conv_ranks, num), conv_alpha=_one_or_dynamic(conv_alphas, num))
    if any(_native_dora(l) is not None for k, l in lora.layers.items() if isinstance(k, str)):
        args["dora_wd"] = "True"            # as kohya / LyCORIS mark a DoRA network
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if recipe is not False:     # False: no recipe at all
        meta["mergelab.recipe"] = json.dumps(recipe if recipe is not None else lora.source, default=str)
    return meta


def _one_or_dynamic(values, num) -> str:
    values = sorted(set(values))
    if not values:
        return "0"
    return num(values[0]) if len(values) == 1 else "Dynamic"


def next_free_path(folder: str, filename: str, counter: int) -> str:
    while True:
        path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


def save_lora(lora: Lora, filename_prefix: str, output_dir: str, key_format: str = "kohya",
              dtype_name: str = "fp16", recipe: Optional[Any] = None,
              extra_metadata: Optional[Mapping[str, str]] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Write ``lora`` to ``output_dir/<prefix>_NNNNN_.safetensors`` (the next free counter), atomically:
    a temporary file in the same folder, then a no-replace link (or a checked ``os.replace``).
    Returns the path written.  Never overwrites a file; on any failure nothing is left behind.
    ``recipe``: the provenance to store (JSON-able), or a function of the file's path relative to
    ``output_dir`` giving it; None: the LoRA's own; False: none.  ``progress(i, n)`` per layer and once
    more before the file is written (it may raise to cancel: nothing is written)."""
    import folder_paths
    import safetensors.torch

    if dtype_name not in SAVE_DTYPES:
        raise LoraError(f"unknown dtype {dtype_name!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not lora.layers:
        raise LoraError(f"LoRA '{lora.name}' has no layers: nothing to save")
    sd = lora_state_dict(lora, key_format, SAVE_DTYPES[dtype_name], progress=progress)
    if progress is not None:
        progress(len(lora.layers), len(lora.layers))
    warning = left_out_warning(lora, key_format)
    if warning:
        log.warning("MergeLab: %s", warning)

    def metadata_for(path: str) -> Dict[str, str]:
        rec = recipe(os.path.relpath(path, output_dir).replace(os.sep, "/")) if callable(recipe) else recipe
        meta = lora_metadata(lora, key_format, dtype_name, rec)
        if extra_metadata:
            meta.update({str(k): str(v) for k, v in extra_metadata.items()})
        return meta

    try:
        folder, filename, counter, _sub, _pref = folder_paths.get_save_image_path(filename_prefix, output_dir)
    except Exception as e:
        if "outside the output folder" in str(e):
            raise LoraError(f"cannot save under '{filename_prefix}': it points outside the output folder") from None
        raise
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        written_for = None
        while True:
            path = next_free_path(folder, filename, counter)
            if path != written_for:         # the metadata (recipe) names the file it is in
                safetensors.torch.save_file(sd, tmp, metadata=metadata_for(path))
                written_for = path
            try:
                os.link(tmp, path)          # fails if the name was taken meanwhile
                os.unlink(tmp)
                return path
            except FileExistsError:
                counter += 1
                continue
            except OSError:                 # no hard links on this file system
                if os.path.exists(path):
                    counter += 1
                    continue
                os.replace(tmp, path)
                return path
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
