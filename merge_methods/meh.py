"""supermerger's calc modes and the methods meh (sd-meh, sd-webui-bayesian-merger) adds to them.

supermerger's ``Triple sum`` and ``sum Twice`` take three models (A, B, C). meh's ``weighted_subtraction``
and ``top_k_tensor_sum`` take two; its add-difference family (``euclidean_add_difference``,
``multiply_difference``, ``similarity_add_difference``, ``distribution_crossover``, ``ties_add_difference``)
takes A and B and C as the base, the model both were made from. alpha and beta are meh's: alpha is B's weight
where a weight is meant (alpha 1 = B), the opposite of ComfyUI's ratio (``weighted_sum``).
``top_k_tensor_sum`` names them width and offset, as sd-mecha (which has it too) and ``tensor_sum`` do.
"""
from __future__ import annotations

import torch

from .ops import kth_smallest, pow2_scale, ratio_to_region, sumsq
from .spec import BASE_NONE, BASE_REQUIRED, FLOAT, Param, merge_method

_FILTER_SHARPNESS_EPS = 1e-10      # meh: a beta at or below it makes distribution_crossover's cut a step


def _alpha(default, help, lo=-1.0, hi=2.0):
    return Param("alpha", FLOAT, default, help, min=lo, max=hi, step=0.01)


def _beta(default, help, lo=-1.0, hi=2.0):
    return Param("beta", FLOAT, default, help, min=lo, max=hi, step=0.01)


# ============================================================================== supermerger's three-model sums
@merge_method(
    "triple_sum", base=BASE_NONE, min_models=3, max_models=3, source="supermerger / meh", elementwise=True,
    help="supermerger's Triple sum: (1 − alpha − beta)·A + alpha·B + beta·C for the models A, B, C (in order). "
         "alpha = beta = 0 returns A, alpha 1 (beta 0) B, beta 1 (alpha 0) C.",
    params=(_alpha(1 / 3, "Weight of model B."), _beta(1 / 3, "Weight of model C.")),
)
def triple_sum(base, models, ctx, *, alpha, beta):
    a, b, c = models[0], models[1], models[2]
    return (a * (1.0 - alpha - beta)).add_(b, alpha=alpha).add_(c, alpha=beta)


@merge_method(
    "sum_twice", base=BASE_NONE, min_models=3, max_models=3, source="supermerger / meh", elementwise=True,
    help="supermerger's sum Twice: a weighted sum of A and B, then of that and C: "
         "(1 − beta)·((1 − alpha)·A + alpha·B) + beta·C for the models A, B, C (in order). alpha = beta = 0 "
         "returns A, alpha 1 (beta 0) B, beta 1 C.",
    params=(_alpha(0.5, "Weight of B in the first sum (A + B)."),
            _beta(0.25, "Weight of C in the second sum (the first sum + C).")),
)
def sum_twice(base, models, ctx, *, alpha, beta):
    a, b, c = models[0], models[1], models[2]
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


# ============================================================================== meh
def _check_subtraction(glob, per_model):
    gap = 1.0 - glob["alpha"] * glob["beta"]
    if abs(gap) < 1e-6:
        return (f"weighted_subtraction divides by 1 − alpha·beta, which is {gap:.3g} for alpha = {glob['alpha']}, "
                f"beta = {glob['beta']}: within 1e-6 of 0 (weights of 1e6 and more); keep alpha·beta away from 1")
    return None


