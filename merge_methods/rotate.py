"""sd-mecha's ``rotate``: align model A with model B by an orthogonal transform (orthogonal Procrustes).

A weight is viewed as a matrix whose rows are points (a linear layer: (out, in); a spatial conv: (out·in,
kh·kw), so its kernels are rotated); the orthogonal R minimizing ‖A·R − B‖ is U·Vᵀ from the SVD of AᵀB.
Fractional alignments take the matrix power R^t. R and its powers are computed in float64 (AᵀB squares
the conditioning of the weights: in fp32 ill-conditioned directions are lost in rounding), then applied
in the compute dtype.

Where AᵀB is rank-deficient, R is not unique: always for wide matrices (fewer rows than columns) and for
centred square ones, and for low-rank weights or differences. sd-mecha's wide-matrix map x ↦ x − x·v·vᵀ +
x·u·vᵀ is not orthogonal: it does not return B even when B is exactly A rotated, its t = −1 is not the
inverse of t = 1, and it keeps the arbitrary null-space vectors LAPACK returns. Here R is a true
rotation: it maps A's row space onto B's as the Procrustes SVD pairs them, leaves what is orthogonal to
both in place, and in between is the completion closest to the identity. Where AᵀB has full rank it is
sd-mecha's R exactly. Fractional powers handle half turns (eigenvalue −1, e.g. B = −A), where the
principal branch alone (sd-mecha's) does not give a rotation.
"""
from __future__ import annotations

import math

import torch

from .ops import svd_driver
from .spec import BASE_OPTIONAL, FLOAT, Param, merge_method

# eigenvalues of a rotation this close to −1 are taken as exact half turns (see _orthogonal_power)
_HALF_TURN_TOL = 1e-6


def _orthogonal_power(q: torch.Tensor, t: float) -> torch.Tensor:
    """Q^t for a rotation Q (orthogonal, det +1), float64: the principal branch of its eigendecomposition.
    An eigenvalue −1 (a half turn) is a branch point: numerically its pairs come out as −1 + 0j alike, and
    both would turn by +π·t (no longer a rotation). Its eigenspace, the null space of Q + I, is taken as
    planes turned by ±π·t instead."""
    q = q.double()
    w, v = torch.linalg.eig(q)
    half_turn = (w + 1).abs() < _HALF_TURN_TOL
    wt = torch.where(half_turn, torch.zeros_like(w), w.pow(t))
    out = torch.linalg.solve(v, v * wt, left=False).real
    k = int(half_turn.sum())
    if k:
        # the k smallest right singular vectors of Q + I: a real orthonormal basis of the −1 eigenspace
        _, _, vh = torch.linalg.svd(q + torch.eye(q.shape[0], dtype=q.dtype, device=q.device), driver=svd_driver(q))
        e = vh[-k:].T
        e1, e2 = e[:, 0:k - 1:2], e[:, 1:k:2]      # planes (e1ᵢ, e2ᵢ); an odd one out (det −1) stays −1
        c, s = math.cos(math.pi * t), math.sin(math.pi * t)
        out = out + c * (e1 @ e1.T + e2 @ e2.T) + s * (e1 @ e2.T - e2 @ e1.T)
        if k % 2:
            out = out - e[:, -1:] @ e[:, -1:].T
    return out


def _rank(s: torch.Tensor, shape) -> int:
    """Numerical rank from descending singular values (torch.linalg.matrix_rank's tolerance; the callers
    compute in float64, where a direction of AᵀB that is null only up to rounding falls far below it while
    those of ill-conditioned weights, whose conditioning AᵀB squares, stay above)."""
    if s.numel() == 0 or not bool(s[0] > 0):
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum())


def _complement(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the orthogonal complement of x's (orthonormal) columns."""
    q, _ = torch.linalg.qr(x, mode="complete")
    return q[:, x.shape[1]:]


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False, driver=svd_driver(x))
    return u @ vh


