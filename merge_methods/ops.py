"""Tensor helpers shared by several methods: exact top-k masks, sign consensus, norm rescaling."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


_SAMPLE = 1 << 16        # largest sample used to bracket the k-th value
_MIN_SAMPLE = 1 << 14    # smallest (tensors up to 4x this are not sampled)
# smallest when the tensor is itself a sample or the entries a bracket gathered: those are 16K-300K long,
# where kthvalue costs 0.8 ms per 64K (it is no faster on the heavy ties of fp16 differences), and a sample
# of 4096 brackets the answer tightly enough (65K: 0.82 -> 0.40 ms; 221K candidates: 3.1 -> 1.3 ms)
_MIN_SUBSAMPLE = 1 << 12


def _sample_size(n: int, least: int = _MIN_SAMPLE) -> int:
    """Entries sampled from a length-``n`` tensor to bracket its k-th value: n/32 between the bounds.  The
    bracket's width in ranks grows as the sample shrinks, so a big tensor wants a big sample (fewer
    entries land inside the bracket), while a mid-size one pays more for a big sample's ``kthvalue``
    than it saves."""
    return min(_SAMPLE, max(n // 32, least))


def kth_largest(flat: torch.Tensor, k: int, least: int = _MIN_SAMPLE) -> torch.Tensor:
    """The exact k-th largest value of a 1-D tensor (1 <= k <= n), as a 0-d tensor.

    ``torch.kthvalue`` is exact but slow on big tensors (0.6 s for 15M elements on 2 cores).  We
    bracket the answer with a deterministic strided sample, count the entries above the bracket,
    and run ``kthvalue`` only on the few entries inside it.  The bracket is verified by counting, so
    the result is always exact; a bracket that misses (adversarial layouts) falls back to a full sort.
    ``least``: the smallest sample (see :func:`_sample_size`).
    """
    n = flat.numel()
    if k == 1:
        return flat.amax()
    if k == n:
        return flat.amin()
    stride = sample_stride(n, least)
    if stride is None:
        return torch.kthvalue(flat, n - k + 1).values
    lo, hi, lo_open, hi_open = _sample_bracket(flat[::stride], k, n)
    # near an end of the order the margin runs past the sample's own extreme, which need not bound the
    # answer: the tensor's extreme does (a min / max pass, instead of the sort a missed bracket costs)
    if lo_open:
        lo = flat.amin()
    if hi_open:
        hi = flat.amax()
    n_above = int(torch.count_nonzero(flat > hi))
    n_inside_or_above = int(torch.count_nonzero(flat >= lo))
    if not (n_above < k <= n_inside_or_above):
        # a sort, not kthvalue: the bracket misses on ordered layouts (the k-th largest beyond the last
        # sampled entry of a sorted tensor), where kthvalue's quickselect turns quadratic (40 s for 1.2M
        # descending values)
        return torch.sort(flat).values[n - k]
    inside = flat[(flat >= lo) & (flat <= hi)]
    r = k - n_above                                   # rank of the answer among the inside entries
    return torch.kthvalue(inside, inside.numel() - r + 1).values


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest value of a 1-D tensor (1 <= k <= n), as a 0-d tensor (:func:`kth_largest`)."""
    return kth_largest(flat, flat.numel() - k + 1)


