"""Two-model methods: mergekit's ``nearswap``, ``arcee_fusion`` and ``passthrough``; ComfyUI's
``weighted_sum`` (ModelMergeSimple), the classic ``add_difference`` and its supermerger / sd-mecha
variants ``train_difference``, ``add_opposite``, ``add_strict_opposite`` and ``add_perpendicular``."""
from __future__ import annotations

import torch

from .ops import dot64, kth_smallest, sumsq
from .spec import BASE_NONE, BASE_REQUIRED, BOOL, FLOAT, Param, merge_method

_FUSION_EPS = 1e-8      # mergekit arcee_fusion: added to both softmaxes before the KL divergence


@merge_method(
    "nearswap", base=BASE_REQUIRED, min_models=1, max_models=1, source="mergekit", elementwise=True,
    help="Takes the model's value where it is close to the base: per element w = clamp(t/|model − base|, "
         "0, 1) and out = base + w·(model − base). Differences ≤ t are swapped in fully, larger ones "
         "only partly; t = 0 returns the base.",
    params=(Param("t", FLOAT, 0.0001, "Distance scale: elements closer than t are taken from the model.",
                  min=0.0, max=100.0, step=0.0001),),
)
def nearswap(base, models, ctx, *, t):
    model = models[0]
    w = (t / (model - base).abs_().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return torch.lerp(base, model, w)


@merge_method(
    "arcee_fusion", base=BASE_REQUIRED, min_models=1, max_models=1, source="mergekit",
    help="Keeps the model's values only where they matter most: importance = |model − base| × "
         "KL(softmax(model) ‖ softmax(base)) along the last dim; elements with importance ≥ median + "
         "1.5·IQR take the model's value, the rest keep the base. Quantiles are exact for any tensor "
         "size (mergekit estimates them from a random 1e6-element sample above 1e6 elements, so its "
         "result is not reproducible there); up to 1e6 elements both agree exactly.",
)
def arcee_fusion(base, models, ctx):
    model = models[0]
    shape = model.shape
    if model.numel() == 0:
        return base.clone()
    a = base.reshape(1) if base.dim() == 0 else base
    b = model.reshape(1) if model.dim() == 0 else model
    p = torch.softmax(b, dim=-1).add_(_FUSION_EPS)
    q = torch.softmax(a, dim=-1).add_(_FUSION_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    importance = (b - a).abs_().mul_(kl)
    flat = importance.reshape(-1)
    n = flat.numel()
    # mergekit's quantile convention: the element at sorted position floor(q·(n − 1))
    idx = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]
    q1, med, q3 = (kth_smallest(flat, i + 1) for i in idx)
    threshold = med + 1.5 * (q3 - q1)
    return torch.where(importance >= threshold, b, a).reshape(shape)


@merge_method(
    "passthrough", base=BASE_NONE, min_models=1, max_models=1, source="mergekit", elementwise=True,
    help="Copies the one input model, multiplied by its scale.",
    params=(Param("scale", FLOAT, 1.0, "Factor applied to the model.", min=-10.0, max=10.0, step=0.01,
                  per_model=True),),
)
def passthrough(base, models, ctx, *, scale):
    return models[0] * scale[0]


@merge_method(
    "weighted_sum", base=BASE_NONE, min_models=2, max_models=2, source="ComfyUI", elementwise=True,
    help="ComfyUI's ModelMergeSimple: ratio·model₁ + (1 − ratio)·model₂. The ratio is the weight of the "
         "FIRST model (ratio 1 returns model₁), the opposite of supermerger/sd-mecha's alpha.",
    params=(Param("ratio", FLOAT, 1.0, "Weight of the first model; the second gets 1 − ratio. Outside [0, 1] "
                  "it extrapolates (1.5: half a step beyond model₁, away from model₂).",
                  min=-1.0, max=2.0, step=0.01),),
)
def weighted_sum(base, models, ctx, *, ratio):
    # ComfyUI's arithmetic (calculate_weight of ModelMergeSimple's patch): W₁·ratio, then + (1 − ratio)·W₂,
    # two roundings in the compute dtype, so the weights are bit-identical to it; the exact input at 0 and 1
    ratio = float(ratio)
    if ratio == 1.0:
        return models[0].clone()
    if ratio == 0.0:
        return models[1].clone()
    return (models[0] * ratio).add_(models[1] * (1.0 - ratio))


@merge_method(
    "add_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="supermerger / sd-mecha", elementwise=True,
    result_is_model1=True,
    help="A + alpha·(B − C), with the models as A (first) and B (second) and the base as C, the model B "
         "was trained from (e.g. A = an inpainting model, B = a fine-tune, C = SD1.5). clamp_to_ab "
         "limits each element to the range spanned by A and B, as sd-mecha's option does.",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the added difference (B − C).",
                  min=-10.0, max=10.0, step=0.01),
            Param("clamp_to_ab", BOOL, False, "Clamp each result element between A's and B's values.")),
)
def add_difference(base, models, ctx, *, alpha, clamp_to_ab):
    a, b = models[0], models[1]
    out = torch.add(a, b - base, alpha=float(alpha))
    if clamp_to_ab:
        out = torch.maximum(torch.minimum(out, torch.maximum(a, b)), torch.minimum(a, b))
    return out