@merge_method(
    "weighted_subtraction", base=BASE_NONE, min_models=2, max_models=2, source="meh", elementwise=True,
    help="meh's weighted_subtraction: (A − alpha·beta·B) / (1 − alpha·beta): A with alpha·beta of B taken out and "
         "the rest rescaled, the inverse of a weighted sum (if A = (1 − w)·X + w·B with w = alpha·beta, the result "
         "is X). alpha·beta within 1e-6 of 1 is an error (a division by about 0; meh nudges beta at alpha = beta = 1, "
         "giving weights of 1e10). Models: A (first), B (second).",
    params=(_alpha(0.5, "With beta, the share of B to take out of A (alpha·beta).", lo=-1.0, hi=1.0),
            _beta(0.5, "With alpha, the share of B to take out of A (alpha·beta).", lo=-1.0, hi=1.0)),
    check=_check_subtraction,
)
def weighted_subtraction(base, models, ctx, *, alpha, beta):
    a, b = models[0], models[1]
    w = float(alpha) * float(beta)
    return torch.add(a, b, alpha=-w).div_(1.0 - w)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ over the whole tensor, in place (x is a temporary); zeros for a zero tensor. The norm is taken
    of x scaled by a power of two (exact), so that huge or tiny differences neither overflow nor vanish."""
    x.div_(pow2_scale(x))
    norm = sumsq(x).sqrt()
    return x.div_(norm.to(x.dtype)) if bool(norm > 0) else x


def _norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ as a 0-d tensor of x's dtype, without overflow or underflow (see _unit)."""
    scale = pow2_scale(x)
    return (sumsq(x / scale).sqrt() * scale.double()).to(x.dtype)


@merge_method(
    "euclidean_add_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="meh",
    help="meh's euclidean_add_difference: the differences A − C and B − C are normalized (each to norm 1), "
         "combined per element as √((1 − alpha)·a² + alpha·b²) with the sign of the weighted-sum difference "
         "S = (1 − alpha)·A + alpha·B − C (+ where S is 0), and the result rescaled to S's norm: "
         "out = C + ‖S‖·d/‖d‖. It adds the weighted sum's difference with its per-element magnitudes "
         "redistributed toward the larger of the two changes. Models: A (first), B (second); base: C. Where both "
         "differences are 0 the result is C (meh: NaN).",
    params=(_alpha(0.5, "Weight of B's (normalized) difference; 0: A's alone, 1: B's alone.", lo=0.0, hi=1.0),),
)
def euclidean_add_difference(base, models, ctx, *, alpha):
    a, b, c = models[0], models[1], base
    a_unit, b_unit = _unit(a - c), _unit(b - c)
    distance = (a_unit.square_().mul_(1.0 - alpha)).add_(b_unit.square_(), alpha=alpha).sqrt_()
    del a_unit, b_unit
    target = torch.lerp(a, b, alpha).sub_(c)
    distance = distance.copysign_(target)
    scale = _norm(target)
    del target
    return _unit(distance).mul_(scale).add_(c)


@merge_method(
    "multiply_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="meh", elementwise=True,
    help="meh's multiply_difference: per element the geometric mean of the two differences' magnitudes, "
         "|A − C|^(1 − alpha)·|B − C|^alpha, with the sign of (1 − beta)·A + beta·B − C (+ where that is 0), "
         "added to C. alpha 0 takes A's magnitudes, 1 B's; an element that only one model changed gets no change for "
         "0 < alpha < 1. Models: A (first), B (second); base: C.",
    params=(_alpha(0.5, "Exponent of B's difference magnitude (A's gets 1 − alpha).", lo=0.0, hi=1.0),
            _beta(0.5, "Weight of B in the weighted sum whose difference from C gives the sign.", lo=0.0, hi=1.0)),
)
def multiply_difference(base, models, ctx, *, alpha, beta):
    a, b, c = models[0], models[1], base
    magnitude = (a - c).abs_().pow_(1.0 - alpha).mul_((b - c).abs_().pow_(alpha))
    return magnitude.copysign_(torch.lerp(a, b, beta).sub_(c)).add_(c)


@merge_method(
    "similarity_add_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="meh",
    elementwise=True, result_is_model1=True,
    help="meh's similarity_add_difference: per element, a blend of the add difference A + alpha·(B − C) and the "
         "weighted sum (1 − alpha/2)·A + (alpha/2)·B, by how alike A and B are there: s = beta·(A·B/m² + 1)/2 "
         "with m = max(|A|, |B|) (s = beta for equal values and where both are 0, beta/2 for a zero against "
         "a non-zero, 0 for opposite values); out = (1 − s)·(add difference) + s·(weighted sum): the more alike A "
         "and B are, the more of the weighted sum (up to beta); where they disagree, B's trained difference is "
         "added. Models: A (first), "
         "B (second); base: C.",
    params=(_alpha(1.0, "Strength of B's difference (B − C) in the add difference, and twice B's weight in the "
                   "weighted sum."),
            _beta(0.5, "Scale of the similarity: 0 gives the add difference everywhere, 1 the full blend.",
                  lo=0.0, hi=1.0)),
)
def similarity_add_difference(base, models, ctx, *, alpha, beta):
    a, b, c = models[0], models[1], base
    peak = torch.maximum(a.abs(), b.abs())
    # (A/m)·(B/m) rather than meh's A·B/m²: the same value, without overflow or underflow at any magnitude
    similarity = (a / peak).mul_(b / peak).add_(1.0).mul_(0.5 * beta).nan_to_num_(nan=float(beta))
    del peak
    added = torch.sub(b, c).mul_(alpha).add_(a)
    summed = torch.lerp(a, b, 0.5 * alpha)
    return torch.lerp(added, summed, similarity)


