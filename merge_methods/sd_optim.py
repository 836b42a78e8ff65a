"""sd-mecha / sd-optim methods: geometric median, extended TIES (with DELLA dropout).

* ``geometric_median``: Weiszfeld's algorithm over whole tensors (each model is one point).
* ``ties_sum_extended``: TIES with sd-optim's extras (agreement threshold, weight decay) and a choice of
  combining the agreeing deltas: their mean, the mean scaled by the Model Stock factor, or their
  geometric median.
* ``ties_sum_with_dropout``: DARE/DELLA dropout of each task vector, then ``ties_sum_extended``.

The multi-domain alignment and low-rank projection methods of sd-optim live in
``sd_optim_projection.py`` (imported at the bottom).

Geometric median, implementation note: the Weiszfeld iterate is always a convex combination
Σ cᵢ·xᵢ of the points, and every distance ‖xᵢ − Σ cⱼxⱼ‖ follows from the N×N Gram matrix of the
(centred) points.  So one pass over the tensor computes the Gram matrix (in fp64, accumulated over
fixed-size blocks, so the result does not depend on ``chunk_size``), the iterations run on that
tiny matrix on the CPU (one host transfer per key, no per-iteration device sync), and a final pass
forms Σ cᵢ·xᵢ.  The iterates are those of sd-mecha's ``geometric_median``, up to rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ops import magnitude_cut, magnitude_order
from .spec import BASE_NONE, BOOL, CHOICE, FLOAT, INT, Param, merge_method, slices

# -- geometric median (Weiszfeld on the Gram matrix) ---------------------------------------------------

#: Gram partial sums are formed over blocks of this many entries; blocks are summed in one fixed-order
#: reduction, so the Gram matrix (and hence the median) is bit-identical for every chunk size.
GRAM_BLOCK = 4096
DEFAULT_CHUNK = 1 << 22


def gram64(points: torch.Tensor, chunk_size: int = DEFAULT_CHUNK, center: bool = True) -> torch.Tensor:
    """The fp64 Gram matrix of ``points`` (N, n), centred on their mean when ``center``.

    Works through at most ``chunk_size`` entries per point at a time (memory: N·chunk_size fp64).
    """
    n_pts, n = points.shape
    block = max(1, min(GRAM_BLOCK, n))
    n_blocks = -(-n // block)
    per_chunk = max(1, int(chunk_size) // block)
    parts = []
    for b0 in range(0, n_blocks, per_chunk):
        b1 = min(n_blocks, b0 + per_chunk)
        seg = points[:, b0 * block: min(n, b1 * block)].to(torch.float64)
        if center:
            seg = seg - seg.mean(dim=0, keepdim=True)
        short = (b1 - b0) * block - seg.shape[1]
        if short:
            seg = torch.nn.functional.pad(seg, (0, short))
        seg = seg.view(n_pts, b1 - b0, block).transpose(0, 1)  # (blocks, N, block)
        parts.append(torch.bmm(seg, seg.transpose(1, 2)))
        del seg
    if not parts:
        return torch.zeros((n_pts, n_pts), dtype=torch.float64, device=points.device)
    return torch.cat(parts).sum(dim=0)


def weiszfeld_coefficients(gram: torch.Tensor, weights: torch.Tensor, eps: float, maxiter: int,
                           ftol: float) -> torch.Tensor:
    """Weiszfeld's iteration on the coefficients c of the median Σ cᵢxᵢ (CPU, fp64).

    Starts at the weighted mean; each step sets cᵢ ∝ wᵢ / max(dᵢ, eps) with dᵢ the distance from
    point i to the current median, and stops after ``maxiter`` steps or when the objective
    Σ wᵢdᵢ changes by at most ``ftol``·objective (sd-mecha's rule).
    """
    g = gram.to(device="cpu", dtype=torch.float64)
    w = weights.to(device="cpu", dtype=torch.float64)
    diag = torch.diagonal(g)

    def dists(c):
        gc = g @ c
        return (diag - 2.0 * gc + torch.dot(c, gc)).clamp_(min=0.0).sqrt_()

    c = w / w.sum()
    d = dists(c)
    obj = float(torch.dot(w, d))
    for _ in range(max(0, int(maxiter))):
        nw = w / d.clamp(min=eps)
        c = nw / nw.sum()
        d = dists(c)
        new_obj = float(torch.dot(w, d))
        done = abs(obj - new_obj) <= ftol * new_obj
        obj = new_obj
        if done:
            break
    return c


def geometric_median_of(points: torch.Tensor, weights: Optional[torch.Tensor] = None, *, eps: float = 1e-6,
                        maxiter: int = 100, ftol: float = 1e-20, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Weighted geometric median of the N points stacked in ``points`` (N, *shape); fp32 result."""
    n_pts = points.shape[0]
    flat = points.reshape(n_pts, -1)
    if weights is None:
        weights = torch.ones(n_pts, dtype=torch.float64)
    if n_pts == 1 or flat.shape[1] == 0:
        c = weights.to(device="cpu", dtype=torch.float64)
        c = c / c.sum()
    else:
        c = weiszfeld_coefficients(gram64(flat, chunk_size), weights, eps, maxiter, ftol)
    c = c.to(device=points.device, dtype=points.dtype)
    return torch.tensordot(c, points, dims=1)


_EPS = Param("eps", FLOAT, 1e-6, "Weiszfeld: distances below eps count as eps (keeps a median sitting on "
             "a point finite).", min=0.0, max=1.0, step=1e-6, min_exclusive=True)
_MAXITER = Param("maxiter", INT, 100, "Weiszfeld: maximum number of iterations (0 = weighted mean).",
                 min=0, max=10000, step=1)
_FTOL = Param("ftol", FLOAT, 1e-20, "Weiszfeld: stop when the summed distance changes by at most ftol times "
              "itself.", min=0.0, max=1.0, step=1e-20)


def _positive_weights(glob, pm) -> Optional[str]:
    w = pm.get("weight", [1.0])
    if sum(float(x) for x in w) <= 0:
        return "the weights sum to zero; give at least one model a positive weight"
    return None


@merge_method(
    "geometric_median", base=BASE_NONE, min_models=1, source="sd-mecha",
    help="Geometric median: the tensor minimising Σ wᵢ·‖Mᵢ − median‖ (whole-tensor Euclidean distance), by "
         "Weiszfeld's algorithm started at the weighted mean. Robust to an outlier model, unlike the mean. "
         "No base input: the median is translation-equivariant, so the median of task vectors plus the base "
         "is the median of the models (add the base as a model to include it). Differences from sd-mecha: "
         "optional per-model weights (sd-mecha: all 1); the iterates are sd-mecha's, computed from an fp64 Gram "
         "matrix: sd-mecha iterates in fp32 and stops once the fp32 objective stalls, often before converging "
         "(1e-3 off on its own test), where this converges further.",
    params=(Param("weight", FLOAT, 1.0, "Weight of this model's distance in the sum (0 = ignore the model).",
                  min=0.0, max=10.0, step=0.01, per_model=True),
            _EPS, _MAXITER, _FTOL),
    check=_positive_weights,
)
def geometric_median(base, models, ctx, *, weight, eps, maxiter, ftol):
    w = torch.tensor(ctx.host["weight"], dtype=torch.float64) if "weight" in ctx.host else weight.double().cpu()
    return geometric_median_of(models, w, eps=eps, maxiter=maxiter, ftol=ftol)


# -- TIES (sd-mecha's ties_sum_extended, with sd-optim's extras) ---------------------------------------

def rowwise_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``x`` (N, n): a mask of exactly ``k`` largest entries (ties broken by index).

    ``kthvalue`` gives each row's threshold; only when a row has more entries equal to it than it
    needs (one host sync to decide) are the tied entries counted with a cumulative sum.
    """
    n = x.shape[1]
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    thr = torch.kthvalue(x, n - k + 1, dim=1, keepdim=True).values
    mask = x >= thr
    if bool((mask.sum(dim=1, dtype=torch.int32) == k).all()):
        return mask
    above = x > thr
    tied = mask.logical_xor_(above)
    need = k - above.sum(dim=1, keepdim=True)
    return above.logical_or_(tied.logical_and_(torch.cumsum(tied, dim=1) <= need))


def keep_top_(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, in place, all but the ``k`` entries of largest magnitude of each row of ``rows`` (N, n)
    (ties broken by index, as :func:`rowwise_topk_mask`).  fp32 rows take the span-wise cut of the
    TIES methods (a sampled bracket, then an exact count: several times faster than a row-wise
    ``kthvalue`` on big tensors, and no whole-row temporary); fp64 rows the mask."""
    if rows.dtype != torch.float32:
        return rows.mul_(rowwise_topk_mask(rows.abs(), k))
    spans = slices(rows.shape[1], rows.device)
    for row in rows:
        cut = magnitude_cut(row, k, spans)
        for j, (s, e) in enumerate(spans):
            cut.prune_(row[s:e], j)
    return rows


def _rows(shape) -> tuple:
    """(rows, row length) of the view Model Stock's cosines use: one row per output channel."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def stock_factor(filtered: torch.Tensor, cos_eps: float) -> torch.Tensor:
    """Model Stock t = N·cos/(1 + (N−1)·cos) per output row, broadcastable to one model's shape.

    cos is the mean cosine over all pairs of models, with ‖x‖·‖y‖ clamped at ``cos_eps``.  After the
    TIES filter all kept entries of a position share one sign, so cos ∈ [0, 1] and t ∈ [0, 1].
    """
    n_pts = filtered.shape[0]
    shape = tuple(filtered.shape[1:])
    if n_pts < 2:
        return torch.ones((), dtype=filtered.dtype, device=filtered.device)
    r, d = _rows(shape)
    x = filtered.reshape(n_pts, r, d).transpose(0, 1)  # (rows, N, d)
    g = torch.bmm(x, x.transpose(1, 2))  # (rows, N, N)
    nrm = torch.diagonal(g, dim1=1, dim2=2).clamp(min=0).sqrt()
    iu = torch.triu_indices(n_pts, n_pts, offset=1, device=filtered.device)
    dots = g[:, iu[0], iu[1]]
    prods = (nrm[:, iu[0]] * nrm[:, iu[1]]).clamp(min=cos_eps)
    cos = (dots / prods).mean(dim=1).clamp(0.0, 1.0)
    t = n_pts * cos / (1.0 + (n_pts - 1) * cos)
    return t.view((r,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else t.view(())


def ties_filter(deltas: torch.Tensor, k: float, vote: str, min_agreement: float = 0.0, *,
                inplace: bool = False):
    """TIES steps 1-3 on stacked task vectors (N, *shape) (overwritten when ``inplace``).

    Keeps exactly int(k·n) largest |δ| per model, elects a sign per entry (``sum``: sign of Σδ;
    ``count``: sign of Σsign(δ); a tie elects 0 = nobody agrees, as sd-mecha), keeps the non-zero
    entries agreeing with it, and drops entries where fewer than ``min_agreement``·N models agree.
    Returns (filtered deltas, number of agreeing models per entry as float).
    """
    n_pts = deltas.shape[0]
    flat = deltas.reshape(n_pts, -1)
    if not inplace:
        flat = flat.clone()
    n = flat.shape[1]
    kk = int(k * n)
    if kk < n:
        keep_top_(flat, kk)
    signs = torch.sign(flat)
    total = flat.sum(dim=0) if vote == "sum" else signs.sum(dim=0)
    agree = signs.mul_(torch.sign(total)) > 0  # same non-zero sign as the elected one
    del signs, total
    counts = agree.sum(dim=0, dtype=deltas.dtype)
    if min_agreement > 0:
        need = math.ceil(min_agreement * n_pts - 1e-9)
        ok = counts >= need
        agree.logical_and_(ok)
        counts.mul_(ok)
    flat.mul_(agree)
    return flat.view(deltas.shape), counts.view(deltas.shape[1:])


def ties_combine(filtered: torch.Tensor, counts: torch.Tensor, *, apply_stock: bool, apply_median: bool,
                 cos_eps: float, eps: float, maxiter: int, ftol: float,
                 chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """TIES step 4: the geometric median of the filtered deltas, or their mean over the agreeing
    models, optionally scaled by the Model Stock factor."""
    if apply_median:
        return geometric_median_of(filtered, eps=eps, maxiter=maxiter, ftol=ftol, chunk_size=chunk_size)
    merged = filtered.sum(dim=0).div_(counts.clamp(min=1.0))
    if apply_stock:
        merged.mul_(stock_factor(filtered, cos_eps))
    return merged


VOTE = Param("vote", CHOICE, "count", "Sign election: count = majority of the signs (sd-mecha vote_sgn=False, "
             "sd-optim vote_sgn=1, the default of both), sum = sign of the summed deltas (TIES paper; sd-mecha "
             "vote_sgn=True). A tied vote drops the entry.", choices=("count", "sum"))
K = Param("k", FLOAT, 0.2, "Fraction of each task vector's entries kept by magnitude before the vote "
          "(exactly int(k·n); 1 = no pruning).", min=0.0, max=1.0, step=0.01)
APPLY_STOCK = Param("apply_stock", BOOL, False, "Scale the mean of the agreeing deltas by the Model Stock factor "
                    "t = N·cos/(1+(N−1)·cos) (cos = mean pairwise cosine of the filtered deltas, per output row).")
APPLY_MEDIAN = Param("apply_median", BOOL, False, "Combine the filtered deltas by their geometric median "
                     "(Weiszfeld, whole tensors) instead of their mean.")
COS_EPS = Param("cos_eps", FLOAT, 1e-6, "Model Stock: the product of norms in the cosine is clamped at cos_eps.",
                min=0.0, max=1.0, step=1e-6, min_exclusive=True)
LAMBDA = Param("lambda", FLOAT, 1.0, "Scale of the merged task vector before it is added to the base "
               "(sd-mecha's alpha of add_difference_ties).", min=-10.0, max=10.0, step=0.01)


def _exclusive_combine(glob, pm) -> Optional[str]:
    if glob.get("apply_stock") and glob.get("apply_median"):
        return "apply_stock and apply_median exclude each other (the median takes no Model Stock factor)"
    return None


_TIES_DIFF = ("k keeps exactly int(k·n) entries (sd-mecha keeps every |δ| ≥ its k-th value: one more, plus ties, "
              "and k = 0 keeps the largest); apply_stock = True applies the Model Stock factor (sd-mecha's flag is "
              "inverted: its default False applies it); Model Stock averages the cosines of all pairs of models "
              "per output row (sd-mecha: consecutive pairs only, along the last dim, which for conv weights is the "
              "kernel width); entries no model keeps stay 0.")


@merge_method(
    "ties_sum_extended", min_models=1, source="sd-mecha / sd-optim",
    help="Extended TIES on task vectors δᵢ = Mᵢ − B: keep the top k of each by magnitude, elect a sign per "
         "entry, drop disagreeing entries (and entries with too little agreement), then combine what is left "
         "by its mean over the agreeing models (optionally × Model Stock factor) or by its geometric median; "
         "out = B + λ·(1 − weight_decay)·combined. Differences from sd-mecha: " + _TIES_DIFF
         + " From sd-optim: min_agreement counts models agreeing with the elected sign (sd-optim counts models "
         "with any non-zero entry); its chunked top-k (not the global k-th value) is replaced by an exact one.",
    params=(K, VOTE, APPLY_STOCK, APPLY_MEDIAN, COS_EPS, _EPS, _MAXITER, _FTOL,
            Param("weight_decay", FLOAT, 0.0, "sd-optim's shrinkage: the combined task vector is multiplied by "
                  "1 − weight_decay.", min=0.0, max=1.0, step=0.001),
            Param("min_agreement", FLOAT, 0.0, "Drop entries where fewer than this fraction of the models agree "
                  "with the elected sign (0 = off; sd-optim uses 0.3).", min=0.0, max=1.0, step=0.01),
            Param("chunk_size", INT, DEFAULT_CHUNK, "Geometric median only: entries per model processed at a time "
                  "(bounds the fp64 working memory; does not change the result).", min=GRAM_BLOCK, max=1 << 30,
                  step=GRAM_BLOCK),
            LAMBDA),
    check=_exclusive_combine,
)
def ties_sum_extended(base, models, ctx, *, k, vote, apply_stock, apply_median, cos_eps, eps, maxiter, ftol,
                      weight_decay, min_agreement, chunk_size, **kw):
    deltas = models - base
    filtered, counts = ties_filter(deltas, k, vote, min_agreement, inplace=True)
    del deltas
    merged = ties_combine(filtered, counts, apply_stock=apply_stock, apply_median=apply_median, cos_eps=cos_eps,
                          eps=eps, maxiter=maxiter, ftol=ftol, chunk_size=chunk_size)
    scale = kw["lambda"] * (1.0 - weight_decay)
    return merged.mul_(scale).add_(base)


# -- DARE / DELLA dropout, then extended TIES ------------------------------------------------------

def della_offsets(flat: torch.Tensor, della_eps: float) -> torch.Tensor:
    """(rᵢ/n − (n+1)/(2n))·della_eps per entry, rᵢ = ordinal rank (1..n, ties by index) of |δ| in its
    model's whole tensor: from −eps/2 (smallest) to +eps/2 (largest), centred on 0.

    The order: :func:`~merge_methods.ops.magnitude_order`.
    """
    n_pts, n = flat.shape
    order = magnitude_order(flat)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device)
    vals = ((ranks / n - (n + 1) / (2.0 * n)) * della_eps).to(flat.dtype)
    out = torch.empty_like(flat)
    out.scatter_(1, order, vals.unsqueeze(0).expand(n_pts, n))
    return out


@merge_method(
    "ties_sum_with_dropout", min_models=1, source="sd-mecha / sd-optim", randomized=True,
    check=_exclusive_combine,
    help="DARE/DELLA + extended TIES: each task-vector entry is kept with probability 1 − probability, shifted by "
         "its magnitude rank when della_eps ≠ 0 (the largest entry gets +della_eps/2, the smallest −della_eps/2: "
         "larger magnitudes are kept more, as in DELLA, mergekit and sd-mecha; sd-optim's code inverts this), "
         "kept entries are divided by their keep probability (rescale), then ties_sum_extended; "
         "out = B + λ·merged. Differences from sd-mecha: per-model probability; the rescale divides each kept "
         "entry by its own keep probability before TIES (sd-mecha divides the result by 1 − probability: the "
         "same when della_eps = 0 and the probabilities are equal); masks come from the seeded per-key "
         "generator; sd-optim's extra lambda_scale = 2 is not applied. " + _TIES_DIFF,
    params=(Param("probability", FLOAT, 0.9, "Drop probability of each task-vector entry (1 = drop this model "
                  "entirely, when della_eps is 0: a della_eps shifts the largest entries' keep probability above 0 "
                  "and divides them by it). k, a fraction of all entries, then changes the result only when it is "
                  "below the surviving fraction, about 1 − probability.", min=0.0, max=1.0, step=0.01, per_model=True),
            Param("della_eps", FLOAT, 0.0, "DELLA: spread of the keep probability over magnitude ranks (positive "
                  "keeps larger entries more; negative inverts, as sd-optim's code; 0 = plain DARE).",
                  min=-1.0, max=1.0, step=0.01),
            Param("rescale", BOOL, True, "Divide kept entries by their keep probability (unbiased in expectation)."),
            K, VOTE, APPLY_STOCK, APPLY_MEDIAN, COS_EPS, _EPS, _MAXITER, _FTOL, LAMBDA),
)
def ties_sum_with_dropout(base, models, ctx, *, probability, della_eps, rescale, k, vote, apply_stock, apply_median,
                          cos_eps, eps, maxiter, ftol, **kw):
    n_pts = models.shape[0]
    deltas = models - base
    flat = deltas.view(n_pts, -1)
    keep_p = (1.0 - probability).view(n_pts, 1)
    if della_eps != 0 and flat.shape[1] > 0:
        keep_p = (keep_p + della_offsets(flat, della_eps)).clamp_(0.0, 1.0)
    keep = ctx.uniform(flat.shape, transient=True) < keep_p
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    if rescale:
        flat = torch.where(keep, flat / keep_p.clamp(min=torch.finfo(flat.dtype).tiny), zero)
    else:
        flat = torch.where(keep, flat, zero)
    del keep, keep_p, deltas
    filtered, counts = ties_filter(flat.view(models.shape), k, vote, inplace=True)
    del flat
    merged = ties_combine(filtered, counts, apply_stock=apply_stock, apply_median=apply_median, cos_eps=cos_eps,
                          eps=eps, maxiter=maxiter, ftol=ftol)
    lam = kw["lambda"]
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(base)


from . import sd_optim_projection  # noqa: E402,F401  (multi_domain_alignment, lowrank_orthogonal_projection)