@merge_method(
    "train_difference", base=BASE_REQUIRED, min_models=2, max_models=2, source="supermerger / sd-mecha",
    result_is_model1=True,
    elementwise=True,
    help="supermerger's Train Difference (sd-mecha's train_difference_mask with add_difference): A + alpha·1.8·"
         "(B − C)·|B − A|/(|B − A| + |B − C|), with the models as A (first) and B (second) and the base as C, the "
         "model B was trained from. Per element, the more B differs from A compared with what its training "
         "changed, the more of B's training difference is added (none where B equals A, up to 1.8·alpha of it); "
         "elements where A, B and C are equal add nothing.",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the added difference (B − C), before the per-element "
                  "factor 1.8·|B − A|/(|B − A| + |B − C|).", min=-10.0, max=10.0, step=0.01),),
)
def train_difference(base, models, ctx, *, alpha):
    a, b = models[0], models[1]
    trained = b - base
    far = (b - a).abs_()
    share = far.div_(trained.abs().add_(far)).nan_to_num_(nan=0.0)      # 0/0 where A = B = C
    return torch.addcmul(a, share, trained, value=1.8 * float(alpha))


@merge_method(
    "add_opposite", base=BASE_REQUIRED, min_models=2, max_models=2, source="sd-mecha", result_is_model1=True,
    elementwise=True,
    help="sd-mecha's add_opposite_mask with add_difference: A + alpha·2·|A − B|/(|A − B| + |A + B − 2C|)·(B − C), "
         "with the models as A (first) and B (second) and the base as C. Per element, B's difference from C is "
         "added where A and B moved away from C in opposite directions (up to 2·alpha of it where A − C = "
         "−(B − C); alpha of it where A = C), less where they moved alike, nothing where A = B. The share is "
         "computed from halves of A, B and C (exact) as |A/2 − B/2|/(|A/2 − B/2| + |(A/2 − C/2) + (B/2 − C/2)|), "
         "which cannot overflow; 0/0 (A = B = C) adds nothing.",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the added difference (B − C), before the per-element factor "
                  "2·|A − B|/(|A − B| + |A + B − 2C|).", min=-10.0, max=10.0, step=0.01),),
)
def add_opposite(base, models, ctx, *, alpha):
    a, b_diff = models[0], models[1] - base
    # the ratio from halves (exact above 2^-125): |A − B| of finite weights can overflow, |A/2 − B/2| cannot
    half_a, half_b, half_c = a * 0.5, models[1] * 0.5, base * 0.5
    apart = (half_a - half_b).abs_()
    together = half_a.sub_(half_c).add_(half_b.sub_(half_c)).abs_()
    share = apart.div_(together.add_(apart)).nan_to_num_(nan=0.0)
    return torch.addcmul(a, share, b_diff, value=2.0 * float(alpha))


@merge_method(
    "add_strict_opposite", base=BASE_REQUIRED, min_models=2, max_models=2, source="sd-mecha", result_is_model1=True,
    elementwise=True,
    help="sd-mecha's add_strict_opposite_mask with add_difference: A + alpha·2·max(0, (C − A)(B − C)/m²)·(B − C), "
         "m = max(|A − C|, |B − C|), with the models as A (first) and B (second) and the base as C. Per element, "
         "B's difference from C is added only where it has the opposite sign of A's, in proportion to how "
         "nearly the two cancel (2·alpha of it where A − C = −(B − C)); nothing where they agree in sign or "
         "either is 0. The ratio is taken as ((C − A)/m)·((B − C)/m), which cannot overflow.",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the added difference (B − C), before the per-element factor "
                  "2·max(0, (C − A)(B − C)/m²), which is at most 2.", min=-10.0, max=10.0, step=0.01),),
)
def add_strict_opposite(base, models, ctx, *, alpha):
    a, b_diff = models[0], models[1] - base
    a_diff = a - base
    m = torch.maximum(a_diff.abs(), b_diff.abs())
    share = a_diff.div_(m).neg_().mul_(b_diff / m).nan_to_num_(nan=0.0).clamp_(min=0.0)
    return torch.addcmul(a, share, b_diff, value=2.0 * float(alpha))


@merge_method(
    "add_perpendicular", base=BASE_REQUIRED, min_models=2, max_models=2, source="sd-mecha", result_is_model1=True,
    help="sd-mecha's add_perpendicular: A + alpha·P, where P is the part of B's difference (B − C) "
         "perpendicular to A's (A − C), over the whole tensor: P = (B − C) − (A − C)·⟨A − C, B − C⟩/‖A − C‖². "
         "Adds what B learned that A has not, without pushing further along A's own change. Models: A (first), "
         "B (second); base: C, their common ancestor. Where A − C is 0 all of B − C is perpendicular to it and "
         "is added (sd-mecha adds nothing there); the dot product and norm are accumulated in fp64.",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the added perpendicular difference.",
                  min=-10.0, max=10.0, step=0.01),),
)
def add_perpendicular(base, models, ctx, *, alpha):
    a = models[0]
    a_diff, b_diff = a - base, models[1] - base
    norm2 = sumsq(a_diff)
    along = torch.where(norm2 > 0, dot64(a_diff, b_diff) / norm2.clamp(min=torch.finfo(norm2.dtype).tiny),
                        torch.zeros_like(norm2))
    perp = b_diff.sub_(a_diff.mul_(along.to(a_diff.dtype)))
    return a.add(perp, alpha=float(alpha))
