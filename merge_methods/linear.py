"""mergekit's ``linear``: a weighted average of the models."""
from __future__ import annotations

import torch

from .spec import BASE_NONE, BOOL, FLOAT, Param, merge_method

WEIGHT = Param("weight", FLOAT, 1.0, "Weight of this model in the sum.", min=-10.0, max=10.0, step=0.01,
               per_model=True)


@merge_method(
    "linear", base=BASE_NONE, min_models=1, source="mergekit", elementwise=True,
    help="Weighted average Σ wᵢ·Mᵢ, divided by Σ wᵢ when normalize is on. With normalize on and weights "
         "summing to zero the sum is left undivided (mergekit divides by zero there).",
    params=(WEIGHT,
            Param("normalize", BOOL, True, "Divide by the sum of the weights.")),
)
def linear(base, models, ctx, *, weight, normalize):
    out = torch.tensordot(weight, models, dims=1)  # Σ wᵢ·Mᵢ without an (N, ...) temporary
    if normalize:
        total = weight.sum()
        out.div_(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
    return out