@merge_method(
    "distribution_crossover", base=BASE_REQUIRED, min_models=2, max_models=2, source="meh",
    help="meh's distribution_crossover: the entries of A and B are put in the order of the base C's values "
         "(ascending; ties in flat order), both sequences go through a real FFT, the low frequencies (the "
         "smooth trend over C's value order) are taken from A and the high ones from B, and the result is put "
         "back in place. The cut is at the fraction alpha of the spectrum: a step for beta = 0, else a ramp "
         "of width beta centred on alpha (so with beta > 0 even alpha 1 or 0 mixes in beta/2 of the spectrum's "
         "end). With beta 0, alpha 1 returns A and alpha 0 B. A single value (0-dim or one element) gives "
         "alpha·A + (1 − alpha)·B (meh: that for 0-dim, A for one element). Models: A (first), B (second); "
         "base: C. C's order is a stable sort (meh's is not, so meh's result for tied values of C depends on "
         "the sort).",
    params=(_alpha(0.5, "Where the cut lies, as a fraction of the spectrum: frequencies below it come from A, "
                   "above from B.", lo=0.0, hi=1.0),
            _beta(0.1, "Width of the ramp between A's and B's frequencies (0: a hard cut).", lo=0.0, hi=1.0)),
)
def distribution_crossover(base, models, ctx, *, alpha, beta):
    a, b, c = models[0], models[1], base
    if a.numel() <= 1:
        return a * alpha + b * (1.0 - alpha)
    order = torch.argsort(c.reshape(-1), stable=True)
    a_spec = torch.fft.rfft(a.reshape(-1)[order])
    b_spec = torch.fft.rfft(b.reshape(-1)[order])
    n = a_spec.numel()
    freq = torch.arange(n, device=a.device, dtype=torch.float32).div_(n)
    if beta > _FILTER_SHARPNESS_EPS:
        share = freq.sub_(alpha).div_(beta).add_(0.5).clamp_(0.0, 1.0)
    else:
        share = (freq >= alpha).to(torch.float32)
    share = share.to(a.dtype)
    mixed = a_spec.mul_(1.0 - share).add_(b_spec.mul_(share))
    del b_spec
    values = torch.fft.irfft(mixed, a.numel())
    out = torch.empty_like(values)
    out[order] = values
    return out.reshape(a.shape)


