"""sd-optim's spectral / subspace methods: multi-domain alignment and the low-rank orthogonal projection.

Both were commented out in sd-optim (``multi_domain_alignment`` and ``clyb_merge``); this is a sound,
vectorised reading of them, with the defects of the source fixed (each is listed in the method's help).
Inputs: ``models = [a, b]`` and ``base = c`` (sd-optim's three arguments a, b, c).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .ops import peak_abs, pow2_scale
from .spec import BASE_OPTIONAL, BOOL, FLOAT, INT, Param, merge_method

# -- multi-domain alignment ------------------------------------------------------------------------


def _view2d(x: torch.Tensor) -> torch.Tensor:
    """sd-optim's 2-D view: (out, −1) for conv weights (≥ 4-D), (−1, last) otherwise, (1, 1) for 0-d."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() >= 4:
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def _spectral_centroid(mag: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    total = mag.sum()
    return torch.where(total > 0, (freqs * mag).sum() / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def frequency_aligned(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, margin_factor: float) -> torch.Tensor:
    """b with its spectrum (rfft of the flattened tensor) partly replaced by a's magnitudes.

    With spectral centroids Cₓ = Σf|X|/Σ|X| (f = bin/F ∈ [0, 1)), phase coherence
    ρ = mean(cos Δφ_ab + cos Δφ_ac + cos Δφ_bc)/3 and β = clamp(cos(π/2·|C_a − C_b|)·ρ, 0, 1), a's share
    of the magnitude is λ = 1 − β below ⌊min(C_a, C_c)·F⌋ − margin, falls along a quarter cosine to 0 at
    ⌊max(C_a, C_c)·F⌋ + margin, and is 0 above; the magnitude is λ|A| + (1−λ)|B|, b's phase is kept.
    """
    shape = b.shape
    n = b.numel()
    if n < 2:
        return b.clone()
    spec_a = torch.fft.rfft(a.reshape(-1))
    spec_b = torch.fft.rfft(b.reshape(-1))
    spec_c = torch.fft.rfft(c.reshape(-1))
    n_freq = spec_b.shape[0]
    idx = torch.arange(n_freq, device=b.device, dtype=b.dtype)
    freqs = idx / n_freq
    mag_a, mag_b, mag_c = spec_a.abs(), spec_b.abs(), spec_c.abs()
    ca, cb, cc = (_spectral_centroid(m, freqs) for m in (mag_a, mag_b, mag_c))
    ph_a, ph_b, ph_c = spec_a.angle(), spec_b.angle(), spec_c.angle()
    del spec_a, spec_c, mag_c
    coherence = (torch.cos(ph_a - ph_b) + torch.cos(ph_a - ph_c) + torch.cos(ph_b - ph_c)).mean() / 3.0
    del ph_a, ph_c, spec_b
    beta = (torch.cos(0.5 * math.pi * (ca - cb).abs()) * coherence).clamp(0.0, 1.0)
    margin = math.floor(margin_factor * n_freq)
    pass_end = torch.floor(torch.minimum(ca, cc) * n_freq - margin).clamp(0, n_freq)
    stop = torch.floor(torch.maximum(ca, cc) * n_freq + margin).clamp(0, n_freq)
    width = (stop - pass_end).clamp(min=1.0)
    ramp = torch.cos(0.5 * math.pi * ((idx - pass_end) / width).clamp(0.0, 1.0))
    ramp = torch.where(idx >= stop, torch.zeros_like(ramp), ramp)
    lam = (1.0 - beta) * ramp
    mag = torch.lerp(mag_b, mag_a, lam)
    del mag_a, mag_b, ramp, lam
    out = torch.fft.irfft(torch.polar(mag, ph_b), n=n)
    return out.view(shape)


def received_attention(a2: torch.Tensor, b2: torch.Tensor, c2: torch.Tensor,
                       max_block: int = 1 << 24) -> torch.Tensor:
    """Per-row importance: the attention each row receives, averaged over softmax(âb̂ᵀ/√d),
    softmax(âĉᵀ/√d) and softmax(b̂ĉᵀ/√d) (rows normalised; softmax over the last dim).

    Its mean over the rows is exactly 1.  Cost O(rows²·d); rows are processed in blocks so the
    attention matrix never exceeds ``max_block`` entries.
    """
    rows, d = a2.shape
    na, nb, nc = (F.normalize(x, dim=-1) for x in (a2, b2, c2))
    scale = 1.0 / math.sqrt(d)
    received = torch.zeros(rows, dtype=a2.dtype, device=a2.device)
    step = max(1, max_block // max(rows, 1))
    for q, k in ((na, nb), (na, nc), (nb, nc)):
        for s in range(0, rows, step):
            att = torch.softmax(q[s:s + step] @ k.T * scale, dim=-1)
            received += att.sum(dim=0)
    return received / 3.0


def row_dissimilarity(a2: torch.Tensor, b2: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """(1 − ⟨a−c, b−c⟩ / max(‖a−c‖, ‖b−c‖)²)/2 per row, in [0, 1]; 0 where both differences are 0."""
    x = a2 - c2
    y = b2 - c2
    dot = (x * y).sum(dim=1)
    m = torch.maximum(torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1))
    m2 = m * m
    ok = m2 > 0
    sim = torch.where(ok, dot / torch.where(ok, m2, torch.ones_like(m2)), torch.ones_like(m2))
    return ((1.0 - sim.clamp(-1.0, 1.0)) * 0.5)


def gaussian_blur_rows(v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """1-D Gaussian blur (σ = kernel_size/3, edge values replicated) of a per-row vector."""
    if kernel_size <= 1 or v.numel() <= 1:
        return v
    x = torch.arange(kernel_size, device=v.device, dtype=torch.float64) - (kernel_size - 1) / 2
    kern = torch.exp(-0.5 * (x / (kernel_size / 3.0)) ** 2)
    kern = (kern / kern.sum()).to(v.dtype).view(1, 1, -1)
    pad = kernel_size // 2
    idx = torch.arange(-pad, v.numel() + pad, device=v.device).clamp_(0, v.numel() - 1)
    padded = v[idx].view(1, 1, -1)  # replicate padding for any row count
    return F.conv1d(padded, kern).view(-1)


def slerp_rows(a2: torch.Tensor, b2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Row-wise slerp of the raw rows with the angle of their directions; lerp where a row is zero or
    the angle is within 1e-4 of 0 or π (slerp is undefined or unstable there)."""
    na = torch.linalg.vector_norm(a2, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b2, dim=1, keepdim=True)
    prod = na * nb
    ok = prod > 0
    cos = torch.where(ok, (a2 * b2).sum(dim=1, keepdim=True) / torch.where(ok, prod, torch.ones_like(prod)),
                      torch.ones_like(prod)).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    use_lerp = (~ok) | (omega < 1e-4) | (omega > math.pi - 1e-4)
    sin_o = torch.where(use_lerp, torch.ones_like(omega), torch.sin(omega))
    ca = torch.where(use_lerp, 1.0 - t, torch.sin((1.0 - t) * omega) / sin_o)
    cb = torch.where(use_lerp, t, torch.sin(t * omega) / sin_o)
    return ca * a2 + cb * b2


def _mda(a, b, c, *, alpha, beta, kernel_size, margin_factor, frequency_weight, use_cross_attention):
    shape = a.shape
    if frequency_weight > 0:
        b_star = torch.lerp(b, frequency_aligned(a, b, c, margin_factor), frequency_weight)
    else:
        b_star = b
    a2, b2, c2, bs2 = (_view2d(x) for x in (a, b, c, b_star))
    rows = a2.shape[0]
    if use_cross_attention and rows > 1:
        importance = received_attention(a2, b2, c2).unsqueeze(1)
    else:
        importance = torch.ones((rows, 1), dtype=a2.dtype, device=a2.device)
    dissim = gaussian_blur_rows(row_dissimilarity(a2, b2, c2), kernel_size).unsqueeze(1)
    t = (alpha * importance).clamp(0.0, 1.0)
    out = slerp_rows(a2, bs2, t)
    if beta != 0:
        out = out + (bs2 - c2) * (beta * dissim * importance)
    return out.reshape(shape)


def _odd_kernel(glob, pm) -> Optional[str]:
    if int(glob.get("kernel_size", 3)) % 2 == 0:
        return f"kernel_size must be odd, got {glob.get('kernel_size')}"
    return None


@merge_method(
    "multi_domain_alignment", min_models=2, max_models=2, source="sd-optim",
    help="Multi-domain alignment of model A and model B with the base C as anchor: B's spectrum is pulled toward "
         "A's magnitudes in the low band (frequency_aligned), mixed into B by frequency_weight (B*), then each row "
         "(output channel) is slerped from A toward B* by alpha × importance, and B* − C is added, scaled by "
         "beta × the rows' dissimilarity of A − C and B − C (Gaussian-blurred across rows). alpha = beta = 0 "
         "returns A. in_proj_weight/in_proj_bias keys are split into q, k, v. Fixes to sd-optim's (commented-out) "
         "code: its importance summed softmax rows (always 1, so every row got alpha/√rows) — here it is the "
         "attention each row receives (mean 1) and is optional; its blur ran over a length-1 axis (a no-op) — "
         "here it runs across rows; its cosine ramp multiplied B's magnitudes (a notch) — here it fades A's share "
         "of the magnitude to 0; β is clamped to [0, 1]; slerp falls back to lerp for zero or opposite rows.",
    params=(Param("alpha", FLOAT, 0.5, "Row-wise slerp factor from A (0) toward B* (1).", min=0.0, max=1.0,
                  step=0.01),
            Param("beta", FLOAT, 0.5, "Strength of the anchor term (B* − C)·dissimilarity.", min=0.0, max=1.0,
                  step=0.01),
            Param("kernel_size", INT, 3, "Odd width of the Gaussian blur of the dissimilarity across rows "
                  "(1 = none).", min=1, max=63, step=2),
            Param("centroid_margin_factor", FLOAT, 0.08, "Width (fraction of the spectrum) added on both sides of "
                  "the spectral-centroid band in which A's magnitude fades out.", min=0.0, max=0.5, step=0.01),
            Param("frequency_weight", FLOAT, 0.4, "Share of the frequency-aligned B in B* (0 = plain B, skips the "
                  "FFT).", min=0.0, max=1.0, step=0.01),
            Param("use_cross_attention", BOOL, False, "Scale alpha and the anchor term per row by the attention "
                  "the row receives across A, B, C (mean 1). Costs O(rows²·cols): slow for large tensors on CPU.")),
    check=_odd_kernel,
)
def multi_domain_alignment(base, models, ctx, *, alpha, beta, kernel_size, centroid_margin_factor,
                           frequency_weight, use_cross_attention):
    # The method is homogeneous (scaling A, B and C scales the result), and its row norms, dot products and
    # spectra are fp32: the inputs are divided by one power of two (exact) that brings their largest magnitude
    # into [1, 2), so that weights of any magnitude neither overflow (squares of entries over about 1e19) nor
    # underflow in them; the result is scaled back.
    scale = pow2_scale(torch.stack([peak_abs(x) for x in (models[0], models[1], base)]))
    a, b, c = models[0] / scale, models[1] / scale, base / scale
    kw = dict(alpha=alpha, beta=beta, kernel_size=kernel_size, margin_factor=centroid_margin_factor,
              frequency_weight=frequency_weight, use_cross_attention=use_cross_attention)
    if (ctx.key.endswith(("in_proj_weight", "in_proj_bias")) and a.dim() >= 1 and a.shape[0] >= 3
            and a.shape[0] % 3 == 0):
        parts = [_mda(x, y, z, **kw) for x, y, z in zip(a.chunk(3), b.chunk(3), c.chunk(3))]
        return torch.cat(parts).mul_(scale)
    return _mda(a, b, c, **kw).mul_(scale)


# -- low-rank orthogonal projection ("project A onto B", sd-optim's clyb_merge) ---------------------

def column_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (m, r) of the column space of ``x`` (m, n), r = its numerical rank.

    Reduced QR; when every |Rᵢᵢ| is above the tolerance, x has full column rank and Q is the basis
    (one host sync per call to decide).  Otherwise (rank-deficient; unpivoted QR cannot be trusted
    then) the left singular vectors with σ > tolerance.  Tolerance: max(m, n)·eps₃₂·(largest value).
    """
    m, n = x.shape
    eps = torch.finfo(torch.float32).eps * max(m, n)
    q, r = torch.linalg.qr(x, mode="reduced")
    diag = torch.diagonal(r).abs()
    if n > 0 and bool(diag.min() > eps * diag.max()):
        return q
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0:
        return u[:, :0]
    keep = int((s > eps * s[0]).sum()) if bool(s[0] > 0) else 0
    return u[:, :keep]


def lowrank_part(x: torch.Tensor, q: int, niter: int, generator: torch.Generator) -> torch.Tensor:
    """The best rank-``q`` approximation of ``x`` (m, n): exact SVD when q + 10 oversampling columns reach
    half the smaller side, otherwise a randomized SVD (Gaussian test matrix drawn from ``generator`` on
    the CPU, ``niter`` QR-stabilised power iterations)."""
    m, n = x.shape
    r = min(m, n)
    if q <= 0:
        return torch.zeros_like(x)
    if q >= r:
        return x.clone()
    p = q + 10
    if 2 * p >= r:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return (u[:, :q] * s[:q]) @ vh[:q]
    omega = torch.randn((n, p), generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):
        z = torch.linalg.qr(x.T @ basis).Q
        basis = torch.linalg.qr(x @ z).Q
    small = basis.T @ x  # (p, n)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ ub[:, :q]
    return (u * s[:q]) @ vh[:q]


@merge_method(
    "lowrank_orthogonal_projection", base=BASE_OPTIONAL, min_models=2, max_models=2, source="sd-optim",
    randomized=True,
    help="Project A onto B (sd-optim's clyb_merge): on the 2-D view (out, −1 for conv), δA = A − C loses its top "
         "⌊rank_ratio·min(rows, cols)⌋ singular components (the shared low-rank structure), what remains is "
         "projected orthogonally onto the span of δB = B − C, and out = B + alpha·projection. Without a base, "
         "C = 0 (sd-optim's ab_only). The projection is onto B's column space, or its row space for wide "
         "matrices (sd-optim always took columns, which for wide matrices is everything: the identity); for "
         "full-rank square δB it is the identity. Fixes to sd-optim: no undefined cache; the rank comes from the QR "
         "diagonal (SVD only if δB is rank-deficient) instead of a full matrix_rank SVD; the randomized SVD is "
         "seeded per key (exact SVD for small matrices); a rank_ratio that rounds to 0 removes nothing "
         "(sd-optim removed at least rank 1, erasing vectors entirely).",
    params=(Param("alpha", FLOAT, 1.0, "Strength of the projected residual added to B (0 = B).", min=0.0,
                  max=1.0, step=0.01),
            Param("rank_ratio", FLOAT, 0.0625, "Fraction of min(rows, cols) of A − C's leading singular directions "
                  "removed before projecting (sd-optim: 1/16).", min=0.0, max=1.0, step=0.0025),
            Param("use_perp", BOOL, False, "First remove from A − C its component along B − C (whole-tensor "
                  "projection), keeping only what is orthogonal to B's change."),
            Param("niter", INT, 0, "Power iterations of the randomized SVD (0 = auto: clamp(640/rank, 2, 64), "
                  "as sd-optim).", min=0, max=64, step=1)),
)
def lowrank_orthogonal_projection(base, models, ctx, *, alpha, rank_ratio, use_perp, niter):
    a, b = models[0], models[1]
    shape = b.shape
    ac = a - base if base is not None else a
    bc = b - base if base is not None else b
    if b.dim() == 1:
        ac2, bc2 = ac.reshape(-1, 1), bc.reshape(-1, 1)  # a vector: one column
    else:
        ac2, bc2 = _view2d(ac), _view2d(bc)
    transposed = ac2.shape[0] < ac2.shape[1]
    if transposed:
        ac2, bc2 = ac2.T, bc2.T
    if use_perp:
        nb2 = (bc2 * bc2).sum()
        coef = torch.where(nb2 > 0, (ac2 * bc2).sum() / torch.where(nb2 > 0, nb2, torch.ones_like(nb2)),
                           torch.zeros_like(nb2))
        ac2 = ac2 - coef * bc2
    q = int(rank_ratio * min(ac2.shape))
    if q > 0:
        iters = niter if niter > 0 else min(64, max(2, int(640 / q)))
        ac2 = ac2 - lowrank_part(ac2, q, iters, ctx.generator)
    basis = column_basis(bc2)
    proj = basis @ (basis.T @ ac2)
    if transposed:
        proj = proj.T
    return (b.reshape(proj.shape) + alpha * proj).reshape(shape)
