"""Methods of sd-mecha: ``crossover`` (a blend in the frequency domain), ``add_cosine_a`` / ``add_cosine_b``
(a lerp weighted by cosine similarity), ``tensor_sum`` (a region of B copied into A), ``geometric_sum`` (a
weighted geometric mean), ``clamp`` (model 1 limited to the range of the others), ``truncate_rank`` (a
model's difference from the base cut to a low rank), ``truncate_kronecker`` (that difference as the nearest
Kronecker product), ``multiply_quotient`` (A scaled by a power of B/C) and
``dropout`` (sd-mecha's n-supermario: randomly kept differences, averaged).

Model 1 is sd-mecha's ``a`` and model 2 its ``b`` (for ``clamp``, models 2… are its bounds). Only
``tensor_sum`` takes an optional base: sd-mecha's ``copy_region`` wrapper then works on the differences from
it (c + tensor_sum(a − c, b − c)); sd-mecha has no such wrapper for the others. ``multiply_quotient``'s base
is sd-mecha's ``c``; ``dropout``'s base is the ``a`` of sd-mecha's wrapper, the model the others are taken as
differences from.
"""
from __future__ import annotations

import math
from itertools import accumulate
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .ops import dot64, pow2_scale, ratio_to_region, sumsq
from .spec import BASE_NONE, BASE_OPTIONAL, BASE_REQUIRED, FLOAT, Param, merge_method


