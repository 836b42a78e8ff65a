"""rotate (sd-mecha's orthogonal Procrustes alignment): hand examples, agreement with sd-mecha where the
rotation is unique, and the properties of the rotation where it is not (wide and centred square matrices)."""
import math

import pytest
import torch

import merge_methods as mm
from merge_methods.rotate import _rotation

from references import needs_mecha, sd_mecha


def run(base, models, **params):
    return mm.create("rotate", **params).merge(base, models, key="k")


def rot2(deg, dtype=torch.float64):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return torch.tensor([[c, s], [-s, c]], dtype=dtype)   # row vectors: x ↦ x·R turns by +deg


def random_rotation(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ============================================================================== by hand
def test_points_turned_by_30_degrees():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    b = a @ rot2(30)
    kw = dict(centralization=0.0)
    torch.testing.assert_close(run(None, [a, b], alignment=1.0, **kw), b)
    torch.testing.assert_close(run(None, [a, b], alignment=0.5, **kw), a @ rot2(15))
    torch.testing.assert_close(run(None, [a, b], alignment=-1.0, **kw), a @ rot2(-30))
    torch.testing.assert_close(run(None, [a, b], alignment=2.0, **kw), a @ rot2(60))
    # B seen in A's frame is A itself: alpha changes nothing here
    torch.testing.assert_close(run(None, [a, b], alignment=1.0, alpha=0.7, **kw), b)


def test_centring_aligns_the_shapes_and_interpolates_the_means():
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    shift_a, shift_b = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 5.0], dtype=torch.float64)
    b = a @ rot2(90) + shift_b
    out = run(None, [a + shift_a, b], alignment=0.5, centralization=1.0)
    torch.testing.assert_close(out, a @ rot2(45) + (shift_a + shift_b) / 2)


def test_a_wide_matrix_is_turned_in_the_plane_of_the_two_rows():
    a = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(run(None, [a, b], alignment=1.0, centralization=0.0), b)
    h = math.sqrt(2.0)
    torch.testing.assert_close(run(None, [a, b], alignment=0.5, centralization=0.0),
                               torch.tensor([[h, h, 0.0]], dtype=torch.float64))
    # sd-mecha's low-rank map gives [2, 2, 0] at alignment 1: not a rotation


def test_endpoints_vectors_and_inputs_untouched():
    a, b = randn(6, 4, seed=1), randn(6, 4, seed=2)
    a0, b0 = a.clone(), b.clone()
    assert torch.equal(run(None, [a, b], alignment=0.0, alpha=0.0), a)
    assert torch.equal(run(None, [a, b], alignment=1.0, alpha=1.0), b)
    v, w = randn(7, seed=3), randn(7, seed=4)
    torch.testing.assert_close(run(None, [v, w], alignment=0.5, alpha=0.25), torch.lerp(v, w, 0.25))
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_with_a_base_the_differences_are_rotated():
    a, b, c = randn(9, 5, seed=5), randn(9, 5, seed=6), randn(9, 5, seed=7)
    for kw in (dict(alignment=1.0), dict(alignment=0.4, alpha=0.3)):
        torch.testing.assert_close(run(c, [a, b], **kw), c + run(None, [a - c, b - c], **kw))


# ============================================================================== sd-mecha, where R is unique
def _mecha(a, b, alignment, alpha, centralization):
    from sd_mecha.extensions.builtin.merge_methods import svd
    return svd.rotate.__wrapped__({"k": a}, {"k": b}, alignment=alignment, alpha=torch.tensor(alpha, dtype=a.dtype),
                                  centralization=centralization, key="k", cache=None)