def _sample_bracket(sample: torch.Tensor, k: int, n: int) -> Tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """``(lo, hi, lo_open, hi_open)``: values (0-d) of a sample of a length-``n`` tensor that bracket its k-th
    largest value with a wide margin (6 standard deviations of a binomial rank, plus 64); ``lo_open`` /
    ``hi_open`` where the margin reaches past the sample's smallest / largest value."""
    m = sample.numel()
    q = 1.0 - k / n                                  # fraction of entries below the answer
    j = q * (m - 1)
    margin = 6.0 * (m * q * (1.0 - q)) ** 0.5 + 64
    lo_rank, hi_rank = max(int(j - margin), 0) + 1, min(int(j + margin) + 1, m - 1) + 1
    lo = kth_largest(sample, m - lo_rank + 1, _MIN_SUBSAMPLE)     # the lo_rank-th smallest
    # the hi_rank-th smallest is among the entries above lo (a fifth of the sample at density 0.2),
    # unless it equals lo
    upper = sample[sample > lo]
    n_at_most_lo = m - upper.numel()
    hi = lo if hi_rank <= n_at_most_lo else torch.kthvalue(upper, hi_rank - n_at_most_lo).values
    return lo, hi, j - margin < 0, j + margin + 1 > m - 1


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of ``x`` (any shape; ties broken by index).

    No ``torch.quantile`` (it refuses more than 16M elements): the threshold comes from
    :func:`kth_largest`, and entries equal to it are kept in index order until the count is exact.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    thr = kth_largest(flat, k)
    above = flat > thr
    tied = flat == thr
    need = k - torch.count_nonzero(above)
    n_tied = torch.count_nonzero(tied)
    if bool(n_tied == need):                          # the usual case: no tie to break
        return (above | tied).view(x.shape)
    # keep the first `need` tied entries in index order (only the tied ones are indexed: fp16 task
    # vectors tie often, and a cumulative sum over the whole tensor would cost more than the rest)
    first = torch.nonzero(tied).squeeze(1)[: int(need)]
    return above.index_fill_(0, first, True).view(x.shape)


def _float_below(v: float) -> float:
    """The largest float32 smaller than ``v``."""
    t = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-math.inf)))


def _count(t: torch.Tensor) -> int:
    """Number of non-zero entries of a float tensor, which it overwrites (with its signs), by float
    arithmetic: comparisons that produce bool tensors run several times slower on the CPU.  Σ sign(t)²
    is one BLAS dot, exact while its partial sums are integers below 2^24; longer tensors are summed
    in fp64."""
    ones = t.sign_().reshape(-1)
    if ones.numel() <= 1 << 24:
        return int(torch.dot(ones, ones))
    return int(ones.abs_().sum(dtype=torch.float64))


class MagnitudeCut:
    """Keeps exactly the ``k`` entries of largest magnitude of a tensor (ties broken by index), applied
    span by span in index order with :meth:`prune_`.

    Built by :func:`magnitude_cut`.  ``plan[i]`` says how span i treats the entries whose magnitude
    equals the threshold: ``None`` keeps them all, ``p`` those before position ``p`` of the span (0:
    none).  Pruning is ``hardshrink`` (|x| > λ keeps x): float-only work, no boolean masks, and a span
    whose ties are split is pruned in two pieces, so breaking ties costs nothing extra.
    """

    def __init__(self, thr: float, plan: Optional[List[Optional[int]]]):
        self.thr, self.plan = thr, plan
        self._at_least = _float_below(thr) if thr > 0 else -1.0    # hardshrink λ that keeps |x| >= thr

    def prune_(self, part: torch.Tensor, i: int) -> torch.Tensor:
        """Zero, in place, the entries of span ``i`` (a contiguous 1-D slice) outside the top k."""
        split = None if self.plan is None else self.plan[i]
        if split is None:                                     # keep |x| >= thr
            return torch.hardshrink(part, self._at_least, out=part)
        head, tail = part[:split], part[split:]
        torch.hardshrink(head, self._at_least, out=head)      # keep |x| >= thr before the split
        torch.hardshrink(tail, self.thr, out=tail)            # keep |x| > thr from it on
        return part


def sample_stride(n: int, least: int = _MIN_SAMPLE) -> Optional[int]:
    """The stride of the sample that brackets the k-th value of a length-``n`` tensor (in
    :func:`kth_largest` and :class:`CutSearch`); None when the tensor is at most 4x the sample size
    (a whole-tensor ``kthvalue`` is then cheaper than sampling)."""
    m = _sample_size(n, least)
    return n // m if n > 4 * m else None


class _Positions:
    """Where the values found by :func:`_nonzero_entries` sit in their tensor.  Only one position is ever
    needed (a span's last kept tie), so it is worked out for that entry alone."""

    def __init__(self, at: torch.Tensor, within: Optional[torch.Tensor]):
        self.at, self.within = at, within       # value i: entry at[i], or float within[i] of int64 pair at[·]

    def select(self, keep: torch.Tensor) -> "_Positions":
        if self.within is None:
            return _Positions(self.at[keep], None)
        return _Positions(self.at, self.within[keep])

    def __getitem__(self, i: int) -> int:
        if self.within is None:
            return int(self.at[i])
        h = int(self.within[i])
        return int(self.at[h >> 1]) * 2 + (h & 1)