# ============================================================================== crossover
def _axis_radius(n: int, halved: bool, device) -> torch.Tensor:
    """|frequency| along one axis of an rfftn spectrum, scaled to [0, 1] (fp32).

    The last axis (``halved``) holds only the frequencies 0..n−1 of the half spectrum: k/(n − 1).  The other
    axes hold 0, 1, ..., then the negative frequencies from −⌊n/2⌋ up to −1: |k|/⌊n/2⌋."""
    if halved:
        return torch.linspace(0.0, 1.0, n, dtype=torch.float32, device=device)
    if n == 1:
        return torch.zeros(1, dtype=torch.float32, device=device)
    k = torch.arange(n, device=device)
    return torch.minimum(k, n - k).to(torch.float32) / (n // 2)


def _crossover_filter(spectrum_shape: Tuple[int, ...], alpha: float, tilt: float, device) -> torch.Tensor:
    """The share of model 2 (B) at each frequency of the rfftn spectrum, in [0, 1] (fp32 whatever the
    compute dtype, as sd-mecha builds it; the cut then falls on the same frequencies in fp32 and fp64).

    ``radius`` is the normalized distance of a frequency from 0 (0: the mean, 1: the highest frequency on
    every axis): the root mean square of the per-axis radii (the radius itself for a 1-D tensor).  The cut
    runs through the point (radius 1 − alpha, share alpha); tilt 0 makes it a step (B above the point), a
    tilt in (0, 1) a ramp of slope cot(π·tilt/2), tilt 1 a flat share alpha everywhere; tilts in (1, 4)
    continue the rotation (tilt 2: a step with B below 1 − alpha; above 2 with alpha taken as 1 − alpha and
    the share inverted), and the tilt is periodic with period 4."""
    ndim = len(spectrum_shape)
    radius = None
    for axis, n in enumerate(spectrum_shape):
        r = _axis_radius(n, axis == ndim - 1, device)
        if ndim == 1:
            radius = r
            break
        r = r.square().reshape([n if i == axis else 1 for i in range(ndim)])
        radius = r if radius is None else radius + r
    if ndim > 1:
        radius = radius.div_(ndim).sqrt_()
    radius = radius.expand(spectrum_shape)

    tilt = tilt % 4.0
    inverted = tilt > 2.0
    if inverted:
        alpha = 1.0 - alpha
    if tilt < 1e-10 or abs(tilt - 4.0) < 1e-10:
        share = (radius > 1.0 - alpha).to(torch.float32)
    elif abs(tilt - 2.0) < 1e-10:
        share = (radius < 1.0 - alpha).to(torch.float32)
    else:
        slope = 1.0 / math.tan(math.pi * tilt / 2.0)
        # a line of that slope through (1 − alpha, alpha) for tilts in (0, 1] and (2, 3], through
        # (alpha, alpha) for (1, 2) and (3, 4)
        pivot = 1.0 - alpha if (tilt <= 1.0 or 2.0 < tilt <= 3.0) else alpha
        share = (radius - pivot).mul_(slope).add_(alpha).clamp_(0.0, 1.0)
    if inverted:
        share = 1.0 - share
    return share


@merge_method(
    "crossover", base=BASE_NONE, min_models=2, max_models=2, source="sd-mecha",
    help="sd-mecha's crossover: a blend in the frequency domain. Both tensors are transformed with a real "
         "n-dimensional FFT over all their dims; each frequency takes the share f of B and 1 − f of A, and the "
         "result is transformed back: out = irfftn((1 − f)·rfftn(A) + f·rfftn(B)). f depends on the frequency's "
         "normalized radius ρ (0: the mean, 1: the highest frequency on every axis; the root mean square of the "
         "per-axis radii): with tilt 0 a hard cut, B's frequencies above ρ = 1 − alpha and A's below (A's coarse "
         "structure, B's fine detail); a tilt in (0, 1) turns the cut into a ramp through (ρ = 1 − alpha, f = "
         "alpha), steeper near 0; tilt 1 is the plain lerp A + alpha·(B − A). Tilts in (1, 4) rotate the cut "
         "further (tilt 2: B's frequencies below ρ = 1 − alpha, A's above) and 4 is 0 again. alpha 0 returns A "
         "and alpha 1 B; a 0-dim tensor, or A and B allclose (rtol 1e-5, atol 1e-8), get the lerp. Models: A "
         "(first), B (second).",
    params=(Param("alpha", FLOAT, 0.5, "Share of B: with tilt 0, B gives the top alpha of the frequency radius "
                  "(0: all A, 1: all B).", min=0.0, max=1.0, step=0.01),
            Param("tilt", FLOAT, 0.0, "Tilt of the cut: 0 a hard cut (A's low, B's high frequencies), 0-1 a "
                  "ramp, 1 a plain lerp, 2 a hard cut with B's low frequencies; periodic with period 4.",
                  min=0.0, max=4.0, step=0.01)),
)
def crossover(base, models, ctx, *, alpha, tilt):
    a, b = models[0], models[1]
    alpha, tilt = float(alpha), float(tilt)
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    if tilt == 1.0 or a.dim() == 0 or torch.allclose(a, b):
        return torch.lerp(a, b, alpha)
    shape = tuple(a.shape)
    a_f = torch.fft.rfftn(a, s=shape)
    b_f = torch.fft.rfftn(b, s=shape)
    share = _crossover_filter(tuple(a_f.shape), alpha, tilt, a.device)
    mixed = a_f.mul_(1.0 - share).add_(b_f.mul_(share))
    del a_f, b_f
    return torch.fft.irfftn(mixed, s=shape).contiguous()


# ============================================================================== add_cosine_a / add_cosine_b
def _cosine_lerp(a: torch.Tensor, b: torch.Tensor, similarity: torch.Tensor, alpha: float) -> torch.Tensor:
    """lerp(A, B, k) with k = 1 − clamp(similarity − alpha, 0, 1), k broadcast along dim 0."""
    k = (similarity - alpha).clamp_(0.0, 1.0).neg_().add_(1.0)
    return torch.lerp(a, b, k)


def _column_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(A, B) along dim 0: one value per position of the other dims (a scalar for a 1-D tensor, ±1 or 0
    for a 0-dim one); 0 where A's or B's vector is 0."""
    return F.cosine_similarity(a, b, dim=0)


_COSINE_ALPHA_HELP = ("Subtracted from the similarity before it is clamped to [0, 1]: 1 returns B, −2 returns A; "
                      "higher values take more of B. (sd-mecha's default, 1, returns B; the default here is 0.5.)")
_COSINE_NOTE = (" This is sd-mecha's per-key variant: each tensor is weighted by its own similarities, not by "
                "supermerger's cosine methods' two passes that normalize the similarities over the whole model. "
                "Models: A (first), B (second).")


@merge_method(
    "add_cosine_a", base=BASE_NONE, min_models=2, max_models=2, source="sd-mecha",
    help="sd-mecha's add_cosine_a: a lerp from A to B that takes more of B where the two point in different "
         "directions. For each position of the other dims, s is the cosine similarity of A's and B's vectors "
         "along dim 0 (one per column of a 2-D weight; one value for a 1-D tensor; 0 where a vector is 0); then "
         "k = 1 − clamp(s − alpha, 0, 1) and out = A + k·(B − A). alpha 1 (and above) returns B, alpha −2 (and "
         "below) A; at alpha 0 a column takes 1 − s of B where s > 0 and all of B where s ≤ 0."
         + _COSINE_NOTE,
    params=(Param("alpha", FLOAT, 0.5, _COSINE_ALPHA_HELP, min=-2.0, max=1.0, step=0.01),),
)
def add_cosine_a(base, models, ctx, *, alpha):
    a, b = models[0], models[1]
    # unit columns first, as sd-mecha: cosine_similarity's 1e-8 norm floor would shrink the similarity of
    # columns smaller than that toward 0 (scaled by a power of two first, so that huge norms cannot overflow)
    similarity = _column_cosine(F.normalize(a / pow2_scale(a), dim=0), F.normalize(b / pow2_scale(b), dim=0))
    return _cosine_lerp(a, b, similarity, float(alpha))


@merge_method(
    "add_cosine_b", base=BASE_NONE, min_models=2, max_models=2, source="sd-mecha",
    help="sd-mecha's add_cosine_b: add_cosine_a with the similarity s averaged with the cosine of the whole "
         "tensors: s = (cos(A, B) along dim 0 + ⟨A, B⟩/(‖A‖·‖B‖)) / 2, k = 1 − clamp(s − alpha, 0, 1), "
         "out = A + k·(B − A). alpha 1 (and above) returns B, alpha −2 (and below) A. The whole-tensor cosine is "
         "accumulated in fp64 and is 0 where A or B is all zeros (sd-mecha divides 0 by 0 there and returns NaN)."
         + _COSINE_NOTE,
    params=(Param("alpha", FLOAT, 0.5, _COSINE_ALPHA_HELP, min=-2.0, max=1.0, step=0.01),),
)
def add_cosine_b(base, models, ctx, *, alpha):
    a, b = models[0], models[1]
    # scaled by powers of two (exact; cosines do not depend on it) so that squares cannot overflow
    sa, sb = pow2_scale(a), pow2_scale(b)
    a_s, b_s = a / sa, b / sb
    norms = (sumsq(a_s) * sumsq(b_s)).sqrt_()
    whole = torch.where(norms > 0, dot64(a_s, b_s) / norms.clamp(min=torch.finfo(norms.dtype).tiny),
                        torch.zeros_like(norms))
    similarity = _column_cosine(a_s, b_s).add_(whole.to(a.dtype)).div_(2.0)
    del a_s, b_s
    return _cosine_lerp(a, b, similarity, float(alpha))


# ============================================================================== tensor_sum
@merge_method(
    "tensor_sum", base=BASE_OPTIONAL, min_models=2, max_models=2, source="sd-mecha",
    help="sd-mecha's tensor_sum (its copy_region): A with a band of rows along dim 0 replaced by B's. The band "
         "starts at offset·n and is width·n rows long (n = size of dim 0, the ends rounded half to even); a band "
         "that runs past the end wraps around to the start. A negative width reaches to the left of the offset. "
         "width 0 returns A, width 1 returns B; a 0-dim tensor is B's when width > 0.5, else A's. With a base C the "
         "band is copied between the differences and the base added back: C + tensor_sum(A − C, B − C). "
         "Models: A (first), B (second).",
    params=(Param("width", FLOAT, 0.5, "Length of B's band as a share of dim 0 (negative: it ends at the offset).",
                  min=-1.0, max=1.0, step=0.01),
            Param("offset", FLOAT, 0.0, "Where B's band starts, as a share of dim 0 (wraps around).",
                  min=0.0, max=1.0, step=0.01)),
)
def tensor_sum(base, models, ctx, *, width, offset):
    a, b = models[0], models[1]
    if base is not None:
        a, b = a - base, b - base
    width, offset = float(width), float(offset)
    if a.dim() == 0:
        out = (b if width > 0.5 else a).clone()
    else:
        start, end, inverted = ratio_to_region(width, offset, a.shape[0])
        inside, outside = (a, b) if inverted else (b, a)
        out = outside.clone()
        out[start:end] = inside[start:end]
    if base is not None:
        out = out.add_(base)
    return out


# ============================================================================== geometric_sum
@merge_method(
    "geometric_sum", base=BASE_NONE, min_models=2, max_models=2, source="sd-mecha", elementwise=True,
    help="sd-mecha's geometric_sum: the weighted geometric mean out = Re(A^(1 − alpha)·B^alpha), element by "
         "element, with the principal complex powers of negative values. That is |A|^(1 − alpha)·|B|^alpha times "
         "+1 where A and B are ≥ 0, −1 where both are negative, cos(π·alpha) where only B is negative and "
         "−cos(π·alpha) where only A is (alpha 0.5: 0 where the signs differ). alpha 0 returns A and alpha 1 B "
         "exactly; a zero element is 0 for 0 < alpha < 1 (sd-mecha's complex pow gives NaN for 0^0, so for zeros "
         "at its alpha 0 and 1). Evaluated in that real form, so no complex tensors are made. Models: A (first), "
         "B (second).",
    params=(Param("alpha", FLOAT, 0.5, "Exponent of B (A gets 1 − alpha): 0 returns A, 1 returns B.",
                  min=0.0, max=1.0, step=0.01),),
)
def geometric_sum(base, models, ctx, *, alpha):
    a, b = models[0], models[1]
    alpha = float(alpha)
    out = a.abs().pow_(1.0 - alpha).mul_(b.abs().pow_(alpha))
    # Re(e^{iπ((1 − α)·[A < 0] + α·[B < 0])}): one of four constants, from the signs
    turn = math.cos(math.pi * alpha)
    neg_a, neg_b = a < 0, b < 0
    factor = torch.ones_like(out).masked_fill_(neg_b, turn).masked_fill_(neg_a, -turn)
    factor.masked_fill_(neg_a.logical_and_(neg_b), -1.0)
    return out.mul_(factor)


# ============================================================================== clamp
@merge_method(
    "clamp", base=BASE_NONE, min_models=2, source="sd-mecha", elementwise=True,
    help="sd-mecha's clamp: model 1 limited, element by element, to the range the other models span: "
         "out = min(max(A, lo), hi) with lo, hi the smallest and largest of models 2…N there. Use it to keep a "
         "merge (TIES, DARE, an add difference, an extrapolation) within the values of the models it came "
         "from: connect the merge result as model 1 and those models after it. stiffness pulls each bound "
         "toward the bounds' mean: hi moves toward the smallest bound value at or above the mean, lo toward "
         "the largest at or below it (with two bounds those are hi and lo themselves, so stiffness matters "
         "from three bounds on).",
    params=(Param("stiffness", FLOAT, 0.0, "0: the full range of the bounds; 1: from the bound value nearest "
                  "below the bounds' mean to the one nearest above it (the same range with two bounds).",
                  min=0.0, max=1.0, step=0.01),),
)
def clamp(base, models, ctx, *, stiffness):
    value, bounds = models[0], models[1:]
    hi = bounds.amax(0)
    lo = bounds.amin(0)
    if stiffness:
        mean = bounds.mean(0)
        inf = torch.tensor(float("inf"), dtype=bounds.dtype, device=bounds.device)
        nearest_above = torch.where(bounds >= mean, bounds, inf).amin(0)
        nearest_below = torch.where(bounds <= mean, bounds, -inf).amax(0)
        # no bound on a side (rounding of the mean): that side's bound stays
        nearest_above = torch.where(torch.isinf(nearest_above), hi, nearest_above)
        nearest_below = torch.where(torch.isinf(nearest_below), lo, nearest_below)
        hi = torch.lerp(hi, nearest_above, stiffness)
        lo = torch.lerp(lo, nearest_below, stiffness)
    return torch.minimum(torch.maximum(value, lo), hi)


# ============================================================================== truncate_rank
@merge_method(
    "truncate_rank", base=BASE_REQUIRED, min_models=1, max_models=1, source="sd-mecha",
    help="sd-mecha's truncate_rank on the model's difference from the base: out = C + the best rank-r "
         "approximation of A − C (its top r singular directions; the weight viewed as (out, in·kh·kw)), with "
         "r = round(rank_ratio·min(out, in·kh·kw)), as sd-mecha's get_rank_from_ratio. Keeps the main "
         "directions of a fine-tune and drops the rest (noise, small details), like extracting it as a LoRA "
         "of that rank and applying it. rank_ratio 1 returns A, 0 returns C; 1-D weights keep their whole "
         "difference. Exact: the top eigenvectors of the difference's Gram matrix, in fp64 (sd-mecha's default "
         "is a randomized SVD). Model: A; base: C.",
    params=(Param("rank_ratio", FLOAT, 0.25, "The rank kept, as a fraction of the largest possible rank of each "
                  "weight (0: none of the difference, 1: all of it).", min=0.0, max=1.0, step=0.01),),
)
def truncate_rank(base, models, ctx, *, rank_ratio):
    a = models[0]
    if a.dim() < 2:
        return a.clone()
    delta = (a - base).reshape(a.shape[0], -1)
    full = min(delta.shape)
    rank = min(max(round(full * float(rank_ratio)), 0), full)
    if rank == full:
        return a.clone()
    if rank == 0:
        return base.clone()
    return best_low_rank(delta, rank).reshape(a.shape).add_(base)


def best_low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of the 2-D ``m`` (a new tensor of its dtype), for ``rank`` below
    both sides: the projection of ``m`` onto its top singular directions on the short side, the top
    eigenvectors of its Gram matrix there.  In fp64 (and by a power of two, exact, so that huge or subnormal
    entries neither overflow nor lose digits) that subspace is more accurate than an fp32 SVD's, and for the
    wide weights of a UNet (320 x 2880 ... 1280 x 11520) 4-6x faster."""
    scale = pow2_scale(m)
    d = (m / scale).double()
    wide = d.shape[0] <= d.shape[1]
    gram = d @ d.T if wide else d.T @ d
    top = _top_eigenvector(gram) if rank == 1 else None
    if top is None:
        top = torch.linalg.eigh(gram)[1][:, -rank:]     # eigenvalues ascending: the last r vectors
    kept = top @ (top.T @ d) if wide else (d @ top) @ top.T
    return kept.to(m.dtype).mul_(scale)


def _top_eigenvector(gram: torch.Tensor):
    """The unit eigenvector (n, 1) of the largest eigenvalue λ of a symmetric positive semidefinite fp64
    matrix G, or None (then eigh decides: G is 0, or the check below fails).

    Inverse iteration: with σ just above λ (eigenvalues alone cost a quarter of eigh at n = 4096), σI − G is
    positive definite and its inverse scales G's top eigenvector by 1/(σ − λ), every other by at most
    1/(σ − λ₂): three solves with its Cholesky factor leave that vector (or, where λ₂ is within a few shifts
    of λ, a vector of the near-equal eigenvalues' span, which approximates as well).  The start is G times a
    fixed pseudo-random vector: deterministic, and with a component along the top eigenvector (a column of
    G need not have one: block-diagonal G from sparse differences).  The result must satisfy
    ‖Gx − λx‖ ≤ 1e-10·λ, else None; its loss against the best rank-1 approximation is then at most that."""
    n = gram.shape[0]
    lam = torch.linalg.eigvalsh(gram)[-1]
    if not bool(lam > 0):
        return None
    g = gram / lam                          # λ = 1: no overflow in the solves whatever G's magnitude
    shifted = g.neg()
    shifted.diagonal().add_(1.0 + 64.0 * n * torch.finfo(g.dtype).eps)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if bool(info != 0):
        return None
    start = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=g.dtype)
    x = g @ start.to(g.device)
    for _ in range(3):
        x = torch.cholesky_solve(x, factor)
        x = x / torch.linalg.vector_norm(x)
    residual = torch.linalg.vector_norm(g @ x - x)
    return x if bool(residual <= 1e-10) else None


