"""LoRA operations that factorize: extracting a difference LoRA from two models, resizing a LoRA's
rank, and merging LoRAs with any merge method.

Everything runs layer by layer on the compute device in fp32 (random sketches seeded per key, so
results are deterministic and device-independent), results are kept on the CPU, progress is
reported and Cancel is honoured between layers, and nothing is left on the GPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..merge_methods import MergeError, MergeMethod, key_seed
from .lora import (Lora, LoraError, LoraLayer, LayerKey, arch_of, base_key, dora_scale, key_text, merge_arch)
from .precision import full_fp32_matmul
from .weights import CLIP_OPTIONAL_SUFFIXES
from .lora_svd import (RankError, RankSpec, SVDOptions, as_matrix, check_clamp_quantile, factorize,
                       factorize_product, single_thread_if_small)

log = logging.getLogger("MergeLab")


# -- shared plumbing ---------------------------------------------------------------------------------

class _Progress:
    """ComfyUI progress bar + Cancel check, and an optional extra callback."""

    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]] = None):
        import comfy.utils
        self.total = max(int(total), 1)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.callback = callback

    def check(self):
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()

    def step(self):
        self.done += 1
        self.bar.update(1)
        if self.callback:
            self.callback(self.done, self.total)


def _device(choice: str) -> torch.device:
    from .merge import compute_device
    try:
        return compute_device(choice)
    except MergeError as e:
        raise LoraError(str(e)) from None


def _check_clamp(quantile: Optional[float]) -> None:
    try:
        check_clamp_quantile(quantile)
    except RankError as e:
        raise LoraError(str(e)) from None


def _release(device: torch.device) -> None:
    if device.type != "cpu":
        import comfy.model_management as mm
        mm.soft_empty_cache()


@dataclass
class LayerStat:
    key: LayerKey
    shape: Tuple[int, ...]
    kind: str
    rank: int = 0
    rel_error: float = 0.0
    norm: float = 0.0
    note: str = ""


def _fmt_shape(shape) -> str:
    return "×".join(str(s) for s in shape)


def _stats_text(stats: List[LayerStat], per_layer: bool = True) -> List[str]:
    lines: List[str] = []
    fact = [s for s in stats if s.kind == "lora"]
    if fact:
        errs = [s.rel_error for s in fact]
        worst = max(fact, key=lambda s: s.rel_error)
        tot = sum(s.norm ** 2 for s in fact)
        lost = sum((s.rel_error * s.norm) ** 2 for s in fact)
        kept = 100.0 * (1 - lost / tot) if tot > 0 else 100.0
        ranks = [s.rank for s in fact]
        lines.append(f"relative Frobenius error per layer: mean {sum(errs) / len(errs):.4f}, median "
                     f"{sorted(errs)[len(errs) // 2]:.4f}, max {worst.rel_error:.4f} ({key_text(worst.key)}); "
                     f"energy kept overall {kept:.3f} %")
        lines.append(f"ranks: min {min(ranks)}, mean {sum(ranks) / len(ranks):.1f}, max {max(ranks)}")
    if per_layer and stats:
        lines.append("")
        lines.append("layer | shape | kind | rank | rel. error | note")
        for s in stats:
            err = f"{s.rel_error:.5f}" if s.kind == "lora" else "0 (exact)"
            lines.append(f"{key_text(s.key)} | {_fmt_shape(s.shape)} | {s.kind} | {s.rank or '-'} | {err} | {s.note}")
    return lines


def _max_layer_rank(shapes: Sequence[Tuple[int, ...]]) -> int:
    best = 0
    for sh in shapes:
        if len(sh) >= 2:
            n = 1
            for d in sh[1:]:
                n *= d
            best = max(best, min(sh[0], n))
    return best


def _check_rank_fits(spec: RankSpec, shapes: Sequence[Tuple[int, ...]], what: str) -> None:
    biggest = _max_layer_rank(shapes)
    if biggest and spec.rank > biggest:
        raise LoraError(f"rank {spec.rank} is above the size of every {what} layer (the largest allows rank "
                        f"{biggest}); choose a rank of at most {biggest}")


# -- extraction --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractOptions:
    rank: RankSpec = RankSpec()
    svd: SVDOptions = SVDOptions()
    seed: int = 0
    clamp_quantile: Optional[float] = None   # None/1.0: off
    bias_diff: bool = False                  # also store differences of biases and 1-D weights (norms)
    conv: bool = True                        # LoCon: spatial convolutions (3×3) too
    min_diff: float = 1e-6                   # layers whose max |ΔW| is at most this are skipped
    device: str = "auto"

    def describe(self) -> str:
        svd = ("full SVD" if self.svd.method == "full" else
               f"randomized SVD (oversample {self.svd.oversample}, {self.svd.power_iters} power iterations, "
               f"seed {self.seed})")
        clamp = f", clamp quantile {self.clamp_quantile:g}" if self.clamp_quantile not in (None, 1.0) else ""
        return f"{self.rank.describe()}, {svd}{clamp}"

    def to_dict(self):
        return {"rank": self.rank.to_dict(), "svd": self.svd.to_dict(), "seed": self.seed,
                "clamp_quantile": self.clamp_quantile, "bias_diff": self.bias_diff, "conv": self.conv,
                "min_diff": self.min_diff}


def _pair_keys(tuned_src, base_src, what: str) -> List[str]:
    keys = base_src.keys()
    tkeys = set(tuned_src.keys())
    missing = [k for k in keys if k not in tkeys]
    extra = [k for k in tkeys if k not in set(keys)]
    bad = [k for k in keys if k in tkeys and tuned_src.shape(k) != base_src.shape(k)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of the base missing in the tuned {what} (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} key(s) of the tuned {what} not in the base (e.g. {extra[0]})")
        if bad:
            parts.append(f"{len(bad)} key(s) with other shapes (e.g. {bad[0]} {tuple(tuned_src.shape(bad[0]))} vs "
                         f"{tuple(base_src.shape(bad[0]))})")
        raise LoraError(f"the tuned and base {what} have different architectures: " + "; ".join(parts))
    return keys


@torch.no_grad()
@full_fp32_matmul()
def extract_lora(tuned_model=None, base_model=None, tuned_clip=None, base_clip=None,
                 opts: ExtractOptions = ExtractOptions(), name: str = "extracted",
                 progress: Optional[Callable[[int, int], None]] = None) -> Tuple[Lora, str]:
    """A LoRA with ``ΔW ≈ tuned − base`` for every layer (effective weights: the inputs' own LoRAs and
    merges count), factorized per layer by truncated SVD with the rank ``opts.rank`` chooses."""
    from .merge import check_architectures
    from .weights import KeySource
    from .lora_io import kohya_names

    pairs = []
    if (tuned_model is None) != (base_model is None):
        raise LoraError("connect both the tuned and the base MODEL (or neither)")
    if (tuned_clip is None) != (base_clip is None):
        raise LoraError("connect both the tuned and the base CLIP (or neither)")
    if tuned_model is not None:
        pairs.append(("MODEL", tuned_model, base_model))
    if tuned_clip is not None:
        pairs.append(("CLIP", tuned_clip, base_clip))
    if not pairs:
        raise LoraError("nothing to extract: connect a tuned and a base MODEL and/or CLIP")
    _check_clamp(opts.clamp_quantile)

    plans = []
    for what, tuned, base in pairs:
        try:
            check_architectures([base, tuned], [f"base {what}", f"tuned {what}"])
        except MergeError as e:
            raise LoraError(str(e)) from None
        ts, bs = KeySource.of(tuned), KeySource.of(base)
        keys = _pair_keys(ts, bs, what)
        plans.append((what, tuned, base, ts, bs, keys))
    mat_shapes = [tuple(bs.shape(k)) for _, _, _, _, bs, keys in plans for k in keys if len(bs.shape(k)) >= 2]
    _check_rank_fits(opts.rank, mat_shapes, "weight")

    device = _device(opts.device)
    total = sum(len(p[5]) for p in plans)
    prog = _Progress(total, progress)
    t0 = time.perf_counter()
    layers: Dict[LayerKey, LoraLayer] = {}
    stats: List[LayerStat] = []
    counts: Dict[str, Dict[str, int]] = {}
    clamp = opts.clamp_quantile if opts.clamp_quantile not in (None, 1.0) else None
    if device.type != "cpu":
        import comfy.model_management as mm
        biggest = max((bs.raw(k).numel() for _, _, _, _, bs, keys in plans for k in keys), default=0)
        mm.free_memory(biggest * 4 * 6, device)
    try:
        for what, tuned, base, ts, bs, keys in plans:
            c = counts.setdefault(what, {"lora": 0, "diff": 0, "negligible": 0, "not_extracted": 0, "capped": 0})
            for key in keys:
                prog.check()
                shape = tuple(bs.shape(key))
                is_matrix = len(shape) >= 2
                spatial = len(shape) > 2 and any(s > 1 for s in shape[2:])
                if (not is_matrix and not opts.bias_diff) or (spatial and not opts.conv):
                    c["not_extracted"] += 1
                    prog.step()
                    continue
                with single_thread_if_small(bs.raw(key).numel(), device):
                    kind = _extract_one(key, shape, is_matrix, ts, bs, device, opts, clamp, layers, stats, c)
                c[kind] += 1
                prog.step()
    finally:
        _release(device)
    elapsed = time.perf_counter() - t0
    if not layers:
        raise LoraError(f"the tuned and base models are identical within min_diff ({opts.min_diff:g}): no weight "
                        "differs by more, so there is nothing to extract (lower min_diff if they do differ)")

    # names and architecture
    model_pair = next((p for p in plans if p[0] == "MODEL"), None)
    clip_pair = next((p for p in plans if p[0] == "CLIP"), None)
    ref_model = model_pair[2] if model_pair else None
    ref_clip = clip_pair[2] if clip_pair else None
    arch = arch_of(ref_model, ref_clip)
    wkeys = set()
    for k in layers:
        wkeys.add(k)
        if k.endswith(".bias"):
            wkeys.add(k[:-len(".bias")] + ".weight")
    names = kohya_names(ref_model, ref_clip, wkeys, arch)
    src = {"kind": "extract", "name": name, "method": "svd", "options": opts.to_dict(),
           "inputs": _describe_inputs(plans)}
    lora = Lora.make(layers, names, arch, src)

    lines = [f"MergeLab LoRA extraction (tuned − base): {opts.describe()}",
             f"on {device.type}, {elapsed:.2f} s; {len(layers)} layers, {lora.numel() / 1e6:.2f} M values"]
    for what, c in counts.items():
        lines.append(f"{what}: {c['lora']} LoRA layers, {c['diff']} full differences, {c['negligible']} skipped "
                     f"as negligible (max |ΔW| ≤ {opts.min_diff:g}), {c['not_extracted']} not extracted "
                     f"({'biases/norms' if not opts.bias_diff else ''}{'' if opts.conv else ' 3×3 convs'})"
                     + (f", {c['capped']} smaller than the rank (stored at full rank, exact)" if c['capped'] else ""))
    lines += _stats_text(stats)
    return lora, "\n".join(lines)


def _extract_one(key, shape, is_matrix, ts, bs, device, opts: ExtractOptions, clamp, layers, stats, c) -> str:
    d = ts.read(key, device)
    d.sub_(bs.read(key, device))
    amax = float(d.abs().max()) if d.numel() else 0.0
    if not math.isfinite(amax) and key.endswith(CLIP_OPTIONAL_SUFFIXES):
        log.warning("MergeLab: %s not extracted: not finite in a model (a weight its checkpoint does not hold, "
                    "which ComfyUI leaves uninitialized)", key)
        return "not_extracted"
    if not math.isfinite(amax):
        raise LoraError(f"the difference of {key} contains NaN or Inf: one of the models is broken")
    if amax <= opts.min_diff:
        return "negligible"
    if is_matrix:
        f = factorize(as_matrix(d), opts.rank, opts.svd, seed=key_seed(opts.seed, key), clamp_quantile=clamp)
        layers[key] = LoraLayer.from_factors(shape, f.up.cpu(), f.down.cpu())
        c["capped"] += int(f.capped)
        stats.append(LayerStat(key, shape, "lora", f.rank, f.rel_error, f.norm,
                               "rank capped by layer size" if f.capped else ""))
        return "lora"
    layers[key] = LoraLayer.from_diff(d.to("cpu"))
    stats.append(LayerStat(key, shape, "diff", 0, 0.0, float(torch.linalg.norm(d)), "full difference"))
    return "diff"


def _describe_inputs(plans) -> Dict[str, Any]:
    """What is known about the extraction's inputs (their own merge recipes when engine.recipe exists)."""
    try:
        from .recipe import describe_source
    except Exception:   # noqa: BLE001 - optional module
        describe_source = None
    out: Dict[str, Any] = {}
    for what, tuned, base, *_ in plans:
        for role, obj in (("tuned", tuned), ("base", base)):
            label = f"{role}_{what.lower()}"
            if describe_source is not None:
                try:
                    out[label] = describe_source(obj)
                    continue
                except Exception:   # noqa: BLE001
                    pass
            from .weights import model_family
            out[label] = {"family": model_family(obj)}
    return out


