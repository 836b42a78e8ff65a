"""supermerger's calc modes and the methods meh (sd-meh, sd-webui-bayesian-merger) adds to them.

supermerger's ``Triple sum`` and ``sum Twice`` take three models (A, B, C). meh's ``weighted_subtraction``
takes two; its add-difference family (``euclidean_add_difference``, ``multiply_difference``,
``similarity_add_difference``, ``distribution_crossover``) takes A and B and C as the base, the model both
were made from. alpha and beta are meh's: alpha is B's weight where a weight is meant (alpha 1 = B),
the opposite of ComfyUI's ratio (``weighted_sum``).
"""
from __future__ import annotations

import torch

from .ops import pow2_scale, sumsq
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