# ============================================================================== truncate_kronecker
def _divisors(n: int) -> List[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def kronecker_dims(shape: Tuple[int, ...], ratio: float) -> Tuple[int, int, int, int]:
    """(m1, m2, n1, n2) with out = m1·m2 and in = n1·n2, the factor shapes of the Kronecker product
    W1 (m1, n1) ⊗ W2 (m2, n2, *kernel) that truncate_kronecker fits to a weight of ``shape``: sd-mecha's rule.
    Among all divisor pairs, s = ln(m1·n1) − ln(numel)/2 is how far W1's size is from the balanced one (in
    log scale); the target is s = (2·ratio − 1)·max|s|, and the pair nearest to it wins, ties going to the
    most even split (|ln(m1/m2)| + |ln(n1/n2)|), then to the smaller m1 and n1."""
    out_dim, in_dim = int(shape[0]), int(shape[1])
    half_log = 0.5 * math.log(math.prod(shape))
    candidates = []
    for m1 in _divisors(out_dim):
        for n1 in _divisors(in_dim):
            m2, n2 = out_dim // m1, in_dim // n1
            candidates.append((math.log(m1 * n1) - half_log, abs(math.log(m1 / m2)) + abs(math.log(n1 / n2)),
                               (m1, m2, n1, n2)))
    reach = max(abs(c[0]) for c in candidates)
    target = (2.0 * float(ratio) - 1.0) * reach
    best = min(candidates, key=lambda c: (abs(c[0] - target) if reach > 0 else 0.0, c[1]))
    return best[2]


@merge_method(
    "truncate_kronecker", base=BASE_REQUIRED, min_models=1, max_models=1, source="sd-mecha",
    help="sd-mecha's truncate_kronecker on the model's difference from the base: out = C + the Kronecker "
         "product W1 ⊗ W2 nearest to A − C (least squares), as a LoKr layer without its low-rank factors stores "
         "a difference. W1 is (m1, n1) and W2 (m2, n2, kernel) with out = m1·m2 and in = n1·n2; kronecker_ratio "
         "picks the split: 0.5 makes W1 and W2 about equal in size (the fewest numbers: the strongest "
         "truncation), toward 0 or 1 one of them takes more of the weight; at 0 W1 is a number and the product "
         "the whole difference (A), at 1 W2 is (for a 2-D weight; a convolution's W2 keeps its kernel). Ties "
         "between splits go to the most even one (sd-mecha's rule). 1-D weights keep their whole difference. "
         "Exact: the top singular pair of the rearranged difference (Van Loan and "
         "Pitsianis), from its Gram matrix in fp64 (sd-mecha's default is an approximate randomized basis). "
         "Model: A; base: C.",
    params=(Param("kronecker_ratio", FLOAT, 0.5, "How the weight is split between the two Kronecker factors: 0.5 "
                  "balanced (strongest truncation); 0 W1 a number (nothing truncated), 1 W2 a number (for "
                  "2-D weights; a convolution's W2 keeps its kernel).",
                  min=0.0, max=1.0, step=0.01),),
)
def truncate_kronecker(base, models, ctx, *, kronecker_ratio):
    a = models[0]
    if a.dim() < 2:
        return a.clone()
    m1, m2, n1, n2 = kronecker_dims(tuple(a.shape), float(kronecker_ratio))
    rest = math.prod(a.shape[2:]) if a.dim() > 2 else 1
    # W1 ⊗ W2 rearranged (rows: W1's entries, columns: W2's) is the rank-1 matrix vec(W1)·vec(W2)ᵀ
    rows = (a - base).reshape(m1, m2, n1, n2 * rest).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2 * rest)
    if min(rows.shape) <= 1:                # a rank-1 matrix already: the product is the whole difference
        return a.clone()
    kept = best_low_rank(rows, 1)
    return kept.reshape(m1, n1, m2, n2 * rest).permute(0, 2, 1, 3).reshape(a.shape).add_(base)


