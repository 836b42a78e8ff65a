"""mergekit's generalized task arithmetic family and the sparsifiers it uses.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear.
Each model contributes its task vector δᵢ = Mᵢ − B:

1. (sparsifying methods) δᵢ is pruned per model: by magnitude (TIES), magnitude with the top outliers
   removed (breadcrumbs), at random (DARE) or at random with magnitude-ranked keep probabilities
   (DELLA), then optionally rescaled (``rescale``).
2. The pruned deltas are weighted: wᵢ·δᵢ.
3. (TIES-style methods) a sign is elected per entry (``consensus`` sum or count) and only the weighted
   deltas agreeing with it are summed; ``normalize`` divides by the summed weights of the agreeing
   models.  Without consensus, ``normalize`` divides by Σ wᵢ.
4. The result is B + λ·mixed.

Semantics follow mergekit (``generalized_task_arithmetic.py`` / ``sparsify.py``) with these
documented differences: magnitude pruning keeps exactly int(density·n) entries (mergekit 0.1.5 keeps
at least one, older versions asserted); breadcrumbs with gamma·n < 1 removes no outliers instead of
zeroing the whole delta (old mergekit); DELLA gives a row of length 1 (and 0-d/1-element tensors)
keep probability = density instead of NaN and accepts density ± epsilon touching 0 or 1;
``rescale`` is a choice (l1 = mergekit's rescale=true, inverse_density = the DARE/DELLA papers'
1/p, none = rescale=false); mergekit's ``int8_mask`` (a memory switch) is not exposed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .ops import CutSearch, abs_sum64, exact_cut, magnitude_cut, magnitude_order, sample_stride, topk_mask
from .spec import BOOL, CHOICE, FLOAT, Param, SpanInputs, merge_method, slices

# -- parameters (shared by every method of the family) ---------------------------------------------

WEIGHT = Param("weight", FLOAT, 1.0, "Weight of this model's task vector (model − base).", min=-10.0, max=10.0,
               step=0.01, per_model=True)
DENSITY = Param("density", FLOAT, 1.0, "Fraction of this model's task-vector entries kept (1 = no pruning).",
                min=0.0, max=1.0, step=0.01, per_model=True)
GAMMA = Param("gamma", FLOAT, 0.01, "Fraction of the largest-magnitude entries removed as outliers "
              "(ignored when density is 1).", min=0.0, max=1.0, step=0.001, per_model=True)
EPSILON = Param("epsilon", FLOAT, 0.15, "Spread of the keep probability: density − epsilon for the smallest "
                "entry of a row up to density + epsilon for the largest. density ± epsilon must stay in [0, 1].",
                min=0.0, max=0.5, step=0.01, per_model=True)
LAMBDA = Param("lambda", FLOAT, 1.0, "Scale of the merged task vector before it is added to the base.",
               min=-10.0, max=10.0, step=0.01)

RESCALE_CHOICES = ("l1", "inverse_density", "none")
_RESCALE_HELP = ("Rescale each pruned task vector: l1 = match its L1 norm before pruning (mergekit's rescale); "
                 "inverse_density = divide kept entries by their keep probability (the DARE/DELLA papers' 1/p; "
                 "1/density for magnitude pruning); none.")


def _normalize(default: bool, consensus: bool) -> Param:
    what = "the summed weights of the models agreeing with the elected sign" if consensus else "Σ weights"
    return Param("normalize", BOOL, default, f"Divide the merged task vector by {what} (left undivided where "
                 "that sum is 0).")


def _rescale(default: str) -> Param:
    return Param("rescale", CHOICE, default, _RESCALE_HELP, choices=RESCALE_CHOICES)


def _consensus(with_off: bool) -> Param:
    choices = ("sum", "count", "off") if with_off else ("sum", "count")
    text = ("Sign election: sum = sign of Σ wᵢδᵢ (TIES paper), count = majority of the signs"
            + (", off = no election (plain sum, as dare_linear)." if with_off else "."))
    return Param("consensus", CHOICE, "sum", text, choices=choices)


# -- sparsifiers (one model's tensor at a time) ----------------------------------------------------

def magnitude_mask(x: torch.Tensor, density: float) -> Optional[torch.Tensor]:
    """Keep exactly ``int(density·n)`` entries of largest ``|x|`` (ties by index); None = keep all.

    The plain definition (one boolean mask); :func:`sparsify_` gets the same result span by span."""
    if density >= 1:
        return None
    return topk_mask(x.abs(), int(density * x.numel()))


def _outlier_count(n: int, density: float, gamma: float) -> int:
    return min(int(gamma * n), n - int(density * n))


def outlier_mask(x: torch.Tensor, density: float, gamma: float) -> Optional[torch.Tensor]:
    """Model Breadcrumbs: drop the ``int(gamma·n)`` largest ``|x|``, keep the next ``int(density·n)``.

    The outlier count shrinks when both would not fit (so exactly ``int(density·n)`` entries stay);
    ``gamma·n < 1`` removes no outliers.  None = keep all (density >= 1; gamma is then ignored, as in
    mergekit).
    """
    if density >= 1:
        return None
    n = x.numel()
    keep = int(density * n)
    top = _outlier_count(n, density, gamma)
    mag = x.abs()
    mask = topk_mask(mag, keep + top)
    if top > 0:
        mask &= ~topk_mask(mag, top)
    return mask


def della_keep_prob(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's (MagPrune) keep probabilities: linear in the magnitude rank of each entry.

    Ranks of ``|x|`` run along dim 1 for tensors with >= 2 dims (as mergekit; for conv weights that
    is the input-channel axis) and over the whole tensor for 0-d/1-d ones.  An entry of rank r
    (0 = smallest, ties by index) in a row of length m gets ``density − ε + 2ε·r/(m − 1)``; a row of
    length 1 gets ``density`` (mergekit divides 0 by 0 there).
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    m = rows.shape[1]
    if m <= 1 or rows.numel() == 0:
        return torch.full_like(x, float(density))
    view = [1] * rows.dim()
    view[1] = m
    order = magnitude_order(rows)
    rank = torch.arange(m, dtype=x.dtype, device=x.device).view(view).expand_as(rows)
    prob = torch.empty_like(rows).scatter_(1, order, rank)
    del order
    prob.mul_(2.0 * epsilon / (m - 1)).add_(density - epsilon)
    return prob.view(x.shape)


def _host(ctx, name: str, values: torch.Tensor) -> List[float]:
    """The Python values of a per-model parameter (no device sync when the context has them)."""
    host = ctx.host.get(name) if ctx is not None and ctx.host else None
    if host is None:
        host = values.tolist()
    return [float(v) for v in host]


def _below(u: torch.Tensor, limit) -> torch.Tensor:
    """1.0 where ``u < limit``, else 0.0, by float arithmetic (sign(limit − u) clamped at 0; the
    difference of two floats is 0 only when they are equal).  Boolean masks cost several times more
    on the CPU."""
    return torch.rsub(u, limit).sign_().clamp_(min=0.0)


def sparsify_(deltas: torch.Tensor, ctx, method: str, density: Sequence[float], rescale: str,
              gamma: Optional[Sequence[float]] = None, epsilon: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Prune the stacked task vectors ``deltas`` (N, ...) in place, model by model; returns ``deltas``.

    ``method``: magnitude | outliers | random | della.  Random methods always draw one uniform number
    per entry for every model, in model order, so a model's mask depends only on (seed, key, its
    index) and grows monotonically with its density.  A model with density >= 1 is left unchanged
    (not rescaled); density <= 0 zeroes it.  The magnitude methods work span by span (see
    :func:`~merge_methods.spec.slices`): no whole-tensor temporary besides ``deltas`` itself.
    """
    randomized = method in ("random", "della")
    if not randomized and method not in ("magnitude", "outliers"):
        raise ValueError(f"unknown sparsification {method!r}")
    if rescale not in ("none", "l1", "inverse_density"):
        raise ValueError(f"unknown rescale {rescale!r}")
    rows = deltas.view(deltas.shape[0], -1)        # pruned in place: must be a view
    n = rows.shape[1]
    spans = slices(n, deltas.device)
    for i in range(rows.shape[0]):
        x = rows[i]
        u = ctx.uniform(deltas.shape[1:], transient=True).reshape(-1) if randomized else None
        d = float(density[i])
        if d >= 1:
            continue
        if d <= 0:
            x.zero_()
            continue
        before = after = None
        if rescale == "l1":         # norms: fp64 sums of fp32 chunk sums (the same for any thread count)
            before = torch.zeros((), dtype=torch.float64, device=x.device)
            after = torch.zeros((), dtype=torch.float64, device=x.device)
        prob = None
        if randomized:
            if method == "della":
                prob = della_keep_prob(x.view(deltas.shape[1:]), d, float(epsilon[i])).reshape(-1)
            for s, e in spans:
                part = x[s:e]
                if before is not None:
                    before += abs_sum64(part)
                part.mul_(_below(u[s:e], prob[s:e] if prob is not None else d))
                if after is not None:
                    after += abs_sum64(part)
            del u
        elif x.dtype != torch.float32:
            # the span-wise cut reads fp32 bit patterns: fp64 (compute_dtype fp64) takes the plain definition
            if before is not None:
                before += abs_sum64(x)
            keep = magnitude_mask(x, d) if method == "magnitude" else outlier_mask(x, d, float(gamma[i]))
            if keep is not None:
                x.masked_fill_(~keep, 0.0)
            if after is not None:
                after += abs_sum64(x)
        else:
            top = _outlier_count(n, d, float(gamma[i])) if method == "outliers" else 0
            cut = magnitude_cut(x, int(d * n) + top, spans)
            outliers = magnitude_cut(x, top, spans) if top > 0 else None
            for j, (s, e) in enumerate(spans):
                part = x[s:e]
                if before is not None:
                    before += abs_sum64(part)
                _prune_span(part, j, cut, outliers)
                if after is not None:
                    after += abs_sum64(part)
        if rescale == "l1":
            ok = (before >= 1e-7) & (after >= 1e-7)
            scale = torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
            x.mul_(scale.to(x.dtype))
        elif rescale == "inverse_density":
            if prob is None:
                x.mul_(1.0 / d)
            else:
                # kept entries had u < prob, so prob > 0 there; pruned entries are 0 already
                x.div_(prob.clamp_(min=torch.finfo(prob.dtype).tiny))
    return deltas