def _nonzero_entries(x: torch.Tensor) -> Tuple[torch.Tensor, _Positions]:
    """The non-zero entries of a contiguous 1-D fp32 tensor, in order, and their positions.
    ``nonzero`` over the tensor's bits as int64 pairs runs twice as fast as over its floats; the pairs
    it finds (a few percent, for the sparse tensors this serves) are then filtered as floats (which
    drops -0.0 too)."""
    if x.numel() % 2 or x.storage_offset() % 2:
        at = torch.nonzero(x).squeeze(1)
        return x[at], _Positions(at, None)
    pairs = x.view(torch.int64)
    at = torch.nonzero(pairs).squeeze(1)
    hit = pairs[at].view(torch.float32)
    within = torch.nonzero(hit).squeeze(1)
    return hit[within], _Positions(at, within)


class CutSearch:
    """Finds the :class:`MagnitudeCut` of the ``k`` largest magnitudes of a length-``n`` tensor that is
    seen one span at a time, in span order (so a caller can stream its spans from elsewhere).

    ``sample``: the magnitudes ``|x[::sample_stride(n)]|`` (None when the stride is None).  It brackets
    the k-th magnitude; one pass of :meth:`scan` over the spans counts the entries above the bracket
    and gathers those inside it, and ``kthvalue`` runs on those few.  The bracket is verified by
    counting, so the cut is always exact; when it misses (adversarial layouts, or a bracket reaching
    down to 0) :meth:`result` is None and the caller runs :func:`exact_cut` over all magnitudes.
    """

    def __init__(self, n: int, k: int, sample: Optional[torch.Tensor]):
        self.n, self.k = n, k
        self.found: Optional[MagnitudeCut] = None
        self.above, self.parts, self.where = 0, [], []      # candidates per span: magnitudes, positions
        self.lo = self.hi = None
        if k <= 0:
            self.found = MagnitudeCut(math.inf, None)
        elif k >= n:
            self.found = MagnitudeCut(-1.0, None)
        elif sample is not None:
            lo, hi, lo_open, hi_open = _sample_bracket(sample, k, n)
            # past the sample's extremes, the bounds of any magnitude: 0 and the largest finite float; and never
            # above that float (a sample with many infinite entries brackets at inf): an infinite entry must land
            # above the bracket, where scan() notices it
            top = float(torch.finfo(torch.float32).max)
            self.lo = 0.0 if lo_open else min(float(lo), top)
            self.hi = top if hi_open else min(float(hi), top)
            # the bracket's lower end; at 0 the zeros stay out of it (keeping or dropping them is the same)
            self._lo_below = _float_below(self.lo) if self.lo > 0 else 0.0

    @property
    def scanning(self) -> bool:
        """Whether :meth:`scan` wants the spans (False: the cut is known, or only :func:`exact_cut` can
        find it)."""
        return self.found is None and self.lo is not None

    def scan(self, part: torch.Tensor) -> bool:
        """Take the next span (a contiguous 1-D fp32 slice, not modified).  Returns False when the span holds
        NaN or ±Inf (each makes a NaN among the gathered entries, so this costs nothing extra)."""
        over = F.hardshrink(part, self.hi)                          # |x| > hi
        inside = F.hardshrink(part, self._lo_below).sub_(over)      # lo <= |x| <= hi (and |x| > 0), else 0
        self.above += _count(over)
        del over
        found, where = _nonzero_entries(inside)
        found.abs_()
        # an infinite x is above hi, and makes inside ∞ − ∞ = NaN (a NaN x stays NaN): drop those (a few
        # percent of a span are gathered, so this costs little)
        finite = not (found.numel() and bool(found.isnan().any()))
        if not finite:
            keep = found <= self.hi
            where, found = where.select(keep), found[keep]
        self.parts.append(found)
        self.where.append(where)
        return finite

    def result(self) -> Optional[MagnitudeCut]:
        if self.found is not None or self.lo is None:
            return self.found
        above, k = self.above, self.k
        n_inside = sum(p.numel() for p in self.parts)
        if above < k <= above + n_inside:
            return _cut_from_candidates(self.parts, k - above, above, k, self.where)
        if self.lo <= 0 and above + n_inside < k:
            return MagnitudeCut(0.0, None)                          # the k-th largest magnitude is 0
        return None


