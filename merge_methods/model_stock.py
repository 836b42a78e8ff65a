"""mergekit's ``model_stock`` (Model Stock, arXiv 2403.19522)."""
from __future__ import annotations

import torch

from .ops import dot64, sumsq_rows
from .spec import BOOL, Param, merge_method


@merge_method(
    "model_stock", min_models=2, source="mergekit",
    help="Model Stock: t = N·cos/(1 + (N−1)·cos) from the mean pairwise cosine of the task vectors, "
         "out = t·mean(models) + (1−t)·base; t = 0 (base) where 1 + (N−1)·cos ≈ 0. Difference from mergekit: "
         "the cosine is exact for any scale (mergekit clamps ‖a‖‖b‖ at 1e-6, which shrinks the cosine of "
         "tiny deltas toward 0); a zero task vector gives cosine 0.",
    params=(Param("filter_wise", BOOL, False, "One t per row along the last dimension instead of one per "
                  "tensor."),),
)
def model_stock(base, models, ctx, *, filter_wise):
    n = models.shape[0]
    off = models - base
    rows = filter_wise and base.dim() >= 1
    vec = off if rows else off.reshape(n, -1)
    if rows:
        norms = torch.linalg.vector_norm(vec, dim=-1)
    else:               # whole-tensor reductions in fp64 chunks: the same for any thread count
        norms = sumsq_rows(vec).sqrt()
    cos_sum = None
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(vec[i], vec[j], dim=-1) if rows else dot64(vec[i], vec[j])
            prod = norms[i] * norms[j]
            cos = torch.where(prod > 0, dot / torch.where(prod > 0, prod, torch.ones_like(prod)),
                              torch.zeros_like(dot)).clamp_(-1.0, 1.0)
            cos_sum = cos if cos_sum is None else cos_sum.add_(cos)
    cos = cos_sum / (n * (n - 1) // 2)
    den = 1.0 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
    t = t.to(off.dtype)
    if rows:
        t = t.unsqueeze(-1)
    return off.mean(dim=0).mul_(t).add_(base)