class _Rotation:
    """x ↦ x·R^t for an orthogonal R = I + W·(Rw − I)·Wᵀ: Rw acts on the span of W's orthonormal columns,
    the rest is left in place (W None: R = Rw on the whole space)."""

    def __init__(self, w, rw: torch.Tensor):
        self.w, self.rw = w, rw

    def _power(self, t: float) -> torch.Tensor:
        if t == 1:
            return self.rw
        if t == -1:
            return self.rw.T
        if float(t).is_integer():
            return torch.linalg.matrix_power(self.rw, int(t))
        return _orthogonal_power(self.rw, t)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if t == 0 or (self.w is not None and self.w.shape[1] == 0):
            return x
        p = self._power(t)
        if self.w is None:
            return x @ p.to(x.dtype)
        p = p.clone()
        p.diagonal().sub_(1.0)
        w = self.w.to(x.dtype)
        return x + (x @ w) @ p.to(x.dtype) @ w.T


def _completed(u: torch.Tensor, v: torch.Tensor, uc: torch.Tensor, vc: torch.Tensor, proper: bool) -> torch.Tensor:
    """u·vᵀ + uc·M·vcᵀ for orthonormal bases u, v and their complements uc, vc: the orthogonal matrix that
    maps u's columns onto v's, with the M that maximizes the trace (the completion closest to the identity).
    ``proper``: det +1, by flipping the least-weighted direction (Kabsch)."""
    if uc.shape[1]:
        px, _, qxh = torch.linalg.svd(vc.T @ uc, driver=svd_driver(uc))
        out = u @ v.T + uc @ (qxh.T @ px.T) @ vc.T
        if proper and torch.linalg.det(out) < 0:
            px = px.clone()
            px[:, -1] = -px[:, -1]
            out = u @ v.T + uc @ (qxh.T @ px.T) @ vc.T
        return out
    out = u @ v.T
    if proper and torch.linalg.det(out) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
        out = u @ v.T
    return out


def _rotation(a: torch.Tensor, b: torch.Tensor, proper: bool) -> _Rotation:
    """The orthogonal R minimizing ‖a·R − b‖ (rows are points). Where that leaves R free (AᵀB rank-deficient),
    R maps a's row space onto b's as the Procrustes SVD pairs them and is the completion closest to the
    identity elsewhere (the identity on what is orthogonal to both row spaces).
    ``proper``: det R = +1 (a rotation, so that its fractional powers are real)."""
    rows, cols = a.shape
    driver = svd_driver(a)
    if rows >= cols:   # cols × cols: the SVD's bases are complete
        u, s, vh = torch.linalg.svd(a.T @ b, driver=driver)
        r = _rank(s, (rows, cols))
        if r == 0:
            return _Rotation(a.new_zeros(cols, 0), a.new_zeros(0, 0))
        v = vh.T
        return _Rotation(None, _completed(u[:, :r], v[:, :r], u[:, r:], v[:, r:], proper))
    # wide: the same SVD through b's QR, without forming the cols × cols matrix; R is built on the
    # smallest subspace holding both row spaces (u and the part of v outside it)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(a.T @ rb.T, full_matrices=False, driver=driver)
    r = _rank(s, (rows, cols))
    if r == 0:
        return _Rotation(a.new_zeros(cols, 0), a.new_zeros(0, 0))
    u, v = u[:, :r], qb @ vh[:r].T
    # the principal angles between the row spaces (uᵀv = P·cos θ·Qᵀ): the columns of v·Q − u·P·cos θ are
    # orthogonal to u and to each other, of norm sin θ; those of a non-zero angle span v's part outside u
    p, cos, qh = torch.linalg.svd(u.T @ v)
    outside = v @ qh.T - u @ (p * cos)
    outside = outside[:, torch.linalg.vector_norm(outside, dim=0) > max(rows, cols) * torch.finfo(a.dtype).eps]
    outside = outside - u @ (u.T @ outside)     # once more: small angles leave rounding along u
    w = torch.cat((u, torch.linalg.qr(outside)[0]), 1)
    uw = w.T @ u
    vw = _polar(w.T @ v)
    return _Rotation(w, _completed(uw, vw, _complement(uw), _complement(vw), proper))