# -- resize -------------------------------------------------------------------------------------------

@torch.no_grad()
@full_fp32_matmul()
def resize_lora(lora: Lora, spec: RankSpec, device: str = "auto", clamp_quantile: Optional[float] = None,
                svd: SVDOptions = SVDOptions(), seed: int = 0, name: Optional[str] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> Tuple[Lora, str]:
    """The LoRA at a new rank, keeping its effective strength: each layer's ``scale·up@down`` is
    re-factorized exactly (QR of the factors + SVD of the small core) and truncated; the new alpha is
    ``old scale × new rank`` so alpha/rank, and so the strength, stay the same."""
    _check_clamp(clamp_quantile)
    if not lora.layers:
        raise LoraError(f"LoRA '{lora.name}' has no layers")
    # refused only when it would change nothing: LoRA layers (which keep a rank at or below the target)
    # and 1-D differences; LoHa/LoKr and full differences are factorized to the rank whatever it is
    lora_layers = [l for l in lora.layers.values() if l.kind == "lora"]
    to_factorize = [l for l in lora.layers.values() if l.kind == "patch" or (l.kind == "diff" and len(l.shape) >= 2)]
    if spec.mode == "fixed" and lora_layers and not to_factorize and clamp_quantile is None:
        top = max(l.rank for l in lora_layers)
        if spec.rank > top:
            raise LoraError(f"cannot resize LoRA '{lora.name}' to rank {spec.rank}: its largest rank is {top}, and "
                            "a larger rank adds nothing; choose a rank of at most " + str(top))
    dev = _device(device)
    prog = _Progress(len(lora.layers), progress)
    t0 = time.perf_counter()
    out: Dict[LayerKey, LoraLayer] = {}
    stats: List[LayerStat] = []
    try:
        for k, layer in lora.layers.items():
            prog.check()
            with single_thread_if_small(_numel(layer.shape), dev):
                _resize_one(k, layer, spec, svd, seed, clamp_quantile, dev, out, stats)
            prog.step()
    finally:
        _release(dev)
    src = {"kind": "resize", "name": name or f"{lora.name}_resized", "rank": spec.to_dict(),
           "clamp_quantile": clamp_quantile, "input": lora.source}
    new_lora = Lora.make(out, lora.names, lora.arch, src, lora.whole_shapes)
    lines = [f"MergeLab LoRA resize of '{lora.name}': {spec.describe()} (exact SVD of each layer's factors), "
             f"{time.perf_counter() - t0:.2f} s; {lora.numel() / 1e6:.2f} M → {new_lora.numel() / 1e6:.2f} M values"]
    lines += _stats_text(stats)
    return new_lora, "\n".join(lines)


DORA_NOTE = "DoRA: its difference on the model it was loaded with"


def _resize_one(k, layer, spec, svd, seed, clamp_quantile, dev, out, stats) -> None:
    if layer.kind == "diff" and len(layer.shape) < 2:
        out[k] = layer                                      # a bias or norm difference: nothing to factorize
        stats.append(LayerStat(k, layer.shape, "diff", note="kept"))
        return
    if layer.kind in ("diff", "patch"):
        # a full difference (one a LoRA file holds, or LoRA Stack's sum of a LoHa/LoKr with others) or an
        # opaque patch: its ΔW is factorized to the rank like any other layer
        what = "factorized diff" if layer.kind == "diff" else \
            DORA_NOTE if dora_scale(layer.patch) is not None else "converted patch"
        delta = layer.delta(dev, torch.float32, k)
        if delta.dim() < 2:
            out[k] = LoraLayer.from_diff(delta.cpu())
            stats.append(LayerStat(k, layer.shape, "diff", note=what))
        else:
            f = factorize(as_matrix(delta), spec, svd, seed=key_seed(seed, key_text(k)),
                          clamp_quantile=clamp_quantile)
            out[k] = LoraLayer.from_factors(layer.shape, f.up.cpu(), f.down.cpu())
            stats.append(LayerStat(k, layer.shape, "lora", f.rank, f.rel_error, f.norm, what))
        return
    if spec.mode == "fixed" and layer.rank <= spec.rank and clamp_quantile is None:
        out[k] = layer
        stats.append(LayerStat(k, layer.shape, "lora", layer.rank, 0.0, 0.0, "kept (rank ≤ target)"))
        return
    u, d = layer.factors_2d(dev, torch.float32)          # scale folded into u
    scale = layer.scale
    f = factorize_product(u, d, spec, clamp_quantile)
    if scale > 0 and scale != 1.0:
        root = math.sqrt(scale)
        new = LoraLayer.from_factors(layer.shape, (f.up / root).cpu(), (f.down / root).cpu(),
                                     alpha=scale * f.rank)
    else:
        new = LoraLayer.from_factors(layer.shape, f.up.cpu(), f.down.cpu())
    out[k] = new
    stats.append(LayerStat(k, layer.shape, "lora", f.rank, f.rel_error, f.norm,
                           f"from rank {layer.rank}"))


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


# -- merge --------------------------------------------------------------------------------------------

@dataclass
class LoraMergeInput:
    lora: Lora
    params: Dict[str, Any] = field(default_factory=dict)
    name: str = ""


def linear_coefficients(method: MergeMethod, per_model: Mapping[str, List[Any]], n: int) -> Optional[List[float]]:
    """cᵢ with ``method(0, ΔW…) = Σ cᵢ·ΔWᵢ`` for the methods that are linear in the models (with a zero
    base), checked against the method itself on a random probe; None for every other method."""
    name = method.name
    try:
        if name == "linear":
            w = [float(x) for x in per_model["weight"]]
            if method.get("normalize"):
                tot = sum(w)
                if abs(tot) >= 1e-8:
                    w = [x / tot for x in w]
            coeffs = w
        elif name == "task_arithmetic":
            w = [float(x) for x in per_model["weight"]]
            if method.get("normalize"):
                tot = sum(w)
                if abs(tot) >= 1e-8:
                    w = [x / tot for x in w]
            lam = float(method.get("lambda"))
            coeffs = [lam * x for x in w]
        elif name == "passthrough":
            coeffs = [float(per_model["scale"][0])]
        elif name == "weighted_sum":
            r = float(method.get("ratio"))
            coeffs = [r, 1.0 - r]
        else:
            return None
    except (KeyError, IndexError, TypeError):
        return None
    if len(coeffs) != n:
        return None
    # the method itself must agree (guards against a changed formula)
    gen = torch.Generator().manual_seed(12345)
    probe = [torch.randn(3, 5, generator=gen, dtype=torch.float64).float() for _ in range(n)]
    base = torch.zeros(3, 5) if method.spec.base == "required" else None
    try:
        got = method.merge(base, probe, key="probe", seed=0, **per_model)
    except MergeError:
        return None
    want = sum(c * p for c, p in zip(coeffs, probe))
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        log.debug("MergeLab: %s is not the expected linear combination; using the ΔW path", name)
        return None
    return coeffs


def base_dependence(method: MergeMethod, per_model: Mapping[str, List[Any]], n: int) -> Optional[float]:
    """How far ``method`` on differences against a zero base (what a LoRA merge computes) is from the
    method on the models (base B, models B + ΔWᵢ, minus B), relative, on a random probe: about 0 for
    the task-vector methods, large for those that look at the weights themselves (slerp: sin(tπ/2)·ΔW for
    t·ΔW).  None when the probe cannot run."""
    gen = torch.Generator().manual_seed(2024)
    deltas = [0.1 * torch.randn(8, 16, generator=gen, dtype=torch.float64).float() for _ in range(n)]
    b = torch.randn(8, 16, generator=gen, dtype=torch.float64).float()
    zero = torch.zeros_like(b)
    try:
        if method.spec.base == "none":
            on_deltas = method.merge(None, deltas, key="probe", seed=0, **per_model)
            on_models = method.merge(None, [b + d for d in deltas], key="probe", seed=0, **per_model) - b
        else:
            on_deltas = method.merge(zero, deltas, key="probe", seed=0, **per_model)
            on_models = method.merge(b, [b + d for d in deltas], key="probe", seed=0, **per_model) - b
    except (MergeError, ValueError, RuntimeError):
        return None
    scale = max(float(torch.linalg.norm(on_models)), float(torch.linalg.norm(on_deltas)), 1e-12)
    return float(torch.linalg.norm(on_deltas - on_models)) / scale


@torch.no_grad()
@full_fp32_matmul()
def merge_loras(inputs: Sequence[LoraMergeInput], method: MergeMethod, spec: RankSpec,
                svd: SVDOptions = SVDOptions(), seed: int = 0, device: str = "auto",
                clamp_quantile: Optional[float] = None, name: str = "merged",
                progress: Optional[Callable[[int, int], None]] = None) -> Tuple[Lora, str]:
    """Merge LoRAs with ``method`` layer by layer on their full differences ΔWᵢ (a zero base for
    methods that need one), then factorize each result to the rank ``spec`` chooses.

    Methods linear in the models (linear, task_arithmetic, passthrough, weighted_sum) are computed
    exactly on the factors: concatenated when the summed rank fits the output rank, else re-factorized by
    an exact SVD of the concatenated factors (no full ΔW needed)."""
    _check_clamp(clamp_quantile)
    from .merge import MergeInput, resolve_params

    inputs = list(inputs)
    ms = method.spec
    n = len(inputs)
    if n < ms.min_models or (ms.max_models is not None and n > ms.max_models):
        raise LoraError(f"merge method '{method.name}' takes {ms.models_text()} LoRA(s), got {n}")
    names = [i.name or i.lora.name or f"lora {j + 1}" for j, i in enumerate(inputs)]
    arch = merge_arch([i.lora.arch for i in inputs], names)
    m, per_model = resolve_params(method, [MergeInput(i.lora, i.params, nm) for i, nm in zip(inputs, names)], {})
    try:
        per_model = m.per_model_values(n, per_model)
    except MergeError as e:
        raise LoraError(str(e)) from None
    coeffs = linear_coefficients(m, per_model, n)

    keys: List[LayerKey] = []
    seen = set()
    shapes: Dict[LayerKey, Tuple[int, ...]] = {}
    for i in inputs:
        for k, l in i.lora.layers.items():
            if k not in seen:
                seen.add(k)
                keys.append(k)
                shapes[k] = tuple(l.shape)
            elif tuple(l.shape) != shapes[k]:
                raise LoraError(f"layer {key_text(k)} has shape {tuple(l.shape)} in one LoRA and {shapes[k]} in another: "
                                "the LoRAs were made for different architectures")
    whole: Dict[str, Dict[int, List[LayerKey]]] = {}
    if coeffs is None:
        keys, shapes, whole = _whole_weight_groups(inputs, keys, shapes)
    if spec.mode == "fixed":
        _check_rank_fits(spec, [shapes[k] for k in keys], "LoRA")
    dev = _device(device)
    prog = _Progress(len(keys), progress)
    t0 = time.perf_counter()
    out: Dict[LayerKey, LoraLayer] = {}
    stats: List[LayerStat] = []
    dropped = 0
    base_needed = ms.base == "required"
    try:
        for key in keys:
            prog.check()
            with single_thread_if_small(_numel(shapes[key]), dev):
                layer, st = _merge_one(key, shapes[key], inputs, m, per_model, coeffs, spec, svd, seed, dev,
                                       clamp_quantile, base_needed, whole.get(key))
            if layer is None:
                dropped += 1
            else:
                out[key] = layer
                stats.append(st)
            prog.step()
    finally:
        _release(dev)
    if not out:
        raise LoraError(f"merging with '{method.name}' left every layer zero: nothing to keep")
    lnames: Dict[LayerKey, str] = {}
    whole_shapes: Dict[str, Tuple[int, ...]] = {}
    for i in inputs:
        for k, nm in i.lora.names.items():
            lnames.setdefault(k, nm)
        whole_shapes.update(i.lora.whole_shapes)
    src = {"kind": "merge", "name": name, "method": m.to_dict(), "per_model": per_model, "seed": seed,
           "rank": spec.to_dict(), "svd": svd.to_dict(), "clamp_quantile": clamp_quantile,
           "inputs": [{"name": nm, "params": dict(i.params), "lora": i.lora.source} for i, nm in zip(inputs, names)]}
    merged_lora = Lora.make(out, lnames, arch, src, whole_shapes)
    path = ("linear in the models: exact on LoRA factors, other layers' ΔW factorized" if coeffs is not None
            else "on each layer's full ΔW")
    lines = [f"MergeLab LoRA merge: {method!r} of {n} LoRA(s), {path}; {spec.describe()}; "
             f"{time.perf_counter() - t0:.2f} s on {dev.type}",
             f"{len(out)} layers ({dropped} all-zero after merging, dropped); "
             f"{merged_lora.numel() / 1e6:.2f} M values"]
    gap = None if coeffs is not None else base_dependence(m, per_model, n)
    if gap is not None and gap > 1e-2:
        note = (f"note: {method.name} looks at the weights themselves, not only at their differences from a base: "
                f"on LoRA differences (against a zero base) it gives something else than on the models (off by "
                f"{gap:.0%} on a probe; slerp of one LoRA at t gives sin(tπ/2)·ΔW, not about t·ΔW). For model-like "
                "results use a task-vector method (linear, task_arithmetic, ties, dare, ...)")
        log.warning("MergeLab: %s", note)
        lines.append(note)
    lines += _stats_text(stats)
    return merged_lora, "\n".join(lines)


def _whole_weight_groups(inputs, keys: List[LayerKey], shapes: Dict[LayerKey, Tuple[int, ...]]):
    """For the ΔW path: the weights that the LoRAs address under different key forms (one as slices of a
    fused weight, e.g. a diffusers Flux LoRA's q/k/v of ``img_attn.qkv``, another with the fused key) are
    merged on the whole weight's ΔW, not slice by slice against zeros (which a non-linear method gets
    wrong).  Returns the keys (such a weight once, as its plain key), their shapes, and per such weight the
    layer keys of each input that fill it."""
    per_weight: Dict[str, List[LayerKey]] = {}
    for k in keys:
        per_weight.setdefault(base_key(k), []).append(k)
    whole: Dict[str, Dict[int, List[LayerKey]]] = {}
    shapes = dict(shapes)
    for w, ks in per_weight.items():
        forms = {frozenset(k for k in ks if k in i.lora.layers) for i in inputs} - {frozenset()}
        if len(forms) <= 1:
            continue
        if w not in shapes:     # the whole weight's shape, as a LoRA loaded from a file knows it
            shapes.update({w: i.lora.whole_shapes[w] for i in inputs if w in i.lora.whole_shapes})
        if w not in shapes:
            raise LoraError(f"the LoRAs address {w} in different slices and none of them covers it whole, so it "
                            "cannot be merged with a non-linear method; use linear, task arithmetic or "
                            "passthrough")
        whole[w] = {j: [k for k in ks if k in i.lora.layers] for j, i in enumerate(inputs)}
    if not whole:
        return keys, shapes, whole
    out_keys: List[LayerKey] = []
    for k in keys:
        w = base_key(k)
        if w not in whole:
            out_keys.append(k)
        elif w not in out_keys:
            out_keys.append(w)
    return out_keys, {k: shapes[k] for k in out_keys}, whole


def _input_delta(inp, key: LayerKey, shape, dev, parts: Optional[List[LayerKey]]) -> Optional[torch.Tensor]:
    """One input's ΔW for ``key`` (None when it has none); ``parts``: the layer keys that fill a whole weight
    (slices placed where they belong, see :func:`_whole_weight_groups`)."""
    if parts is None:
        l = inp.lora.layers.get(key)
        return None if l is None else l.delta(dev, torch.float32, key)
    if not parts:
        return None
    total = torch.zeros(shape, device=dev, dtype=torch.float32)
    for k in parts:
        d = inp.lora.layers[k].delta(dev, torch.float32, k)
        if isinstance(k, tuple):
            dim, offset, size = k[1]
            total.narrow(dim, offset, size).add_(d)
        else:
            total.add_(d)
    return total


def _merge_one(key, shape, inputs, m, per_model, coeffs, spec, svd, seed, dev, clamp_quantile, base_needed,
               whole: Optional[Dict[int, List[LayerKey]]] = None):
    n = len(inputs)
    if whole is None:
        present = [(j, inp.lora.layers[key]) for j, inp in enumerate(inputs) if key in inp.lora.layers]
    else:
        present = [(j, inputs[j].lora.layers[k]) for j in range(n) for k in whole[j]]
    layer, st = None, None
    if coeffs is not None:
        layer, st = _linear_layer(key, shape, [(l, coeffs[j]) for j, l in present], spec, svd, seed, dev,
                                  clamp_quantile)
    else:
        deltas = []
        for j in range(n):
            d = _input_delta(inputs[j], key, shape, dev, None if whole is None else whole[j])
            deltas.append(d if d is not None else torch.zeros(shape, device=dev, dtype=torch.float32))
        base = torch.zeros(shape, device=dev, dtype=torch.float32) if base_needed else None
        try:
            merged = m.merge(base, deltas, key=key_text(key), seed=seed, **per_model)
        except MergeError as e:
            raise LoraError(str(e)) from None
        del deltas, base
        if not bool(merged.abs().max() > 0):
            layer = None
        elif len(shape) >= 2 and any(l.kind != "diff" for _, l in present):
            f = factorize(as_matrix(merged), spec, svd, seed=key_seed(seed, key_text(key)),
                          clamp_quantile=clamp_quantile)
            layer = LoraLayer.from_factors(shape, f.up.cpu(), f.down.cpu())
            st = LayerStat(key, shape, "lora", f.rank, f.rel_error, f.norm)
        else:
            layer = LoraLayer.from_diff(merged.cpu())
            st = LayerStat(key, shape, "diff")
        del merged
    if st is not None and any(l.kind == "patch" and dora_scale(l.patch) is not None for _, l in present):
        st = replace(st, note=(st.note + "; " if st.note else "") + DORA_NOTE)
    return layer, st


def _linear_layer(key, shape, parts: Sequence[Tuple[LoraLayer, float]], spec: RankSpec, svd: SVDOptions, seed: int,
                  dev, clamp):
    parts = [(l, c) for l, c in parts if c != 0.0]
    if not parts:
        return None, None
    kinds = {l.kind for l, _ in parts}
    if kinds == {"lora"}:
        ups, downs = [], []
        for l, c in parts:
            u, d = l.factors_2d(dev, torch.float32)
            ups.append(u * c)
            downs.append(d)
        up = torch.cat(ups, 1)
        down = torch.cat(downs, 0)
        total_rank = up.shape[1]
        if spec.mode == "fixed" and total_rank <= spec.rank and clamp is None:
            layer = LoraLayer.from_factors(shape, up.cpu(), down.cpu())
            return layer, LayerStat(key, shape, "lora", total_rank, 0.0, 0.0, "exact (factors concatenated)")
        f = factorize_product(up, down, spec, clamp)
        layer = LoraLayer.from_factors(shape, f.up.cpu(), f.down.cpu())
        return layer, LayerStat(key, shape, "lora", f.rank, f.rel_error, f.norm,
                                f"exact SVD of the concatenated rank-{total_rank} factors")
    total = None
    for l, c in parts:
        d = l.delta(dev, torch.float32, key) * c
        total = d if total is None else total.add_(d)
    if len(shape) >= 2 and kinds != {"diff"}:     # as on the ΔW path: low-rank inputs give a low-rank layer
        f = factorize(as_matrix(total), spec, svd, seed=key_seed(seed, key_text(key)), clamp_quantile=clamp)
        return (LoraLayer.from_factors(shape, f.up.cpu(), f.down.cpu()),
                LayerStat(key, shape, "lora", f.rank, f.rel_error, f.norm))
    return LoraLayer.from_diff(total.cpu()), LayerStat(key, shape, "diff")
