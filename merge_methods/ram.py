"""mergekit's RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572), for sparse fine-tunes.

Each model's task vector δᵢ = Mᵢ − base counts only where |δᵢ| > epsilon; an entry is the mean of the
task vectors that count there, so a change only one model made is kept whole instead of being diluted
by the models that left it alone.  RAM+ (mergekit's tensor-local ``ramplus_tl``) also scales each
model's unique changes by λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), where ρᵢ is the ratio of that model's
shared to unique changed entries in the tensor.
"""
from __future__ import annotations

import torch

from .spec import BASE_REQUIRED, FLOAT, Param, SpanInputs, merge_method

EPSILON = Param("epsilon", FLOAT, 1e-5, "A task-vector entry counts as changed where |model − base| > epsilon.",
                min=0.0, max=1.0, step=1e-6)


def _counted(deltas: torch.Tensor, epsilon: float):
    """Zero the entries of the stacked deltas (N, n) that do not count, in place; the (N, n) mask of those
    that do and the (n,) number of models counting per entry."""
    keep = deltas.abs() > epsilon
    deltas.mul_(keep)       # not masked_fill: NaN/Inf must stay visible to the merge's finite check
    return keep, keep.sum(0, dtype=torch.int32)


def _mixed(base: torch.Tensor, deltas: torch.Tensor, count: torch.Tensor, unique_scale=None) -> torch.Tensor:
    """base + Σᵢ δᵢ / max(count, 1), with row i of the deltas times ``unique_scale[i]`` where only one model
    counts, in place on the deltas.  Each δᵢ is divided before the sum (as mergekit does), so a mean of huge
    finite values stays finite; the same operations on every element, so spans give the whole tensor's bits."""
    deltas.div_(count.clamp(min=1))
    if unique_scale is not None:
        alone = count == 1
        for i in range(deltas.shape[0]):
            deltas[i].mul_(torch.where(alone, unique_scale[i], 1.0))
    return deltas.sum(0).add_(base)


@merge_method(
    "ram", base=BASE_REQUIRED, min_models=1, source="mergekit", elementwise=True,
    help="RAM (Reinforced Agent Merging, mergekit): an entry of a task vector δᵢ = Mᵢ − base counts where "
         "|δᵢ| > epsilon, and each entry becomes the mean of the task vectors that count there: out = base + "
         "Σᵢ δᵢ·[|δᵢ| > ε] / max(c, 1), c = the number of models that count. A change only one model made is "
         "kept whole (an average would dilute it); entries no model changed keep the base. For sparse "
         "fine-tunes; no weights.",
    params=(EPSILON,),
)
def ram(base, models, ctx, *, epsilon):
    deltas = models.sub_(base).reshape(models.shape[0], -1)     # ``models`` is the method's own stacked copy
    _, count = _counted(deltas, epsilon)
    return _mixed(base.reshape(-1), deltas, count).reshape(base.shape)


def _unique_scale(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float) -> torch.Tensor:
    # ρᵢ = shared/unique; a model with no unique entry has nothing to scale (mergekit divides by epsilon there)
    rho = shared.double() / unique.clamp(min=1).double()
    return 1.0 + r * rho.clamp(0.0, alpha)


def _shared_unique(keep: torch.Tensor, count: torch.Tensor):
    """Per model: how many of its counted entries another model counts too, and how many only it counts."""
    unique = (keep & (count == 1)).sum(1)
    return keep.sum(1) - unique, unique


def _ramplus_streamed(inputs: SpanInputs, ctx, *, epsilon, r, alpha):
    """RAM+ on a large CPU tensor without stacking it whole: pass 1 counts each model's shared and unique
    entries span by span, pass 2 merges them."""
    if inputs.base is None:
        return None
    n = inputs.n_models
    shared = torch.zeros(n, dtype=torch.int64, device=inputs.ref.device)
    unique = torch.zeros_like(shared)
    for j in range(len(inputs.spans)):
        # check: raises for NaN/Inf in an input (not for differences that overflow), then reads the differences
        _, deltas = inputs.read_deltas(j, check=True)
        s, u = _shared_unique(*_counted(deltas, epsilon))
        shared += s
        unique += u
    scale = _unique_scale(shared, unique, r, alpha).float()
    out = inputs.new_output()
    for j in range(len(inputs.spans)):
        b32, deltas = inputs.read_deltas(j)
        _, count = _counted(deltas, epsilon)
        inputs.write(out, j, _mixed(b32, deltas, count, scale))
    return out


@merge_method(
    "ramplus_tl", base=BASE_REQUIRED, min_models=1, source="mergekit",
    streamed=lambda inputs, ctx, **p: _ramplus_streamed(inputs, ctx, **p),
    help="RAM+ (mergekit's ramplus_tl, tensor-local): RAM, with the entries only model i changed scaled by "
         "λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), where ρᵢ = (its changed entries another model changed too) / (its "
         "changed entries no other model changed), counted over the whole tensor. Entries several models "
         "changed are averaged as in RAM: out = base + Σᵢ δᵢ·[|δᵢ| > ε]·(λᵢ if c = 1 else 1/c).",
    params=(Param("r", FLOAT, 0.1, "Strength of the boost of each model's unique changes.", min=0.0, max=10.0,
                  step=0.01),
            Param("alpha", FLOAT, 0.2, "Cap on the shared/unique ratio ρ: the boost is at most 1 + r·alpha.",
                  min=0.0, max=100.0, step=0.01),
            EPSILON),
)
def ramplus_tl(base, models, ctx, *, r, alpha, epsilon):
    deltas = models.sub_(base).reshape(models.shape[0], -1)
    keep, count = _counted(deltas, epsilon)
    scale = _unique_scale(*_shared_unique(keep, count), r, alpha).to(deltas.dtype)
    del keep
    return _mixed(base.reshape(-1), deltas, count, scale).reshape(base.shape)
