"""mergekit's spherical methods: ``slerp``, ``nuslerp``, ``multislerp`` and ``karcher``.

All math runs in torch on the compute device (mergekit's slerp goes through numpy on the CPU).
Elementwise work is fp32; the few scalar reductions that decide angles (norms, dot products, Gram
matrices) are accumulated in fp32 within 4096-element chunks and in fp64 across chunks, which makes
the results agree with an fp64 evaluation of mergekit's formulas to ~1e-7 (mergekit's own fp32
evaluation is off by up to ~1e-5 on large tensors, more on CPU where whole-tensor fp32 norms and dots
lose ~1e-3).
Weighted sums over the model axis use :func:`_combine` (one ``addcmul`` per model: no matmul, so no
TF32 rounding when a host process enables it, and no (N, n) temporary).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ops import dot64 as _dot, sumsq as _sumsq, sumsq_rows as _sumsq_rows
from .spec import BASE_NONE, BASE_OPTIONAL, BASE_REQUIRED, BOOL, FLOAT, INT, Param, merge_method

_SLERP_DOT_THRESHOLD = 0.9995   # mergekit slerp: lerp when |cos| is above this
_SLERP_NORM_EPS = 1e-8          # mergekit slerp: vectors with a smaller norm are not normalized
_NUSLERP_NORM_EPS = 1e-7        # mergekit nuslerp: norm clamp before normalizing
# lerp where 1 - cos^2 <= this (|sin θ| <= 1e-3).  mergekit uses 1e-16, below fp32 rounding of cos, so
# exactly colinear or antipodal rows (0-d tensors with opposite signs, v and -2v) are missed there and
# blow up by 1/sin θ; slerp and lerp differ by < 1e-6 relative inside this band on the θ ≈ 0 side.
_NUSLERP_COLINEAR = 1e-6


def _combine(coef: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Σ_i coef[i]·flat[i] over dim 0 (coef: (N,) tensor on flat's device), without host syncs."""
    out = flat[0] * coef[0]
    for i in range(1, flat.shape[0]):
        out.addcmul_(flat[i], coef[i])
    return out


# --------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------
@merge_method(
    "slerp", base=BASE_REQUIRED, min_models=1, max_models=1, source="mergekit",
    help="Spherical interpolation from the base (t=0) to the model (t=1), mergekit's formula: the angle "
         "comes from the whole-tensor normalized dot product and the raw (un-normalized) tensors are "
         "combined, so norms are not interpolated; nearly parallel tensors (|cos| > 0.9995) are lerped. "
         "Computed in torch on the merge device (mergekit round-trips through numpy on the CPU).",
    params=(Param("t", FLOAT, 0.5, "Interpolation factor: 0 gives the base, 1 gives the model; outside [0, 1] "
                  "it extrapolates along the same arc.", min=-1.0, max=2.0, step=0.01),),
)
def slerp(base, models, ctx, *, t):
    v0 = base
    v1 = models[0]
    t = torch.tensor(float(t), dtype=torch.float64, device=base.device)
    # scalar reductions accumulate in fp64: an fp32 dot of a large tensor is off by ~1e-5, which
    # acos amplifies for small angles
    n0 = _sumsq(v0).sqrt()
    n1 = _sumsq(v1).sqrt()
    n0 = torch.where(n0 > _SLERP_NORM_EPS, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > _SLERP_NORM_EPS, n1, torch.ones_like(n1))
    dot = (_dot(v0, v1) / (n0 * n1)).clamp(-1.0, 1.0)
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    # keep the unselected spherical branch finite (theta = 0 there)
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    # the coefficients in the compute dtype (fp64 inputs: fp64, as every method computes then)
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta).to(v0.dtype)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta).to(v0.dtype)
    return (v0 * c0).addcmul_(v1, c1)


