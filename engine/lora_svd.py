"""Low-rank factorization for LoRAs: truncated (randomized or full) SVD, rank selection, exact SVD of
factor products, exact quantile clamping.  Pure torch, no ComfyUI import (unit-tested on its own).

Conventions
-----------
A LoRA layer stores ``ΔW = scale · up @ down`` on the 2-D view of the weight (``(out, in·kh·kw)`` for
convolutions).  A factorization of ``A`` at rank ``r`` is ``up = U_r·√S_r``, ``down = √S_r·Vh_r`` (the
singular values split evenly, which keeps both factors in the same range for fp16/bf16 files).

Rank modes (``RankSpec``), each capped by ``rank`` (the maximum) and by the layer's size:

* ``fixed``: ``rank``.
* ``sv_ratio`` (param x ≥ 1): the singular values with ``S_i ≥ S_0 / x``.
* ``sv_fro`` (param f in (0, 1]): the smallest r with ``‖A_r‖_F ≥ f·‖A‖_F`` (Frobenius energy kept).
* ``sv_cumulative`` (param c in (0, 1]): the smallest r with ``Σ_{i<r} S_i ≥ c·Σ_i S_i`` (needs every
  singular value: computed with ``svdvals``, so it is the slowest mode).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

RANK_MODES = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
SVD_METHODS = ("randomized", "full")


class RankError(ValueError):
    """A rank request that cannot be met (0, negative, or above a layer's size)."""


@dataclass(frozen=True)
class RankSpec:
    """How the rank of each layer is chosen; ``rank`` is the fixed rank or the maximum."""

    mode: str = "fixed"
    rank: int = 32
    param: float = 1.0

    def __post_init__(self):
        if self.mode not in RANK_MODES:
            raise RankError(f"unknown rank mode {self.mode!r}; choose one of {', '.join(RANK_MODES)}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise RankError(f"rank must be a whole number ≥ 1, got {self.rank!r}")
        p = float(self.param)
        if self.mode == "sv_ratio" and not (p >= 1 and math.isfinite(p)):
            raise RankError(f"sv_ratio needs a ratio ≥ 1 (keep S_i ≥ S_0/ratio), got {self.param!r}")
        if self.mode in ("sv_fro", "sv_cumulative") and not (0 < p <= 1):
            raise RankError(f"{self.mode} needs a fraction in (0, 1], got {self.param!r}")

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed rank {self.rank}"
        return f"{self.mode} {self.param:g} (max rank {self.rank})"

    def to_dict(self):
        return {"mode": self.mode, "rank": int(self.rank), "param": float(self.param)}


@dataclass(frozen=True)
class SVDOptions:
    """Truncated-SVD settings: randomized (Halko et al.: Gaussian sketch of rank+oversample, power
    iterations re-orthonormalized by QR, seeded CPU generator, so results are deterministic and the same
    on CPU and GPU) or full ``torch.linalg.svd``."""

    method: str = "randomized"
    oversample: int = 16
    power_iters: int = 2

    def __post_init__(self):
        if self.method not in SVD_METHODS:
            raise ValueError(f"unknown SVD method {self.method!r}; choose one of {', '.join(SVD_METHODS)}")
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError("oversample and power_iters must be ≥ 0")

    def to_dict(self):
        return {"method": self.method, "oversample": int(self.oversample), "power_iters": int(self.power_iters)}


@dataclass
class Factorization:
    up: torch.Tensor          # (m, r)
    down: torch.Tensor        # (r, n)
    rank: int
    rel_error: float          # ‖A − up@down‖_F / ‖A‖_F
    norm: float               # ‖A‖_F
    capped: bool = False      # the requested rank was above the layer's size


# -- helpers ---------------------------------------------------------------------------------------

#: matrices up to this many elements are decomposed single-threaded on the CPU: LAPACK's threading
#: overhead dominates there (and is ruinous when the cores are shared)
SMALL_CPU_MATRIX = 512 * 512


@contextmanager
def single_thread_if_small(numel: int, device: torch.device):
    """One CPU thread for work on a small tensor (restored afterwards); a no-op elsewhere."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or numel > SMALL_CPU_MATRIX or n <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def small_matrix_threads(*tensors: torch.Tensor):
    """Run CPU linear algebra on small matrices with one thread (restored afterwards)."""
    dev = "cpu" if all(t.device.type == "cpu" for t in tensors) else "cuda"
    return single_thread_if_small(max(t.numel() for t in tensors), torch.device(dev) if dev == "cpu" else tensors[0].device)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view LoRAs use: (out, in·kh·kw)."""
    if t.dim() < 2:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} has no 2-D view")
    return t.reshape(t.shape[0], -1)


def exact_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x.flatten(), q)`` (linear interpolation) for any size (``torch.quantile``
    refuses inputs over 16M elements).  Uses ``topk`` on the smaller side of the quantile: ``kthvalue``'s
    quickselect goes quadratic on sorted or reversed inputs."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    frac = pos - lo
    if lo + 1 <= n - lo:                         # lower half: the lo+2 smallest, ascending
        vals = torch.topk(flat, min(lo + 2, n), largest=False, sorted=True).values
        v_lo = vals[lo]
        v_hi = vals[lo + 1] if lo + 1 < vals.numel() else v_lo
    else:                                        # upper half: the n-lo largest, descending
        vals = torch.topk(flat, n - lo, largest=True, sorted=True).values
        v_lo = vals[-1]
        v_hi = vals[-2] if vals.numel() > 1 else v_lo
    if frac == 0:
        return v_lo.clone()
    return v_lo + frac * (v_hi - v_lo)