# ============================================================================== multiply_quotient
@merge_method(
    "multiply_quotient", base=BASE_REQUIRED, min_models=2, max_models=2, source="sd-mecha", elementwise=True,
    result_is_model1=True,
    help="sd-mecha's multiply_quotient: A times a power of B/C where A and B moved away from C in opposite "
         "directions of magnitude. With the log ratios a = ln|A| − ln|C| and b = ln|B| − ln|C|, per element, "
         "the exponent is x = alpha·max(0, −a·b / max(|a|, |b|)²): 0 where A and B both grew or both shrank "
         "against C, alpha·min(|a|, |b|)/max(|a|, |b|) where one grew and the other shrank; "
         "out = A·|B/C|^x, times cos(π·x) where B and C have opposite signs: the real part of A·(B/C)^x with the "
         "principal complex power, as sd-mecha computes it. In magnitude, ln|out| = ln|A| + x·b: A is moved "
         "back toward C's magnitude by at most alpha·|a|; where |b| ≥ |a|, |out| = |C|^alpha·|A|^(1 − alpha). "
         "Where A, B or C is 0, or both ratios are 0, x = 0 and the result is A (sd-mecha: the "
         "same, by replacing NaN with A). Evaluated in real arithmetic, |B/C|^x as e^(x·b): no complex "
         "tensors, and no B/C to overflow (sd-mecha returns A where its fp32 B/C overflows, e.g. B = 1e30 "
         "against C = 1e-10). Models: A (first), B (second); base: C.",
    params=(Param("alpha", FLOAT, 1.0, "Scale of the exponent x (0 returns A).", min=-1.0, max=2.0, step=0.01),),
)
def multiply_quotient(base, models, ctx, *, alpha):
    a, b = models[0], models[1]
    log_c = base.abs().log()
    ac = a.abs().log_().sub_(log_c)
    bc = b.abs().log_().sub_(log_c)
    del log_c
    peak = torch.maximum(ac.abs(), bc.abs()).square_()
    # NaN from the zeros' infinite logs (inf·0, inf/inf) and from 0/0 where both ratios are 0: exponent 0
    exponent = ac.mul_(bc).div_(peak).neg_().nan_to_num_(nan=0.0).clamp_(min=0.0).mul_(float(alpha))
    del peak
    # |B/C|^x = e^(x·b); where x = 0 that is 1 (b may be ±inf there: a 0 in B or C)
    power = bc.mul_(exponent).nan_to_num_(nan=0.0)
    factor = power.exp()
    out = factor * a
    # where the factor alone overflows or is subnormal (the product may be a normal number): e^(ln|A| + x·b);
    # rare on weights, so computed only when some entry needs it (one check per call)
    outside = ~(factor.isfinite() & (factor >= torch.finfo(factor.dtype).tiny))
    if bool(outside.any()):
        out = torch.where(outside, a.abs().log_().add_(power).exp_().mul_(a.sign()), out)
    del factor, power, outside
    # Re(e^{iπx}) where B/C < 0; cos(0) = 1 exactly elsewhere
    turn = exponent.mul_((b < 0) != (base < 0)).mul_(math.pi).cos_()
    return out.mul_(turn)