def _prune_span(part: torch.Tensor, j: int, cut, outliers) -> None:
    """Span ``j`` of one model's delta, in place: keep what ``cut`` keeps, minus what ``outliers`` (the
    breadcrumbs' top entries, or None) keeps."""
    top_part = outliers.prune_(part.clone(), j) if outliers is not None else None
    cut.prune_(part, j)
    if top_part is not None:
        part.sub_(top_part)         # the outliers (kept by both cuts) become exactly 0


def _sum_rows(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 of a (N, c) tensor into ``out``, in row order (cheaper than ``sum(dim=0)`` here)."""
    if rows.shape[0] == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for r in rows[2:]:
        out.add_(r)
    return out


def combine(base: torch.Tensor, deltas: torch.Tensor, weight: torch.Tensor, weight_host: Sequence[float], *,
            consensus: Optional[str], normalize: bool, lam: float) -> torch.Tensor:
    """Steps 2-4: weight, elect signs (consensus sum/count; None/'off' = none), normalize, add λ·mixed.

    Works span by span (every step is per element, see :func:`_combine_span`); ``deltas`` is overwritten.
    """
    _check_consensus(consensus)
    n_models = deltas.shape[0]
    rows = deltas.reshape(n_models, -1)
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    for s, e in slices(flat_base.numel(), flat_base.device):
        _combine_span(rows[:, s:e], flat_base[s:e], out[s:e], weight, weight_host, consensus=consensus,
                      normalize=normalize, lam=lam)
    return out.view(base.shape)


def _check_consensus(consensus: Optional[str]) -> None:
    if consensus not in (None, "off", "sum", "count"):
        raise ValueError(f"unknown consensus {consensus!r}")


def _combine_span(part: torch.Tensor, base: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor,
                  weight_host: Sequence[float], *, consensus: Optional[str], normalize: bool, lam: float) -> None:
    """:func:`combine` of one span: ``part`` (N, c) deltas (overwritten), ``base`` (c,) fp32; the result is
    written to ``dest`` (c,), of any float dtype: computed in fp32 and rounded once, on the write.

    Float arithmetic only.  With an elected sign s (+1 or −1; a zero total elects +1), the entries that
    agree with it are those with wᵢδᵢ·s > 0, so Σ of the agreeing wᵢδᵢ is s·Σ max(wᵢδᵢ·s, 0) and their
    count is sign(max(·, 0)).  Steps that cannot change a bit are skipped (the multiplications by
    weights that are all 1) or folded: s goes on the divisor, as (s·M)/d = M/(s·d) exactly, and
    base + M/d is one addcdiv.
    """
    w = [float(v) for v in weight_host]
    unit = all(v == 1.0 for v in w)
    column = weight.view(-1, 1)
    if not unit:
        part.mul_(column)
    if consensus in (None, "off"):
        mixed = _sum_rows(part, torch.empty_like(base))
        if normalize and abs(sum(w)) >= 1e-8:
            mixed.div_(sum(w))
    else:
        total = _sum_rows(part if consensus == "sum" else torch.sign(part), torch.empty_like(base))
        # +1 / −1 by the total's sign bit: a total of +0 elects +1; −0 only arises when every entry is
        # ±0, and then nothing agrees whichever sign is elected
        elected = torch.copysign(_ONE, total, out=total)
        part.mul_(elected).clamp_(min=0.0)                   # agreeing entries, made positive
        mixed = _sum_rows(part, torch.empty_like(base))      # M = s·(Σ of the agreeing entries)
        if not normalize:
            mixed.mul_(elected)
        else:
            agree = part.sign_()                             # 1 where model i agrees, else 0
            if not unit:
                agree.mul_(column)                           # wᵢ where model i agrees
            divisor = _sum_rows(agree, agree[0])
            if min(w) > 0:
                # a zero divisor means nothing agrees, so mixed is 0 there: any positive divisor leaves it
                # 0, and every non-zero divisor is at least min(w), which the clamp leaves alone
                divisor.clamp_(min=min(w))
            else:
                # a zero divisor (nothing agrees, or weights cancelling) divides by 1 instead
                divisor.add_(torch.sign(divisor).abs_().neg_().add_(1.0))
            divisor.mul_(elected)
            if lam == 1:
                torch.addcdiv(base, mixed, divisor, out=dest)
                return
            mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    torch.add(mixed, base, out=dest)


_ONE = torch.tensor(1.0)


def _gta(base, models, ctx, *, weight, consensus, normalize, lam, method=None, density=None, rescale="none",
         gamma=None, epsilon=None):
    # A method's ``streamed`` implementation calls the method itself with a SpanInputs in place of the
    # stacked models (``lambda inputs, ctx, **p: ties(None, inputs, ctx, **p)``): one declaration of its
    # settings serves both paths.
    if isinstance(models, SpanInputs):
        return _gta_streamed(models, ctx, weight=weight, consensus=consensus, normalize=normalize, lam=lam,
                             method=method, density=density, rescale=rescale, gamma=gamma, epsilon=epsilon)
    deltas = models.sub_(base)          # ``models`` is the method's own stacked copy
    if method is not None:
        sparsify_(deltas, ctx, method, _host(ctx, "density", density), rescale,
                  gamma=None if gamma is None else _host(ctx, "gamma", gamma),
                  epsilon=None if epsilon is None else _host(ctx, "epsilon", epsilon))
    return combine(base, deltas, weight, _host(ctx, "weight", weight), consensus=consensus, normalize=normalize,
                   lam=lam)


def _gta_streamed(inputs, ctx, *, weight, consensus, normalize, lam, method=None, density=None, rescale="none",
                  gamma=None, epsilon=None):
    """:func:`_gta` for magnitude pruning (TIES, breadcrumbs) on a large CPU tensor, without stacking
    the inputs: pass 1 reads the spans, checks them and finds each model's magnitude cut
    (:class:`~merge_methods.ops.CutSearch`); pass 2 reads them again, prunes and combines.  Every
    element goes through the same operations as in :func:`_gta`, so the bits are the same.  Random
    pruning and l1 rescaling (whole-tensor draws and norms) are left to :func:`_gta` (returns None)."""
    if method not in ("magnitude", "outliers") or rescale not in ("none", "inverse_density") or inputs.base is None:
        return None
    _check_consensus(consensus)
    dens = _host(ctx, "density", density)
    gam = _host(ctx, "gamma", gamma) if method == "outliers" else None
    n, n_models = inputs.numel, inputs.n_models
    searches = {}               # model -> (search for its kept + outlier entries, search for its outliers)
    stride = sample_stride(n)
    sample = None
    if stride is not None:
        b_s, m_s = inputs.strided(stride)
        sample = m_s.sub_(b_s).abs_()
    for i in range(n_models):
        if 0 < dens[i] < 1:
            top = _outlier_count(n, dens[i], gam[i]) if gam is not None else 0
            pick = None if sample is None else sample[i]
            searches[i] = (CutSearch(n, int(dens[i] * n) + top, pick),
                           CutSearch(n, top, pick) if top > 0 else None)
    del sample
    # pass 1: count and gather around each bracket, and check every span: a scan sees NaN/Inf in what it
    # scans, other models' differences are checked apart
    for j in range(len(inputs.spans)):
        b32, stacked = inputs.read_deltas(j)
        finite, unscanned = True, []
        for i in range(n_models):
            scans = [search for search in searches.get(i, ()) if search is not None and search.scanning]
            for search in scans:
                finite &= search.scan(stacked[i])
            if not scans:
                unscanned.append(i)
        if not (finite and inputs.deltas_finite(j, stacked, unscanned)):
            inputs.check_span(j)        # raises for NaN/Inf in an input (not for differences that overflow)
    cuts = {}
    for i, pair in searches.items():
        cuts[i] = tuple(None if search is None else _finish(search, inputs, i) for search in pair)
    # pass 2: prune and combine span by span
    out = inputs.new_output()
    w = _host(ctx, "weight", weight)
    for j, (s, e) in enumerate(inputs.spans):
        b32, stacked = inputs.read_deltas(j)
        for i in range(n_models):
            if dens[i] <= 0:
                stacked[i].zero_()
            elif i in cuts:
                _prune_span(stacked[i], j, *cuts[i])
                if rescale == "inverse_density":
                    stacked[i].mul_(1.0 / dens[i])
        _combine_span(stacked, b32, out.view(-1)[s:e], weight, w, consensus=consensus, normalize=normalize,
                      lam=lam)
    return out


def _finish(search, inputs, i: int):
    """The search's cut, or the exact one from all of model i's magnitudes when its bracket missed."""
    found = search.result()
    if found is None:
        mags = [inputs.read_deltas(j)[1][i].abs() for j in range(len(inputs.spans))]
        found = exact_cut(mags, search.k)
    return found


def _della_check(glob, pm) -> Optional[str]:
    dens, eps = pm.get("density", [1.0]), pm.get("epsilon", [0.15])
    n = max(len(dens), len(eps))
    for i in range(n):
        d = float(dens[i if len(dens) > 1 else 0])
        e = float(eps[i if len(eps) > 1 else 0])
        if 0 < d < 1 and (d - e < 0 or d + e > 1):
            return (f"density ± epsilon must lie in [0, 1] (model {i + 1}: density {d:g}, epsilon {e:g}); "
                    f"lower epsilon or move density away from 0 and 1")
    return None


_MK = " Differences from mergekit: "
_EXACT = "magnitude pruning keeps exactly int(density·n) entries (mergekit 0.1.5 keeps at least 1)"


# -- the methods -----------------------------------------------------------------------------------

@merge_method(
    "task_arithmetic", min_models=1, source="mergekit", elementwise=True,
    help="Task arithmetic: B + λ·Σ wᵢ(Mᵢ − B), divided by Σ wᵢ when normalize is on.",
    params=(WEIGHT, _normalize(False, False), LAMBDA),
)
def task_arithmetic(base, models, ctx, *, weight, normalize, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=None, normalize=normalize, lam=kw["lambda"])


@merge_method(
    "ties", min_models=1, source="mergekit",
    streamed=lambda inputs, ctx, **p: ties(None, inputs, ctx, **p),
    help="TIES: keep the top density fraction of each task vector by magnitude, elect a sign per entry, "
         "and sum (normalize: average by weight) the weighted deltas that agree with it." + _MK + _EXACT + ".",
    params=(WEIGHT, DENSITY, _normalize(True, True), _rescale("none"), _consensus(False), LAMBDA),
)
def ties(base, models, ctx, *, weight, density, normalize, rescale, consensus, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=consensus, normalize=normalize, lam=kw["lambda"],
                method="magnitude", density=density, rescale=rescale)


@merge_method(
    "dare_linear", min_models=1, source="mergekit", randomized=True,
    help="DARE + task arithmetic: drop each task-vector entry with probability 1 − density, rescale, then "
         "B + λ·Σ wᵢδᵢ. rescale l1 (default) is mergekit's norm matching; inverse_density is the DARE "
         "paper's 1/density.",
    params=(WEIGHT, DENSITY, _normalize(False, False), _rescale("l1"), LAMBDA),
)
def dare_linear(base, models, ctx, *, weight, density, normalize, rescale, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=None, normalize=normalize, lam=kw["lambda"],
                method="random", density=density, rescale=rescale)


@merge_method(
    "dare_ties", min_models=1, source="mergekit", randomized=True,
    help="DARE + TIES: drop each task-vector entry with probability 1 − density, rescale, then merge with "
         "TIES sign election. rescale l1 (default) is mergekit's norm matching; inverse_density is the DARE "
         "paper's 1/density.",
    params=(WEIGHT, DENSITY, _normalize(False, True), _rescale("l1"), _consensus(True), LAMBDA),
)
def dare_ties(base, models, ctx, *, weight, density, normalize, rescale, consensus, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=consensus, normalize=normalize, lam=kw["lambda"],
                method="random", density=density, rescale=rescale)


_BREADCRUMBS_MK = (_MK + "gamma·n < 1 (or gamma 0) removes no outliers, where old mergekit zeroed the whole "
                   "task vector.")


@merge_method(
    "breadcrumbs", min_models=1, source="mergekit",
    streamed=lambda inputs, ctx, **p: breadcrumbs(None, inputs, ctx, **p),
    help="Model Breadcrumbs: drop the gamma fraction of largest-magnitude outliers and keep the next density "
         "fraction of each task vector, then B + λ·Σ wᵢδᵢ." + _BREADCRUMBS_MK,
    params=(WEIGHT, DENSITY, GAMMA, _normalize(False, False), _rescale("none"), LAMBDA),
)
def breadcrumbs(base, models, ctx, *, weight, density, gamma, normalize, rescale, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=None, normalize=normalize, lam=kw["lambda"],
                method="outliers", density=density, gamma=gamma, rescale=rescale)


@merge_method(
    "breadcrumbs_ties", min_models=1, source="mergekit",
    streamed=lambda inputs, ctx, **p: breadcrumbs_ties(None, inputs, ctx, **p),
    help="Model Breadcrumbs pruning (drop gamma outliers, keep the next density fraction) followed by TIES "
         "sign election." + _BREADCRUMBS_MK,
    params=(WEIGHT, DENSITY, GAMMA, _normalize(False, True), _rescale("none"), _consensus(False), LAMBDA),
)
def breadcrumbs_ties(base, models, ctx, *, weight, density, gamma, normalize, rescale, consensus, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=consensus, normalize=normalize, lam=kw["lambda"],
                method="outliers", density=density, gamma=gamma, rescale=rescale)


_DELLA_MK = (" Magnitude ranks run along dim 1 (input channels of conv/linear weights) as in mergekit." + _MK
             + "rows of length 1 keep with probability density (mergekit: NaN); density ± epsilon may touch 0 "
               "or 1; inverse_density divides each kept entry by its own keep probability.")


@merge_method(
    "della", min_models=1, source="mergekit", randomized=True, check=_della_check,
    help="DELLA: drop task-vector entries at random with keep probability rising with magnitude rank "
         "(density ± epsilon), rescale, then TIES sign election." + _DELLA_MK,
    params=(WEIGHT, DENSITY, EPSILON, _normalize(True, True), _rescale("l1"), _consensus(False), LAMBDA),
)
def della(base, models, ctx, *, weight, density, epsilon, normalize, rescale, consensus, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=consensus, normalize=normalize, lam=kw["lambda"],
                method="della", density=density, epsilon=epsilon, rescale=rescale)


@merge_method(
    "della_linear", min_models=1, source="mergekit", randomized=True, check=_della_check,
    help="DELLA pruning (keep probability density ± epsilon by magnitude rank), rescale, then "
         "B + λ·Σ wᵢδᵢ without sign election." + _DELLA_MK,
    params=(WEIGHT, DENSITY, EPSILON, _normalize(False, False), _rescale("l1"), LAMBDA),
)
def della_linear(base, models, ctx, *, weight, density, epsilon, normalize, rescale, **kw):
    return _gta(base, models, ctx, weight=weight, consensus=None, normalize=normalize, lam=kw["lambda"],
                method="della", density=density, epsilon=epsilon, rescale=rescale)