# ============================================================================== meh's top-k methods
@merge_method(
    "ties_add_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="meh",
    help="meh's ties_add_difference: TIES on the differences A − C and B − C. Each difference keeps the entries "
         "whose magnitude is at least its k-th smallest, k = max(⌊(1 − beta)·n⌋, 1) of its n entries (so n − k + 1 "
         "entries, more where magnitudes tie: all for beta 1, the largest for beta 0, about beta·n + 1 between), "
         "the rest are set to 0; a sign is elected per entry by counting the two kept entries' signs (+1, −1, 0 "
         "for a cut or zero entry; the sign of their sum), and the entries with the elected sign are averaged: "
         "out = C + alpha·Σ(agreeing entries)/(their count). So where both kept entries agree their mean is "
         "added, where one was cut the other is added whole, and where they have opposite signs (or both were "
         "cut) the result is C. Models: A (first), B (second); base: C. The cut is found in the compute dtype "
         "(meh rounds it to fp32, so with fp64 inputs meh can keep or drop an entry at the cut).",
    params=(_alpha(1.0, "Scale of the merged difference added to C (0: C, 1: the full TIES difference)."),
            _beta(0.2, "Density: the share of each difference's largest entries kept (meh's ⌊(1 − beta)·n⌋ rule, "
                  "see above).", lo=0.0, hi=1.0)),
)
def ties_add_difference(base, models, ctx, *, alpha, beta):
    deltas = models - base
    flat = deltas.view(deltas.shape[0], -1)
    n = flat.shape[1]
    k = max(int((1.0 - beta) * n), 1)               # meh's filter_top_k, in the same float arithmetic
    if k > 1:
        for row in flat:
            magnitude = row.abs()
            row.masked_fill_(magnitude < kth_smallest(magnitude, k), 0.0)
            del magnitude
    signs = deltas.sign()
    agree = signs == signs.sum(0).sign_()
    del signs
    d0, d1 = deltas[0].mul_(agree[0]), deltas[1].mul_(agree[1])
    total = d0 + d1
    count = agree.sum(0, dtype=deltas.dtype)
    del agree
    mean = torch.where(count > 0, total / count, torch.zeros((), dtype=total.dtype, device=total.device))
    # the sum of two agreeing finite differences can overflow where their mean does not (rare: one check per call)
    overflow = total.isinf()
    if bool(overflow.any()):
        mean = torch.where(overflow, torch.add(d0 * 0.5, d1, alpha=0.5), mean)
    return mean.mul_(alpha).add_(base)


@merge_method(
    "top_k_tensor_sum", base=BASE_NONE, min_models=2, max_models=2, source="meh / sd-mecha",
    help="meh's top_k_tensor_sum (sd-mecha's copy_region with top_k): A's values put in B's rank order, within "
         "a band of magnitudes. A's values sorted ascending are v₁ ≤ … ≤ vₙ (n = all entries); the entry where B "
         "has rank r (ascending; equal values of B in flat order) is offered vᵣ, and takes it if |vᵣ| lies in the "
         "band, else keeps A's own value. The band: the magnitudes above the s-th smallest magnitude of A and up "
         "to the e-th, s = round(offset·n), e = round((offset + width)·n) (as tensor_sum's rows: half to even; a "
         "negative width ends at the offset; a band past the end wraps around, and is then every magnitude "
         "outside (s-th, e-th]); without ties it holds e − s of A's values. width 1 (the default) moves all of "
         "A's values into B's order: B's pattern with A's distribution of values; width 0 returns A. width and "
         "offset are meh's alpha and beta and sd-mecha's width and offset; the band's low end follows meh (above "
         "the s-th magnitude; sd-mecha's includes it, one value more when s > 0). The band's ends are found in the "
         "compute dtype (meh and sd-mecha round them to fp32, which with fp64 inputs can move a value at an end "
         "in or out). Models: A (first), B (second).",
    params=(Param("width", FLOAT, 1.0, "Size of the magnitude band as a share of all entries (negative: it ends "
                  "at the offset; 1: every value).", min=-1.0, max=1.0, step=0.01),
            Param("offset", FLOAT, 0.0, "Where the band starts, as a share of A's magnitudes from the smallest "
                  "(wraps around).", min=0.0, max=1.0, step=0.01)),
)
def top_k_tensor_sum(base, models, ctx, *, width, offset):
    a, b = models[0].reshape(-1), models[1].reshape(-1)
    n = a.numel()
    values = torch.sort(a).values
    by_b = torch.argsort(b, stable=True)
    rank = torch.empty_like(by_b)
    rank[by_b] = torch.arange(n, device=a.device)
    del by_b
    start, end, inverted = ratio_to_region(float(width), float(offset), n)
    # the band, over the sorted values: magnitudes in (s-th smallest, e-th smallest]; the 0-th is below all
    magnitude, a_magnitude = values.abs(), a.abs()
    if end > 0:
        band = magnitude <= kth_smallest(a_magnitude, end)
    else:
        band = torch.zeros(n, dtype=torch.bool, device=a.device)
    if start > 0:
        band &= magnitude > kth_smallest(a_magnitude, start)
    if inverted:
        band = band.logical_not_()
    del magnitude, a_magnitude
    return torch.where(band[rank], values[rank], a).reshape(models.shape[1:])
