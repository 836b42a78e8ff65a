"""What a merged model does not take over from its inputs.

A merge returns a clone of its reference model (the base, or model 1 without one) with merged weights.
Everything else the reference carries stays; what the other inputs carry beside their weights does not
become part of the result: a prediction type (v-prediction against eps), a ModelSampling* patch, the
sampling patches in ``model_options`` (FreeU, PAG, CFG functions, attention patches), a CLIP's last
layer or tokenizer options, and CLIP hooks (SetClipHooks), which are applied at encode time and are not
part of the weights.  :func:`settings_not_kept` lists them, so that a merge can say so instead of
dropping them silently.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, List, Sequence, Tuple

from .recipe import RECIPE_KEY
from .weights import is_clip, patcher_of


def settings_not_kept(ref: Any, ref_name: str, others: Sequence[Tuple[Any, str]]) -> List[str]:
    """One line per input whose settings differ from the reference's in a way the result does not keep."""
    ref_feats = _features(ref, own=True)
    out = []
    for obj, name in others:
        if obj is ref:
            continue
        lost = list((Counter(_features(obj)) - Counter(ref_feats)).elements())
        if lost:
            out.append(f"{name}'s {'; '.join(dict.fromkeys(lost))}: not in the result, which keeps {ref_name}'s "
                       f"settings (only {name}'s weights are merged)")
    return out


def _features(obj, own: bool = False) -> List[str]:
    """``own``: the reference's, with its model sampling and CLIP layer even when they are the checkpoint's
    own (an input's are listed only when a node set them: its own follow from its prediction type)."""
    return _clip_features(obj, own) if is_clip(obj) else _model_features(obj, own)


def _model_features(mp, own: bool) -> List[str]:
    feats = []
    model_type = getattr(getattr(mp.model, "model_type", None), "name", None)
    if model_type is not None:
        feats.append(f"prediction type {model_type}")
    if own or "model_sampling" in mp.object_patches:
        try:
            feats.append(f"model sampling {_sampling_text(mp.get_model_object('model_sampling'))}")
        except Exception:
            pass
    for key, value in sorted(mp.object_patches.items()):
        if key != "model_sampling":
            feats.append(f"object patch {key} ({_name_of(value)})")
    options = {k: v for k, v in (mp.model_options or {}).items() if k != RECIPE_KEY}
    feats += [f"sampling option {path} ({what})" for path, what in _walk(options, "")]
    return feats


def _clip_features(clip, own: bool) -> List[str]:
    feats = []
    if clip.layer_idx is not None and (own or not _is_default_layer(clip)):
        feats.append(f"CLIP layer {clip.layer_idx}")
    elif own:
        feats.append("CLIP layer (the checkpoint's own)")
    feats += [f"tokenizer option {k}={v!r}" for k, v in sorted((clip.tokenizer_options or {}).items())]
    mp = patcher_of(clip)
    hooks = getattr(getattr(mp, "forced_hooks", None), "hooks", None) or []
    feats += [f"CLIP hook {type(h).__name__} (SetClipHooks; applied when encoding, not part of the weights)"
              for h in hooks]
    options = {k: v for k, v in (mp.model_options or {}).items() if k != RECIPE_KEY}
    feats += [f"option {path} ({what})" for path, what in _walk(options, "")]
    return feats


def _is_default_layer(clip) -> bool:
    """Whether the CLIP's last layer setting encodes as the checkpoint's own does: CLIPSetLastLayer -1 on
    an SD1.5 CLIP (whose text encoder outputs its last layer) changes nothing; on SDXL (which outputs
    the penultimate one) it does."""
    encoders = [m for m in clip.cond_stage_model.modules()
                if hasattr(m, "options_default") and hasattr(m, "num_layers") and hasattr(m, "layer")]
    return bool(encoders) and all(_layer_output(m, clip.layer_idx) == _layer_output(m, None) for m in encoders)


def _layer_output(encoder, layer_idx):
    """Which output an encoder gives with ``layer_idx`` (ComfyUI's set_clip_options, without setting it):
    the last hidden layer after the final norm is the same output as "last"."""
    layer, idx = encoder.options_default[:2]
    if layer_idx is not None and not (isinstance(layer, list) or layer == "all"):
        layer, idx = ("last", None) if abs(layer_idx) > encoder.num_layers else ("hidden", layer_idx)
    if (layer == "hidden" and idx in (-1, encoder.num_layers - 1)
            and getattr(encoder, "layer_norm_hidden_state", False)):
        return ("last", None)
    return (layer, idx) if layer == "hidden" else (str(layer), None)


def _sampling_text(ms) -> str:
    figures = []
    for attr in ("sigma_min", "sigma_max", "shift", "multiplier"):
        v = getattr(ms, attr, None)
        if v is None:
            continue
        try:
            figures.append(f"{attr} {float(v):.4g}")
        except (TypeError, ValueError):
            pass
    return type(ms).__name__ + (f" ({', '.join(figures)})" if figures else "")


def _walk(value, path: str, seen=None) -> Iterable[Tuple[str, str]]:
    """(path, what) for every function, object or plain value in ``model_options`` (nested dicts and
    lists, each container once: deep copies keep cycles); callables are named by their qualified name,
    since clones hold deep copies of them."""
    if isinstance(value, (dict, list, tuple)):
        seen = set() if seen is None else seen
        if id(value) in seen:
            return
        seen.add(id(value))
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _walk(value[k], f"{path}.{k}" if path else str(k), seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v, path, seen)
    elif value is not None:
        yield path, _name_of(value)


def _name_of(value) -> str:
    if isinstance(value, (bool, int, float, str)):
        return repr(value)[:40]
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return name.replace(".<locals>", "")