def _matrix_view(x: torch.Tensor):
    if x.dim() == 4 and x.shape[2] * x.shape[3] != 1:   # spatial conv: rotate the kernels
        return x.reshape(x.shape[0] * x.shape[1], -1)
    return x.reshape(x.shape[0], -1)


def rotate_tensor(a: torch.Tensor, b: torch.Tensor, alignment: float, alpha: float,
                  centralization: float) -> torch.Tensor:
    """A rotated toward B (see the module docstring); a new tensor, the inputs are not modified."""
    if alignment == 0 and alpha == 0:
        return a.clone()
    if alignment == 1 and alpha == 1:
        return b.clone()
    if a.dim() <= 1 or torch.allclose(a.half(), b.half()):
        return torch.lerp(a, b, alpha)
    a2, b2 = _matrix_view(a), _matrix_view(b)
    # the rotation from float64 copies: centred rows leave AᵀB a null direction that must come out null,
    # not at fp32 rounding level (see _rank); the transform is then applied in the compute dtype
    a64, b64 = a2.double(), b2.double()      # (the inputs themselves when they are float64: no in-place)
    a_mean, b_mean = a64.mean(0) * centralization, b64.mean(0) * centralization
    transform = _rotation(a64 - a_mean, b64 - b_mean, proper=not float(alignment).is_integer())
    del a64, b64
    a_mean, b_mean = a_mean.to(a.dtype), b_mean.to(a.dtype)
    a2, b2 = a2 - a_mean, b2 - b_mean
    if alpha != 0:
        a2 = torch.lerp(a2, transform(b2, -1), alpha)
    out = transform(a2, alignment) + torch.lerp(a_mean, b_mean, alignment)
    return out.reshape(a.shape)


@merge_method(
    "rotate", base=BASE_OPTIONAL, min_models=2, max_models=2, source="sd-mecha",
    help="Aligns model A with model B by an orthogonal transform (sd-mecha's rotate, orthogonal Procrustes): "
         "each weight is a matrix of rows (linear: (out, in); spatial conv: (out·in, kh·kw), its kernels), rows "
         "centred by centralization × their mean; R = U·Vᵀ from the SVD of AᵀB is the rotation that brings A "
         "closest to B; out = (A + alpha·(B·Rᵀ − A))·R^alignment + the means interpolated by alignment. "
         "alignment = alpha = 0 returns A, alignment = alpha = 1 returns B; alignment 1 alone turns A as close "
         "to B as a rotation can (row norms and angles kept). 1-D weights are lerped by alpha. With a base C, "
         "A − C is rotated toward B − C and C added back. Fractional alignments take R's matrix power by "
         "eigendecomposition (float64; slow for large layers on a CPU). Where AᵀB is rank-deficient (wide "
         "matrices, centred square ones) R is a true rotation too, which maps A's row space onto B's and "
         "leaves the rest in place; sd-mecha's low-rank map there is not orthogonal (it misses B even when B "
         "is exactly A rotated) and keeps arbitrary null-space vectors. Elsewhere both agree.",
    params=(Param("alignment", FLOAT, 1.0, "How far A is turned toward B: 0 = not at all, 1 = the full "
                  "Procrustes rotation; fractional values rotate part of the way, others extrapolate.",
                  min=-1.0, max=2.0, step=0.01),
            Param("alpha", FLOAT, 0.0, "Interpolates A toward B as seen in A's frame (B·Rᵀ) before the "
                  "rotation: what a rotation alone cannot match (scaling, shape). 0 = A's own.",
                  min=-1.0, max=2.0, step=0.01),
            Param("centralization", FLOAT, 1.0, "How much of the rows' mean is removed before aligning "
                  "(added back afterwards, interpolated by alignment). 1 aligns the centred rows, 0 the raw "
                  "ones.", min=0.0, max=1.0, step=0.01)),
)
def rotate(base, models, ctx, *, alignment, alpha, centralization):
    a, b = models[0], models[1]
    if base is None:
        return rotate_tensor(a, b, alignment, alpha, centralization)
    out = rotate_tensor(a - base, b - base, alignment, alpha, centralization)
    return out.add_(base)