# ============================================================================== dropout (n-supermario)
def _np_isclose(x: float, y: float) -> bool:
    """numpy's isclose at its defaults (rtol 1e-5, atol 1e-8), as sd-mecha tests overlap with it."""
    return abs(x - y) <= 1e-8 + 1e-5 * abs(y)


def dropout_set_probabilities(n: int, probability: float, overlap: float, emphasis: float) -> List[float]:
    """The probability of each of the 2ⁿ keep-sets, indexed by bitmask (bit i set: model i kept), for an overlap
    other than 1: sd-mecha's overlapping_sets_pmf.  Index 0, no model, has ``probability``; the non-empty sets
    share 1 − probability by weights that depend only on their size s:

    * overlap within numpy's isclose of 0: the single models, 1/n each (of 1: the set of all models);
    * else a softmax of tan(π·(overlap − 0.5))·(s − n/2) (taken stably: it cannot overflow);
    * blended toward the binomial weights ∝ probability^s·(1 − probability)^(n − s) by
      emphasis·(1 − |2·overlap − 1|); at probability 0 those are their limit, the single models (sd-mecha
      divides 0 by 0 there)."""
    sizes = [bin(i).count("1") for i in range(1, 2 ** n)]
    nearest = round(overlap)
    if _np_isclose(overlap, nearest):
        if nearest % 2 == 0:
            weights = [1.0 / n if s == 1 else 0.0 for s in sizes]
        else:
            weights = [1.0 if s == n else 0.0 for s in sizes]
    else:
        tilt = math.tan(math.pi * (overlap - 0.5))
        logits = [tilt * (s - n / 2) for s in sizes]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        weights = [w / total for w in weights]
    share = emphasis * (1.0 - abs(2.0 * overlap - 1.0))
    if share:
        if probability > 0.0:
            binomial = [probability ** s * (1.0 - probability) ** (n - s) for s in sizes]
        else:
            binomial = [1.0 if s == 1 else 0.0 for s in sizes]
        total = sum(binomial)
        weights = [w + share * (v / total - w) for w, v in zip(weights, binomial)]
    return [probability] + [(1.0 - probability) * w for w in weights]