def exact_cut(magnitudes: List[torch.Tensor], k: int) -> MagnitudeCut:
    """The cut of the ``k`` largest values over all spans' magnitudes (in span order), by one
    whole-tensor ``kthvalue``: the fallback of :class:`CutSearch`."""
    n = sum(p.numel() for p in magnitudes)
    if k <= 0:
        return MagnitudeCut(math.inf, None)
    if k >= n:
        return MagnitudeCut(-1.0, None)
    return _cut_from_candidates(magnitudes, k, 0, k)


def magnitude_cut(flat: torch.Tensor, k: int, spans: Sequence[Tuple[int, int]]) -> MagnitudeCut:
    """The :class:`MagnitudeCut` for the ``k`` largest ``|flat|`` of a 1-D fp32 tensor, with no
    whole-tensor temporary besides the rare exact fallback (see :class:`CutSearch`)."""
    stride = sample_stride(flat.numel())
    search = CutSearch(flat.numel(), k, flat[::stride].abs() if stride is not None else None)
    if search.scanning:
        for s, e in spans:
            search.scan(flat[s:e])
    found = search.result()
    return found if found is not None else exact_cut([flat[s:e].abs() for s, e in spans], k)


def _cut_from_candidates(parts: List[torch.Tensor], r: int, above: int, k: int,
                         where: Optional[List["_Positions"]] = None) -> MagnitudeCut:
    """The cut whose threshold is the r-th largest of the candidate magnitudes ``parts`` (one per span,
    in span order), given ``above`` entries outside them that are larger than all of them.  ``where``:
    the candidates' positions in their spans (None: each part is its whole span)."""
    values = torch.cat(parts)
    thr_t = kth_largest(values, r, _MIN_SUBSAMPLE)
    thr = float(thr_t)
    n_above = above + int(torch.count_nonzero(values > thr_t))
    tied = [int(torch.count_nonzero(p == thr_t)) for p in parts]
    need = k - n_above
    if need == sum(tied) or thr == 0:       # all tied entries stay (kept zeros change nothing)
        return MagnitudeCut(thr, None)
    plan: List[Optional[int]] = []
    for j, t in enumerate(tied):
        take = min(need, t)
        need -= take
        if take == t or take == 0:
            plan.append(None if take == t else 0)
            continue
        last = int(torch.nonzero(parts[j] == thr_t).squeeze(1)[take - 1])     # the last tie this span keeps
        plan.append((last if where is None else where[j][last]) + 1)
    return MagnitudeCut(thr, plan)


def magnitude_order(x: torch.Tensor) -> torch.Tensor:
    """The indices that sort ``|x|`` ascending along dim 1, ties by index (the stable order), for a tensor of
    2+ dims.  fp32 sorts unique int64 keys (the bits of |x|, monotonic for non-negative floats, above the
    entry's index along dim 1) with an ordinary sort: 10-18 % faster than a stable argsort of the floats, and
    the same order on every device.  fp64 (compute_dtype fp64) has no room for the index beside its bits: a
    stable argsort."""
    if x.dtype != torch.float32:
        return torch.argsort(x.abs(), dim=1, stable=True)
    view = [1] * x.dim()
    view[1] = x.shape[1]
    keys = x.abs().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    keys.add_(torch.arange(x.shape[1], dtype=torch.int64, device=x.device).view(view))
    return torch.sort(keys, dim=1).indices