# --------------------------------------------------------------------------------------------
# nuslerp
# --------------------------------------------------------------------------------------------
def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp along the last dim of v0/v1 (each row its own angle), lerp for colinear rows.

    cos = (v0·v1)/(max(|v0|, 1e-7)·max(|v1|, 1e-7)) equals mergekit's dot of the clamped-normalized
    rows, without materializing the unit rows.  A 1-D input (the flattened tensor) is one long row
    and gets the chunked fp64 reductions; rows of a matrix are short and are summed in fp32.
    """
    if v0.dim() == 1:
        dot, s0, s1 = _dot(v0, v1), _sumsq(v0), _sumsq(v1)
    else:
        dot = (v0 * v1).sum(dim=-1, keepdim=True).double()
        s0 = (v0 * v0).sum(dim=-1, keepdim=True).double()
        s1 = (v1 * v1).sum(dim=-1, keepdim=True).double()
    n0 = s0.sqrt().clamp(min=_NUSLERP_NORM_EPS)
    n1 = s1.sqrt().clamp(min=_NUSLERP_NORM_EPS)
    cos = (dot / (n0 * n1)).clamp(-1.0, 1.0)
    colinear = (1 - cos.square()) <= _NUSLERP_COLINEAR
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta).to(v0.dtype)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta).to(v0.dtype)
    return (v0 * c0).addcmul_(v1, c1)


@merge_method(
    "nuslerp", base=BASE_OPTIONAL, min_models=2, max_models=2, source="mergekit",
    help="Slerp between two models with t = w₂/(w₁+w₂) (0.5 when the weights sum to ~0). With a base, "
         "the task vectors (model − base) are slerped and added to the base. By default the whole "
         "tensor is one vector (flatten); otherwise each row along the last dim (or along dim 0 with "
         "row_wise, mergekit's naming) gets its own angle. Colinear or antipodal vectors (|sin θ| ≤ 1e-3) "
         "are lerped; mergekit's test misses them after rounding and blows them up by 1/sin θ.",
    params=(Param("weight", FLOAT, 1.0, "Relative weight of this model; t = w₂/(w₁+w₂).",
                  min=-10.0, max=10.0, step=0.01, per_model=True),
            Param("nuslerp_row_wise", BOOL, False,
                  "Without flatten: slerp the vectors along dim 0 instead of along the last dim."),
            Param("nuslerp_flatten", BOOL, True, "Treat the whole tensor as one vector.")),
)
def nuslerp(base, models, ctx, *, weight, nuslerp_row_wise, nuslerp_flatten):
    w0, w1 = (float(x) for x in ctx.host["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    shape = models.shape[1:]
    v0, v1 = models[0], models[1]
    if base is not None:
        v0 = v0 - base
        v1 = v1 - base
    if nuslerp_flatten or v0.dim() == 0:
        out = _nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif nuslerp_row_wise:
        out = _nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _nuslerp_vectors(t, v0, v1)
    if base is not None:
        out = out.add_(base)
    return out.contiguous()


# --------------------------------------------------------------------------------------------
# multislerp
# --------------------------------------------------------------------------------------------
def _check_multislerp(glob, per_model) -> Optional[str]:
    if glob.get("normalize_weights", True):
        w = per_model.get("weight") or []
        if w and abs(sum(float(x) for x in w)) < 1e-8:
            return ("the weights sum to 0, so they cannot be normalized; change the weights or turn "
                    "normalize_weights off")
    return None


@merge_method(
    "multislerp", base=BASE_OPTIONAL, min_models=1, source="mergekit",
    help="mergekit's barycentric slerp of any number of models: direction = normalized weighted mean of "
         "the unit tensors, norm = weighted mean of the norms (mergekit's tangent-space step is exactly "
         "zero there, so this is what it computes; for 2 models it equals slerp only at equal weights). "
         "With a base, task vectors are used. Where the unit mean cancels out (< eps, or < 1e-6·Σ|w| "
         "where fp32 rounding decides its direction) it falls back to the weighted linear sum for any "
         "model count (mergekit raises for more than 2, e.g. on all-zero deltas). Normalizing weights "
         "that sum to 0 is an error (mergekit divides by zero).",
    params=(Param("weight", FLOAT, 1.0, "Weight of this model.", min=-10.0, max=10.0, step=0.01,
                  per_model=True),
            Param("normalize_weights", BOOL, True, "Divide the weights by their sum."),
            Param("eps", FLOAT, 1e-8, "Stabilizer added to norms; a weighted mean shorter than this "
                                      "uses the linear fallback (> 0: a zero task vector would divide 0 by 0).",
                  min=0.0, max=1e-2, step=1e-8, min_exclusive=True)),
    check=_check_multislerp,
)
def multislerp(base, models, ctx, *, weight, normalize_weights, eps):
    n_models = models.shape[0]
    if n_models == 1:
        return models[0]
    shape = models.shape[1:]
    x = models if base is None else models - base
    flat = x.reshape(n_models, -1)
    w = weight / weight.sum() if normalize_weights else weight
    norms = _sumsq_rows(flat).sqrt().to(flat.dtype)
    c = w / (norms + eps)                 # unit-vector weights: mean = Σ c_i·x_i
    mean = _combine(c, flat)
    mean_norm = _sumsq(mean).sqrt().to(flat.dtype)
    del mean
    # fall back where the unit mean (nearly) cancels: below eps as mergekit, or below 1e-6·Σ|w|, where
    # the fp32 rounding of the sum (~1e-7·Σ|w|) dominates its direction
    small = (mean_norm < eps) | (mean_norm < 1e-6 * w.abs().sum())
    # mergekit then projects every unit vector onto the tangent plane at mean/|mean| and maps the
    # weighted tangent sum back with the exponential map.  That weighted sum is m − (m·m̂)m̂ = 0
    # identically, so the result is mean/|mean| scaled by the weighted mean norm.
    avg_norm = (w * norms).sum()
    scale = avg_norm / torch.where(small, torch.ones_like(mean_norm), mean_norm)
    coef = torch.where(small, w, c * scale)
    out = _combine(coef, flat).view(shape)
    if base is not None:
        out = out.add_(base)
    return out


# --------------------------------------------------------------------------------------------
# karcher
# --------------------------------------------------------------------------------------------
def _gram(flat: torch.Tensor) -> torch.Tensor:
    """G[i, j] = flat[i]·flat[j] (fp64, chunk-accumulated)."""
    n = flat.shape[0]
    g = torch.empty((n, n), dtype=torch.float64, device=flat.device)
    g[range(n), range(n)] = _sumsq_rows(flat)
    for i in range(n):
        for j in range(i + 1, n):
            g[i, j] = g[j, i] = _dot(flat[i], flat[j])
    return g


def _quad(g: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> float:
    b = a if b is None else b
    return float(a @ g @ b)


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's equal-weight Karcher iteration, run on the Gram matrix of the inputs.

    The mean always stays in the span of the unit inputs u_i, so it is kept as coefficients β
    (mean = Σ β_i u_i) and every dot product comes from the unit Gram matrix.  ``gram`` is a CPU
    fp64 (N, N) matrix; returns the coefficients c with result = Σ c_i x_i (on the raw inputs x_i).
    """
    n_models = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)),
                      torch.zeros_like(norms))
    unit_gram = gram * inv[:, None] * inv[None, :]
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(n_models, dtype=gram.dtype)
    alpha = valid.to(gram.dtype)
    alpha = alpha / alpha.sum()
    beta = alpha.clone()
    mean_norm = math.sqrt(max(_quad(unit_gram, beta), 0.0))
    if mean_norm < tol:
        beta = torch.zeros_like(alpha)
        beta[int(valid.nonzero()[0])] = 1.0
    else:
        beta = beta / mean_norm
    for _ in range(max_iter):
        dots = (unit_gram @ beta).clamp(-1.0, 1.0)            # u_i · mean
        theta = torch.acos(dots)
        sin_theta = torch.sin(theta)
        ratio = torch.where(sin_theta > 0, theta / torch.where(sin_theta > 0, sin_theta, torch.ones_like(theta)),
                            torch.ones_like(theta))
        k = torch.where(valid & (theta >= tol), alpha * ratio, torch.zeros_like(theta))
        gamma = k - (k @ dots) * beta                          # tangent T = Σ k_i (u_i − dot_i·mean)
        t_norm = math.sqrt(max(_quad(unit_gram, gamma), 0.0))
        if t_norm < tol or t_norm == 0.0:
            break
        beta = math.cos(t_norm) * beta + (math.sin(t_norm) / t_norm) * gamma
        unit_norm = math.sqrt(max(_quad(unit_gram, beta), 0.0))
        if unit_norm > tol:
            beta = beta / unit_norm
    scale = float(norms.sum()) / n_models                    # equal weights, zero norms included
    return scale * beta * inv


@merge_method(
    "karcher", base=BASE_NONE, min_models=1, source="mergekit",
    help="Karcher (Riemannian) mean of the models on the hypersphere with equal weights, scaled by their "
         "mean norm; tensors with a norm ≤ tol are left out of the direction. Same iteration as mergekit, "
         "but run on the models' Gram matrix: two passes over the data and one small host transfer per "
         "tensor instead of mergekit's host sync per model per iteration.",
    params=(Param("max_iter", INT, 10, "Maximum number of iterations.", min=0, max=1000, step=1),
            Param("tol", FLOAT, 1e-5, "Convergence tolerance (tangent norm) and minimum usable norm.",
                  min=0.0, max=1.0, step=1e-6)),
)
def karcher(base, models, ctx, *, max_iter, tol):
    n_models = models.shape[0]
    if n_models == 1:
        return models[0]
    flat = models.reshape(n_models, -1)
    gram = _gram(flat).to(device="cpu", dtype=torch.float64)   # the one host transfer per tensor
    coef = karcher_coefficients(gram, int(max_iter), float(tol))
    coef = coef.to(device=flat.device, dtype=flat.dtype)
    return _combine(coef, flat).view(models.shape[1:])