@needs_mecha
@pytest.mark.parametrize("shape,centralization", [((40, 30), 1.0), ((40, 30), 0.0), ((30, 30), 0.0),
                                                  ((30, 30), 0.5), ((8, 4, 3, 3), 1.0), ((16, 8, 1, 1), 1.0),
                                                  ((20, 3, 4), 0.3), ((64,), 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_sd_mecha_where_the_rotation_is_unique(shape, centralization, dtype):
    assert sd_mecha is not None
    a = randn(*shape, seed=11)
    b = a + 0.7 * randn(*shape, seed=12)
    for alignment, alpha in [(1.0, 0.0), (0.5, 0.0), (0.3, 0.4), (2.0, 0.0), (-1.0, 0.2), (1.0, 0.5)]:
        ref = _mecha(a, b, alignment, alpha, centralization)
        out = run(None, [a.to(dtype), b.to(dtype)], alignment=alignment, alpha=alpha, centralization=centralization)
        assert out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# ============================================================================== where it is not
@pytest.mark.parametrize("shape", [(20, 50), (1, 9), (12, 12), (6, 5, 3, 3)])
@pytest.mark.parametrize("centralization", [0.0, 1.0])
def test_an_exact_rotation_is_found_and_powers_compose(shape, centralization):
    a = randn(*shape, seed=21)
    rows = a.reshape(shape[0] * shape[1], -1) if len(shape) == 4 else a
    b = (rows @ random_rotation(rows.shape[1], 22)).reshape(shape)
    if centralization:
        b = b + 0.5   # a shift of every row: centring removes it again
    torch.testing.assert_close(run(None, [a, b], alignment=1.0, centralization=centralization), b)
    half = run(None, [a, b], alignment=0.5, centralization=centralization)
    # rows keep their norms and mutual angles (centred: relative to the mean) at any alignment
    h = half.reshape(rows.shape)
    ra, rh = rows - rows.mean(0) * centralization, h - h.mean(0) * centralization
    torch.testing.assert_close(rh @ rh.T, ra @ ra.T)


@pytest.mark.parametrize("shape", [(20, 50), (30, 30), (50, 20), (1, 4)])
def test_the_transform_is_orthogonal_with_inverse_and_fractional_powers(shape):
    a = randn(*shape, seed=31)
    a = a - a.mean(0)                       # centred: rank-deficient for the square shape
    b = randn(*shape, seed=32)
    b = b - b.mean(0)
    t = _rotation(a, b, proper=True)
    z = randn(7, shape[1], seed=33)
    torch.testing.assert_close(t(t(z, 1.0), -1.0), z)
    torch.testing.assert_close(t(t(z, 0.3), 0.7), t(z, 1.0))
    torch.testing.assert_close(t(z, 1.0) @ t(z, 1.0).T, z @ z.T)
    torch.testing.assert_close(t(z, 0.3) @ t(z, 0.3).T, z @ z.T)
    # it is the Procrustes optimum: no rotation brings A closer to B (compare with random ones near it)
    best = (t(a, 1.0) - b).norm()
    for seed in range(5):
        k = 1e-2 * randn(shape[1], shape[1], seed=40 + seed)
        assert (t(a, 1.0) @ torch.linalg.matrix_exp(k - k.T) - b).norm() >= best - 1e-12


def test_rank_zero_inputs_are_lerped_means():
    a = torch.zeros(4, 6, dtype=torch.float64)
    b = torch.ones(4, 6, dtype=torch.float64)   # centred: zero too
    torch.testing.assert_close(run(None, [a, b], alignment=0.5), torch.full((4, 6), 0.5, dtype=torch.float64))


def test_deterministic():
    a, b = randn(48, 96, seed=51, dtype=torch.float32), randn(48, 96, seed=52, dtype=torch.float32)
    first = run(None, [a, b], alignment=0.6, alpha=0.2)
    assert torch.equal(first, run(None, [a, b], alignment=0.6, alpha=0.2))


# ============================================================================== numerics
def _exact_rotation_case(rows, cols, scales, seed):
    a = randn(rows, cols, seed=seed) * scales
    return a, a @ random_rotation(cols, seed + 1)


def test_fp32_ill_conditioned_weights_keep_every_direction():
    """AᵀB squares the conditioning of the weights: a kernel spectrum falling to 2 % (a conv viewed as
    (out·in, 9)) or singular values falling to 3e-3 (a square weight) must not be taken for rank
    deficiency, or the rotation misses B (a rank tolerance on fp32 AᵀB dropped them: 20 % off)."""
    conv_scales = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    a, b = _exact_rotation_case(128 * 64, 9, conv_scales, 61)
    a4, b4 = a.reshape(128, 64, 3, 3).float(), b.reshape(128, 64, 3, 3).float()
    out = run(None, [a4, b4], alignment=1.0, centralization=0.0)
    assert rel(out, b4) < 1e-5
    u, _, vh = torch.linalg.svd(randn(512, 512, seed=62))
    a = (u * torch.logspace(0, -2.5, 512, dtype=torch.float64)) @ vh
    b = a @ random_rotation(512, 63)
    assert rel(run(None, [a.float(), b.float()], alignment=1.0, centralization=0.0), b) < 1e-4


def rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.mark.parametrize("shape,centralization", [((10, 2), 0.0), ((8, 6), 0.0), ((12, 12), 1.0),
                                                  ((6, 5, 3, 3), 1.0)])
def test_half_turns_are_turned_halfway(shape, centralization):
    """B = −A makes R = −I (every eigenvalue −1, the branch point of the matrix power): alignment 0.5 must
    still be a rotation (it used to give zeros or blow up), and twice it is the half turn."""
    a = randn(*shape, seed=64)
    half = run(None, [a, -a], alignment=0.5, centralization=centralization)
    rows = a.reshape(shape[0] * shape[1], -1) if len(shape) == 4 else a
    h = half.reshape(rows.shape)
    ra, rh = rows - rows.mean(0) * centralization, h - h.mean(0) * centralization
    torch.testing.assert_close(rh @ rh.T, ra @ ra.T)
    assert rel(rh, ra) > 0.5     # it did turn
    # the power of the half turn squares back to it
    from merge_methods.rotate import _orthogonal_power
    minus = -torch.eye(4, dtype=torch.float64)
    p = _orthogonal_power(minus, 0.5)
    torch.testing.assert_close(p @ p.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(p @ p, minus)
    # a rotation with two half-turn planes and one ordinary plane
    q = torch.block_diag(-torch.eye(4, dtype=torch.float64), rot2(40))
    p = _orthogonal_power(q, 0.25)
    torch.testing.assert_close(torch.linalg.matrix_power(p, 4), q)
    torch.testing.assert_close(p[4:, 4:], rot2(10))


def test_huge_magnitudes_scale_through():
    """Rotation commutes with scaling: 1e19-sized fp32 weights (whose AᵀB overflows fp32) give the scaled
    result of the unit-sized ones."""
    a, b = randn(12, 8, seed=65, dtype=torch.float32), randn(12, 8, seed=66, dtype=torch.float32)
    small = run(None, [a, b], alignment=0.7, alpha=0.2)
    big = run(None, [a * 1e19, b * 1e19], alignment=0.7, alpha=0.2)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big / 1e19, small, rtol=1e-5, atol=1e-6)