def dropout_keep_masks(ctx, n: int, shape, probability: float, overlap: float, emphasis: float) -> torch.Tensor:
    """The keep masks, bool (n, *shape), from the per-key generator: overlap 1 draws one uniform number per
    entry of each model (kept below 1 − probability); other overlaps draw one per entry and pick the keep-set
    it falls on in the cumulative distribution of :func:`dropout_set_probabilities`."""
    if overlap == 1.0:
        return ctx.uniform((n,) + tuple(shape), transient=True) < (1.0 - probability)
    cdf = torch.tensor(list(accumulate(dropout_set_probabilities(n, probability, overlap, emphasis))),
                       dtype=torch.float64, device=ctx.device)
    cdf /= cdf[-1].clone()                  # the last is 1 exactly: every draw (< 1) finds a set
    u = ctx.uniform(shape, transient=True).reshape(-1).to(torch.float64)
    chosen = torch.searchsorted(cdf, u, right=True)         # the set whose interval [cdf[k − 1], cdf[k]) holds u
    del u
    bits = torch.tensor([1 << i for i in range(n)], dtype=chosen.dtype, device=chosen.device).view(n, 1)
    return (chosen.unsqueeze(0) & bits).ne(0).view((n,) + tuple(shape))


@merge_method(
    "dropout", base=BASE_REQUIRED, min_models=1, source="sd-mecha", randomized=True,
    help="sd-mecha's dropout (n-supermario): the differences δᵢ = Mᵢ − C of the models from the base are kept or "
         "dropped entry by entry, and the kept ones averaged and rescaled: final = Σ mᵢ·δᵢ / max(Σ mᵢ, 1) / "
         "(1 − probability)^rescale (no rescale at probability 1), out = C + alpha·final. The keep masks mᵢ: "
         "with overlap 1 (the default) each entry of each model is kept with probability 1 − probability, "
         "independently; with any other overlap one keep-set is drawn per entry: no model with probability "
         "`probability`, else a non-empty set S of the n models by weights that depend on its size: overlap 0 "
         "one model (uniformly: the masks are disjoint), overlap in (0, 1) weights ∝ e^(tan(π·(overlap − 0.5))·"
         "(|S| − n/2)) (toward 0 single models, at 0.5 every set alike, toward 1 and within 1e-5 of it all "
         "models together); overlap_emphasis blends these toward weights ∝ probability^|S|·(1 − probability)^"
         "(n − |S|) (sd-mecha's binomial term), by emphasis·(1 − |2·overlap − 1|). E.g. one model, overlap 1: "
         "C + alpha·δ·m/(1 − probability) (DARE). Randomized: the masks come from the seeded per-key generator, "
         "not sd-mecha's numpy draws, so they differ draw by draw, not in distribution. Differences: overlap "
         "is offered in [0, 1] (sd-mecha's overlaps o in (1, 2) mirror 2 − o, except that its emphasis "
         "extrapolates there to negative probabilities); sd-mecha 1.1.8 fails with a TypeError for overlaps "
         "other than 1 (torch.lerp of numpy arrays), here they follow the distribution its code describes; "
         "at probability 0 the binomial weights are their limit, single models (sd-mecha's are 0/0, NaN at any "
         "emphasis). Base: C "
         "(sd-mecha's a); models: 1 or more.",
    params=(Param("probability", FLOAT, 0.9, "Probability that an entry is dropped: of each model's entry "
                  "(overlap 1), or of every model's at once (other overlaps).", min=0.0, max=1.0, step=0.01),
            Param("rescale", FLOAT, 1.0, "Exponent of the rescale: final is divided by (1 − probability)^rescale "
                  "(0: no rescale, 1: the kept entries' expected share).", min=0.0, max=2.0, step=0.01),
            Param("alpha", FLOAT, 0.5, "Scale of the merged difference added to the base.", min=-1.0, max=2.0,
                  step=0.01),
            Param("overlap", FLOAT, 1.0, "1: independent masks per model; 0: each kept entry from one model; in "
                  "between, from mostly single models (near 0) to mostly all models together (near 1).",
                  min=0.0, max=1.0, step=0.01),
            Param("overlap_emphasis", FLOAT, 0.0, "Blend of the keep-set weights toward sd-mecha's binomial "
                  "weights (no effect at overlap 0 and 1).", min=0.0, max=1.0, step=0.01)),
)
def dropout(base, models, ctx, *, probability, rescale, alpha, overlap, overlap_emphasis):
    probability, overlap = float(probability), float(overlap)
    n = models.shape[0]
    keep = dropout_keep_masks(ctx, n, models.shape[1:], probability, overlap, float(overlap_emphasis))
    deltas = (models - base).mul_(keep)
    total = deltas[0]
    for i in range(1, n):                   # in model order, as sd-mecha adds them
        total.add_(deltas[i])
    count = keep.sum(0).clamp_(min=1)
    del keep
    scale = 1.0 if probability == 1.0 else (1.0 - probability) ** float(rescale)
    if not math.isfinite(scale):
        scale = 1.0
    return total.div_(count).div_(scale).mul_(float(alpha)).add_(base)