def choose_rank(s: torch.Tensor, spec: RankSpec, total_sq: float, total_sum: Optional[float] = None,
                full_rank: Optional[int] = None) -> int:
    """The rank for singular values ``s`` (descending; may be only the top ones) under ``spec``.

    ``total_sq`` = ‖A‖_F² (exact, from A); ``total_sum`` = Σ of all singular values (sv_cumulative).
    The result is in [1, min(spec.rank, full_rank, len(s))] (1 for a zero matrix)."""
    full_rank = full_rank if full_rank is not None else s.numel()
    cap = max(1, min(int(spec.rank), int(full_rank), s.numel()))
    s = s.detach().double().cpu()
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 1
    if spec.mode == "fixed":
        return cap
    if spec.mode == "sv_ratio":
        r = int((s >= s[0] / float(spec.param)).sum())
    elif spec.mode == "sv_fro":
        target = float(spec.param) ** 2 * total_sq
        cum = torch.cumsum(s * s, 0)
        # tiny slack so that f = 1 on an exactly represented spectrum is reached
        r = int(torch.searchsorted(cum, torch.tensor(target * (1 - 1e-9), dtype=cum.dtype)).item()) + 1
    else:
        if total_sum is None:
            raise ValueError("sv_cumulative needs the sum of all singular values")
        target = float(spec.param) * total_sum
        cum = torch.cumsum(s, 0)
        r = int(torch.searchsorted(cum, torch.tensor(target * (1 - 1e-9), dtype=cum.dtype)).item()) + 1
    return max(1, min(r, cap))


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