def bottomk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` smallest entries of ``x`` (ties broken by index)."""
    return topk_mask(-x, k)


def sign_consensus(weighted: torch.Tensor, mode: str) -> torch.Tensor:
    """TIES sign election over dim 0 of stacked weighted deltas.

    ``sum``: the sign of the summed values; ``count``: the sign of the summed signs.  Ties go to +1.
    Returns a boolean mask, True where an entry's sign agrees with the elected one (zeros never agree).
    """
    if mode == "sum":
        total = weighted.sum(dim=0)
    elif mode == "count":
        total = torch.sign(weighted).sum(dim=0)
    else:
        raise ValueError(f"unknown consensus {mode!r}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return torch.sign(weighted) == elected


def rescale_to_norm(original: torch.Tensor, masked: torch.Tensor, norm: str = "l1", eps: float = 1e-7,
                    dim: Optional[int] = None) -> torch.Tensor:
    """Scale ``masked`` so its norm matches ``original``'s (mergekit's rescale), per slice over ``dim``."""
    dims = tuple(range(1, original.dim())) if dim is None else (dim,)
    if original.dim() == 0:
        return masked
    if not dims:
        # a stack of 0-d slices: each slice is its own norm (``sum(dim=())`` would reduce everything)
        original, masked_v = original.unsqueeze(-1), masked.unsqueeze(-1)
        return rescale_to_norm(original, masked_v, norm, eps, dim=-1).squeeze(-1)
    if norm == "l1":
        a = original.abs().sum(dim=dims, keepdim=True)
        b = masked.abs().sum(dim=dims, keepdim=True)
    elif norm == "l2":
        a = original.square().sum(dim=dims, keepdim=True).sqrt()
        b = masked.square().sum(dim=dims, keepdim=True).sqrt()
    elif norm == "linf":
        a = original.abs().amax(dim=dims, keepdim=True)
        b = masked.abs().amax(dim=dims, keepdim=True)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    ok = (a >= eps) & (b >= eps)
    scale = torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.ones_like(a))
    return masked * scale


# -- reductions that do not depend on the thread count ------------------------------------------
_CHUNK = 4096   # reduction chunk: fp32 within a chunk, fp64 across chunks


def _split(flat: torch.Tensor):
    """(N, n) -> views (N, n // C, C) and (N, n % C) of the same storage."""
    m = flat.shape[1] // _CHUNK * _CHUNK
    return flat[:, :m].view(flat.shape[0], -1, _CHUNK), flat[:, m:]


def _sumsq_rows_plain(flat: torch.Tensor) -> torch.Tensor:
    main, tail = _split(flat)
    out = torch.linalg.vector_norm(tail, dim=1).double().square()
    if main.shape[1]:
        out = out + torch.linalg.vector_norm(main, dim=2).double().square().sum(dim=1)
    return out


#: a fp64 sum of squares (or |dot product|) below this may have lost squares or products that underflowed
#: in fp32 (entries under about 1e-19): it is computed again with the entries scaled
_SMALL = 2.0 ** -100


def peak_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d tensor (0 for an empty tensor; NaN if x holds one), from one min / max pass: no |x|
    temporary."""
    if not x.numel():
        return x.new_zeros(())
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, lo.neg())


def _pow2_at_or_below(peak: torch.Tensor) -> torch.Tensor:
    """The power of two at or below ``peak`` (0-d); 1 where that is 0, infinite or NaN."""
    usable = (peak > 0) & torch.isfinite(peak)
    return torch.where(usable, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))


def _scalable(peak: torch.Tensor) -> bool:
    """A tensor whose largest magnitude is ``peak`` can be rescaled: not all zero, nothing infinite or NaN."""
    return bool((peak > 0) & torch.isfinite(peak))


def sumsq_rows(flat: torch.Tensor) -> torch.Tensor:
    """Σ x² of every row of a 2-D tensor, as fp64 (N,).

    Whole-tensor fp32 reductions are not accurate enough here: on CPU ``torch.linalg.vector_norm`` of
    a 3e7-element tensor is off by ~1e-3 relative and ``torch.dot`` by ~3e-4.  Chunked norms (fp32
    inside 4096-element chunks, fp64 across them) are accurate to ~1e-7 and as fast as a plain norm.
    A row whose fp32 squares overflowed (entries over about 1e19) or may have underflowed is summed
    again divided by a power of two (exact), so the result is right at any magnitude.  (A zero row, e.g. an
    unchanged model's difference, costs one min / max pass more; a row holding an infinity stays infinite.)
    """
    out = _sumsq_rows_plain(flat)
    redo = (out == math.inf) | (out < _SMALL)
    if bool(redo.any()):
        for i in torch.nonzero(redo).reshape(-1).tolist():      # a few rows at most: one per model
            row = flat[i:i + 1]
            peak = peak_abs(row)
            if _scalable(peak):
                scale = _pow2_at_or_below(peak)
                out[i] = _sumsq_rows_plain(row / scale)[0] * scale.double().square()
    return out


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the whole tensor as an fp64 0-d tensor."""
    return sumsq_rows(x.reshape(1, -1))[0]


def abs_sum64(x: torch.Tensor) -> torch.Tensor:
    """Σ |x| over the whole tensor as an fp64 0-d tensor, accumulated chunk-wise: the same value for any
    number of CPU threads (a whole-tensor fp32 sum is not: its parallel split depends on the thread count)."""
    main, tail = _split(x.reshape(1, -1))
    out = tail.abs().sum(dtype=torch.float64)
    if main.shape[1]:
        out = out + torch.linalg.vector_norm(main[0], ord=1, dim=1).double().sum()
    return out


def _dot64_plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xm, xt = _split(x.reshape(1, -1))
    ym, yt = _split(y.reshape(1, -1))
    out = (xt * yt).sum(dtype=torch.float64)
    if xm.shape[1]:
        if x.device.type == "cpu":
            # batched BLAS dots of 4096-element chunks: 3x faster than mul + sum on CPU, no temporary
            # (not used on CUDA, where a TF32 matmul setting would round the inputs)
            part = torch.bmm(xm[0].unsqueeze(1), ym[0].unsqueeze(2))
        else:
            part = (xm[0] * ym[0]).sum(dim=1)
        out = out + part.double().sum()
    return out


def dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x·y over whole (same-shape) tensors as an fp64 0-d tensor, accumulated chunk-wise.  When the fp32
    products may have overflowed or underflowed (a result that is not finite, or tiny), it is computed again
    with x and y each divided by the power of two at or below its largest magnitude (exact): right for
    tensors of any magnitude, though products of entries far below their tensor's largest can still
    underflow (harmless for a cosine)."""
    out = _dot64_plain(x, y)
    if not bool(out.isfinite() & (out.abs() >= _SMALL)):
        px, py = peak_abs(x), peak_abs(y)
        if _scalable(px) and _scalable(py):     # (a zero vector's dot is 0; an infinite one's stays)
            sx, sy = _pow2_at_or_below(px), _pow2_at_or_below(py)
            out = _dot64_plain(x / sx, y / sy) * (sx.double() * sy.double())
    return out


def pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """The power of two at or below max|x| (1 for an all-zero, empty or non-finite tensor), 0-d of x's dtype:
    dividing by it is exact and brings the largest magnitude into [1, 2), so that a sum of squares can neither
    overflow (huge weights) nor vanish (a tensor of tiny values)."""
    return _pow2_at_or_below(peak_abs(x))


def svd_driver(x: torch.Tensor):
    """The torch.linalg.svd driver for ``x``'s device: gesvd on CUDA, whose default (gesvdj) can be
    inaccurate on ill-conditioned matrices (sd-mecha's orthogonal_procrustes uses gesvd too); the default
    elsewhere."""
    return "gesvd" if x.is_cuda else None


def ratio_to_region(width: float, offset: float, n: int) -> Tuple[int, int, bool]:
    """sd-mecha's and meh's ratio_to_region: the positions ``[start, end)`` of ``n`` (rows for tensor_sum, ranks
    for top_k_tensor_sum) and whether they are the complement.

    A negative width extends to the left of the offset; the width is at most 1; the offset wraps around
    (modulo 1).  A region that runs past the end wraps to the start: the positions outside it, ``[start, end)``,
    are returned with ``inverted`` set.  The ends are rounded as Python's round does (half to even)."""
    if width < 0:
        offset, width = offset + width, -width
    width = min(width, 1.0)
    if offset < 0:
        offset = 1.0 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    stop = offset + width
    if stop <= 1.0:
        return round(offset * n), round(stop * n), False
    return round((stop - 1.0) * n), round(offset * n), True