def randomized_svd(a: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 2,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of ``a`` (m, n) by a randomized range finder with subspace iteration.

    The Gaussian test matrix is drawn from a CPU generator seeded with ``seed`` and moved to ``a``'s
    device: identical results for equal inputs, on any device.  Returns ``U (m, k), S (k,), Vh (k, n)``.
    """
    m, n = a.shape
    k = int(k)
    if k < 1 or k > min(m, n):
        raise RankError(f"rank {k} is outside [1, {min(m, n)}] for a {m}×{n} matrix")
    width = min(k + int(oversample), m, n)
    transpose = m < n          # sketch the longer side: fewer, cheaper QRs
    x = a.t() if transpose else a
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))
    omega = torch.randn((x.shape[1], width), generator=gen, dtype=torch.float32).to(device=a.device,
                                                                                   dtype=a.dtype)
    q = _orth(x @ omega)
    del omega
    for _ in range(int(power_iters)):
        z = _orth(x.t() @ q)
        q = _orth(x @ z)
        del z
    b = q.t() @ x                               # (width, n')
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub[:, :k]
    s, vh = s[:k], vh[:k]
    if transpose:                               # a = xᵀ = (u s vh)ᵀ = vhᵀ s uᵀ
        return vh.t().contiguous(), s, u.t().contiguous()
    return u, s, vh


def truncated_svd(a: torch.Tensor, k: int, opts: SVDOptions, seed: int = 0):
    """Top-``k`` SVD; the randomized one unless ``opts`` say full or the sketch would be no smaller."""
    m, n = a.shape
    small = min(m, n)
    if k < 1 or k > small:
        raise RankError(f"rank {k} is outside [1, {small}] for a {m}×{n} matrix")
    if opts.method == "full" or 2 * (k + opts.oversample) >= small:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    return randomized_svd(a, k, opts.oversample, opts.power_iters, seed)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp(min=0).sqrt()
    return u * root.unsqueeze(0), vh * root.unsqueeze(1)


# kohya's clamp takes the quantile of the signed values: at 0.5 that is about 0 (every factor clamped to ~0),
# below it often negative (clamp(-hi, hi) then sets every entry to hi).  Only quantiles near 1 are a clamp.
CLAMP_QUANTILE_MIN = 0.9


def check_clamp_quantile(q: Optional[float]) -> None:
    if q is not None and not (CLAMP_QUANTILE_MIN <= q <= 1):
        raise RankError(f"clamp_quantile must be in [{CLAMP_QUANTILE_MIN:g}, 1] (1 = off; kohya and ComfyUI use "
                        f"0.99), got {q}: a lower quantile of the signed factors clamps them to about 0")


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float):
    """kohya's clamp: both factors limited to ±(the ``quantile`` of their concatenated values)."""
    hi = exact_quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def factorize(a: torch.Tensor, spec: RankSpec, opts: SVDOptions = SVDOptions(), seed: int = 0,
              clamp_quantile: Optional[float] = None, strict: bool = False) -> Factorization:
    """Best rank-r factors of the matrix ``a`` (fp32/fp64) with the rank chosen by ``spec``.

    ``strict``: a fixed rank above the matrix's size raises RankError instead of being capped.
    ``clamp_quantile`` in (0, 1): clamp the factors (kohya's clamp; adds error); None or 1: off.
    """
    with small_matrix_threads(a):
        return _factorize(a, spec, opts, seed, clamp_quantile, strict)


def _factorize(a, spec, opts, seed, clamp_quantile, strict) -> Factorization:
    if a.dim() != 2:
        raise ValueError(f"factorize needs a matrix, got shape {tuple(a.shape)}")
    m, n = a.shape
    small = min(m, n)
    if strict and spec.rank > small:
        raise RankError(f"rank {spec.rank} is above the size of this {m}×{n} layer (at most {small})")
    capped = spec.rank > small
    total_sq = float(torch.linalg.vector_norm(a)) ** 2
    norm = math.sqrt(total_sq)
    kmax = min(int(spec.rank), small)
    total_sum = None
    if spec.mode == "sv_cumulative":
        s_all = torch.linalg.svdvals(a)
        total_sum = float(s_all.double().sum())
        r = choose_rank(s_all, spec, total_sq, total_sum, small)
        u, s, vh = truncated_svd(a, r, opts, seed)
    else:
        u, s, vh = truncated_svd(a, kmax, opts, seed)
        r = choose_rank(s, spec, total_sq, None, small)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    up, down = _split(u, s, vh)
    if clamp_quantile is not None and 0 < clamp_quantile < 1:
        up, down = clamp_factors(up, down, clamp_quantile)
        err = float(torch.linalg.norm(a - up @ down)) / norm if norm > 0 else 0.0
    else:
        kept = float((s.double() ** 2).sum())
        err = math.sqrt(max(total_sq - kept, 0.0) / total_sq) if total_sq > 0 else 0.0
        if err < 1e-2 and norm > 0:
            # ‖A‖² − Σ S² cancels badly for near-exact layers: measure the residual instead
            err = float(torch.linalg.norm(a - up @ down)) / norm
    return Factorization(up.contiguous(), down.contiguous(), r, err, norm, capped)


def product_svd(up: torch.Tensor, down: torch.Tensor):
    """Exact thin SVD of ``up @ down`` (up (m, R), down (R, n)) without forming the product:
    QR of both factors, then the SVD of the small core.  Returns U, S, Vh with min(m, n, R) values."""
    qu, ru = torch.linalg.qr(up, mode="reduced")            # (m, a), (a, R)
    qd, rd = torch.linalg.qr(down.t(), mode="reduced")      # (n, b), (b, R)
    uc, s, vhc = torch.linalg.svd(ru @ rd.t(), full_matrices=False)
    return qu @ uc, s, vhc @ qd.t()


def factorize_product(up: torch.Tensor, down: torch.Tensor, spec: RankSpec,
                      clamp_quantile: Optional[float] = None) -> Factorization:
    """Best factors of ``up @ down`` at the rank ``spec`` chooses: exact (every singular value known)."""
    with small_matrix_threads(up, down):
        return _factorize_product(up, down, spec, clamp_quantile)


def _factorize_product(up, down, spec, clamp_quantile) -> Factorization:
    u, s, vh = product_svd(up, down)
    total_sq = float((s.double() ** 2).sum())
    total_sum = float(s.double().sum())
    small = min(up.shape[0], down.shape[1])
    r = choose_rank(s, spec, total_sq, total_sum, min(small, s.numel()))
    u, s_r, vh = u[:, :r], s[:r], vh[:r]
    new_up, new_down = _split(u, s_r, vh)
    norm = math.sqrt(total_sq)
    if clamp_quantile is not None and 0 < clamp_quantile < 1:
        new_up, new_down = clamp_factors(new_up, new_down, clamp_quantile)
        err = float(torch.linalg.norm(up @ down - new_up @ new_down)) / norm if norm > 0 else 0.0
    else:   # every singular value is known: the tail sum has no cancellation
        err = math.sqrt(float((s[r:].double() ** 2).sum()) / total_sq) if total_sq > 0 else 0.0
    return Factorization(new_up.contiguous(), new_down.contiguous(), r, err, norm, spec.rank > small)


def optimal_rank_error(a: torch.Tensor, r: int) -> float:
    """The smallest relative Frobenius error of any rank-``r`` approximation (Eckart–Young)."""
    s = torch.linalg.svdvals(as_matrix(a).double())
    total = float((s * s).sum())
    if total == 0:
        return 0.0
    return math.sqrt(max(float((s[r:] ** 2).sum()), 0.0) / total)
