"""crossover, add_cosine_a, add_cosine_b, tensor_sum, geometric_sum, clamp, truncate_rank, truncate_kronecker,
multiply_quotient, dropout (sd-mecha's methods): hand-checked examples, invariants, and agreement with sd-mecha on random tensors
(dropout, randomized: exactly at the settings that draw nothing at random and with its masks handed to
sd-mecha, statistically otherwise)."""
import importlib
import math

import numpy as np
import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError
from merge_methods import spec as spec_mod
from merge_methods.sd_mecha_methods import dropout_keep_masks, dropout_set_probabilities, kronecker_dims

from references import needs_mecha, sd_mecha

NAMES = ("crossover", "add_cosine_a", "add_cosine_b", "tensor_sum", "geometric_sum")  # and clamp (its own tests)
SHAPES = [(17,), (16,), (12, 9), (6, 4, 3, 3)]


def run(name, models, base=None, **params):
    return mm.create(name, **params).merge(base, models)


def gen(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def _mecha_module(name):
    return importlib.import_module(f"sd_mecha.extensions.builtin.merge_methods.{name}")


# ============================================================================== declarations
def test_declarations():
    for name in NAMES:
        spec = mm.get_spec(name)
        assert (spec.min_models, spec.max_models, spec.source) == (2, 2, "sd-mecha"), name
        assert spec.base == ("optional" if name == "tensor_sum" else "none"), name
        assert spec.elementwise == (name == "geometric_sum"), name
        assert not spec.randomized and not spec.result_is_model1
    assert "supermerger" in mm.get_spec("add_cosine_a").help and "per-key" in mm.get_spec("add_cosine_b").help
    for bad in ({"alpha": 1.1}, {"alpha": -0.1}, {"tilt": -0.5}):
        with pytest.raises(MergeError):
            mm.create("crossover", **bad)
    with pytest.raises(MergeError, match="alpha"):
        mm.create("geometric_sum", alpha=1.5)
    with pytest.raises(MergeError, match="width"):
        mm.create("tensor_sum", width=1.5)
    with pytest.raises(MergeError, match="base"):
        run("crossover", [t(1, 2), t(3, 4)], base=t(0, 0))
    with pytest.raises(MergeError, match="model"):
        run("geometric_sum", [t(1, 2)])


# ============================================================================== crossover
def test_crossover_by_hand_1d():
    # length 4: the half spectrum has the frequencies 0, 1, 2 at radius 0, 0.5, 1.
    # A = 2 + 1·(+1, −1, +1, −1): the mean and the highest frequency; B = 5 + (1, 0, −1, 0): the mean and frequency 1
    a, b = t(3, 1, 3, 1), t(6, 5, 4, 5)
    # tilt 0, alpha 0.5: B above radius 0.5 -> only frequency 2, where B has nothing: A's mean alone
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.5), t(2, 2, 2, 2))
    # alpha 0.6: B above radius 0.4 -> frequencies 1 and 2: A's mean + B's frequency 1
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.6), t(3, 2, 1, 2))
    # tilt 0.5 (slope cot 45° = 1) through (0.5, 0.5): shares of B 0, 0.5, 1 -> 2 + 0.5·(1, 0, −1, 0)
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.5, tilt=0.5), t(2.5, 2, 1.5, 2))
    # tilt 2: B below radius 0.5 -> only the mean from B, the rest from A
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.5, tilt=2.0), t(6, 4, 6, 4))
    # tilt 4 is tilt 0
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.6, tilt=4.0), t(3, 2, 1, 2))


def test_crossover_by_hand_2d():
    # a 2×2 spectrum: radius sqrt((r0² + r1²)/2) = [[0, √½], [√½, 1]]
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 4.0], [8.0, 0.0]])
    # alpha 0.5: everything above radius 0.5 from B, i.e. all but the mean: mean(A) + B − mean(B)
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.5), b + 2.5 - 3.0)
    # alpha 0.2: only radius 1, the checkerboard (+1, −1; −1, +1): A's coefficient (1 − 2 − 3 + 4)/4 = 0,
    # B's (0 − 4 − 8 + 0)/4 = −3
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.2), a - 3.0 * checker)


@pytest.mark.parametrize("shape", SHAPES)
def test_crossover_invariants(shape):
    r = gen(1)
    a, b = r(*shape), r(*shape)
    snapshot = (a.clone(), b.clone())
    assert torch.equal(run("crossover", [a, b], alpha=0.0, tilt=0.3), a)
    assert torch.equal(run("crossover", [a, b], alpha=1.0, tilt=0.3), b)
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.3, tilt=1.0), torch.lerp(a, b, 0.3))
    # tilt 3 leaves a flat share too (cot 3π/2 = 0): the lerp, through the FFT
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.3, tilt=3.0), torch.lerp(a, b, 0.3),
                               atol=1e-5, rtol=1e-5)
    out = run("crossover", [a, b], alpha=0.4)
    assert out.shape == a.shape and torch.isfinite(out).all()
    # tilt 0 with alpha < 1 keeps A's mean (the zero frequency is never B's)
    torch.testing.assert_close(out.mean(), a.mean(), atol=1e-5, rtol=1e-5)
    # tilt 0: the share of each frequency is 0 or 1, so every bin of the result's spectrum is A's or B's,
    # and both occur (the cut splits the spectrum)
    fa, fb, fo = (torch.fft.rfftn(x.double()) for x in (a, b, out))
    from_a, from_b = (fo - fa).abs() < 1e-4, (fo - fb).abs() < 1e-4
    assert (from_a | from_b).all()
    if a.dim() and a.numel() > 2:
        assert (from_a & ~from_b).any() and (from_b & ~from_a).any()
    # tilt 2 takes B below the cut: the same as the models swapped at tilt 0
    other = run("crossover", [b, a], alpha=0.4)
    torch.testing.assert_close(run("crossover", [a, b], alpha=0.4, tilt=2.0), other, atol=1e-6, rtol=1e-6)
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])


def test_crossover_degenerate_inputs_lerp():
    assert torch.equal(run("crossover", [torch.tensor(1.0), torch.tensor(3.0)], alpha=0.25), torch.tensor(1.5))
    a = gen(2)(6, 5)
    b = a + 1e-9            # allclose
    assert torch.equal(run("crossover", [a, b], alpha=0.5), torch.lerp(a, b, 0.5))


@needs_mecha
@pytest.mark.parametrize("shape", SHAPES + [(1,), (5, 1), (1, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crossover_agrees_with_sdmecha(shape, dtype):
    r = gen(3, dtype)
    a, b = r(*shape), r(*shape)
    for alpha, tilt in [(0.3, 0.0), (0.5, 0.4), (0.7, 1.5), (0.2, 2.0), (0.6, 2.7), (0.45, 3.6), (0.5, 1.0)]:
        out = run("crossover", [a, b], alpha=alpha, tilt=tilt)
        ref = sd_mecha.crossover.__wrapped__(a.clone(), b.clone(), alpha=alpha, tilt=tilt)
        assert out.dtype == dtype
        # the filter is fp32 in both (sd-mecha builds it so): its ramp rounds differently by ~1e-7
        torch.testing.assert_close(out, ref.to(dtype), atol=1e-6, rtol=1e-5)


@needs_mecha
def test_crossover_filter_is_sdmecha_s():
    """The share of B per frequency: sd-mecha's create_filter's, the hard cuts bit for bit."""
    from merge_methods.sd_mecha_methods import _crossover_filter
    create_filter = _mecha_module("crossover").create_filter
    for shape in [(7,), (8,), (1,), (2,), (5, 4), (6, 9), (1, 5), (4, 3, 3, 3), (3, 1, 1, 1)]:
        spectrum = torch.fft.rfftn(torch.zeros(shape)).shape
        for alpha in (0.1, 0.3, 0.5, 0.77):
            for tilt in (0.0, 0.25, 0.5, 0.999, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
                mine = _crossover_filter(tuple(spectrum), alpha, tilt, None)
                ref = create_filter(spectrum, alpha, tilt)
                if tilt in (0.0, 2.0, 4.0):
                    assert torch.equal(mine, ref), (shape, alpha, tilt)
                else:
                    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)


# ============================================================================== add_cosine_a / add_cosine_b
def _cosine_example():
    # columns: A (1, 0) and B (1, 1) at cos 1/√2; A (1, 1) and B (−1, 1) at cos 0
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    return a, b


def test_add_cosine_a_by_hand():
    a, b = _cosine_example()
    s0 = 1 / math.sqrt(2)
    # alpha 0: k = 1 − s: column 0 takes 1 − 1/√2 of B, column 1 (s = 0) all of B
    k0 = 1 - s0
    torch.testing.assert_close(run("add_cosine_a", [a, b], alpha=0.0), torch.tensor([[1.0, -1.0], [k0, 1.0]]))
    # alpha 0.5: k = 1 − (1/√2 − 0.5) in column 0; column 1 still B
    k0 = 1 - (s0 - 0.5)
    torch.testing.assert_close(run("add_cosine_a", [a, b], alpha=0.5), torch.tensor([[1.0, -1.0], [k0, 1.0]]))
    # alpha −1: column 0 clamps to k = 0 (A), column 1 k = 1 − 1 = 0 (A)
    torch.testing.assert_close(run("add_cosine_a", [a, b], alpha=-1.0), a)


def test_add_cosine_b_by_hand():
    a, b = _cosine_example()
    # whole tensors: ⟨A, B⟩ = 1 − 1 + 0 + 1 = 1, ‖A‖ = √3, ‖B‖ = 2
    whole = 1 / (2 * math.sqrt(3))
    s0, s1 = (1 / math.sqrt(2) + whole) / 2, (0 + whole) / 2
    k0, k1 = 1 - s0, 1 - s1
    expected = torch.tensor([[1.0, 1 + k1 * (-1 - 1)], [k0, 1.0]])
    torch.testing.assert_close(run("add_cosine_b", [a, b], alpha=0.0), expected)


@pytest.mark.parametrize("name", ["add_cosine_a", "add_cosine_b"])
@pytest.mark.parametrize("shape", [()] + SHAPES)
def test_add_cosine_invariants(name, shape):
    r = gen(4)
    a, b = r(*shape), r(*shape)
    snapshot = (a.clone(), b.clone())
    assert torch.equal(run(name, [a, b], alpha=1.0), b)
    assert torch.equal(run(name, [a, b], alpha=-2.0), a)
    out = run(name, [a, b], alpha=0.2)
    assert out.shape == a.shape
    # out = A + k·(B − A) with one k in [0, 1] per position along dims 1..: the same k down every column
    k = (out - a) / (b - a)
    assert bool(((k >= -1e-5) & (k <= 1 + 1e-5)).all())
    if a.dim() >= 1:
        torch.testing.assert_close(k, k[:1].expand_as(k), atol=1e-4, rtol=1e-4)
    # identical models: B (= A)
    assert torch.equal(run(name, [a, a.clone()], alpha=0.2), a)
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])


def test_add_cosine_zero_tensors():
    """A zero column has similarity 0 (take all of B at alpha 0); add_cosine_b's whole-tensor cosine is 0, not
    NaN, when a model is all zeros."""
    b = gen(5)(4, 3)
    zero = torch.zeros(4, 3)
    for name in ("add_cosine_a", "add_cosine_b"):
        assert torch.equal(run(name, [zero, b], alpha=0.0), b), name
        assert torch.equal(run(name, [b, zero], alpha=0.0), zero), name


@needs_mecha
@pytest.mark.parametrize("name", ["add_cosine_a", "add_cosine_b"])
@pytest.mark.parametrize("shape", [()] + SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_cosine_agrees_with_sdmecha(name, shape, dtype):
    r = gen(6, dtype)
    a = r(*shape)
    b = a + 0.7 * r(*shape)     # similar enough that the clamp is not always saturated
    ref_fn = getattr(sd_mecha, name).__wrapped__
    for alpha in (-1.5, -0.3, 0.0, 0.4, 0.9):
        out = run(name, [a, b], alpha=alpha)
        ref = ref_fn(a.clone(), b.clone(), alpha=torch.tensor(alpha, dtype=dtype))
        assert out.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_mecha
def test_add_cosine_a_of_tiny_columns_agrees_with_sdmecha():
    """Columns of norm ~1e-9 (below cosine_similarity's 1e-8 norm floor): sd-mecha normalizes them first, so
    their similarity is their true cosine, not a value shrunk toward 0."""
    r = gen(7)
    a = r(6, 3) * 1e-9
    b = a + 0.3 * r(6, 3) * 1e-9
    for alpha in (0.0, 0.5):
        ref = sd_mecha.add_cosine_a.__wrapped__(a.clone(), b.clone(), alpha=torch.tensor(alpha))
        torch.testing.assert_close(run("add_cosine_a", [a, b], alpha=alpha), ref, rtol=1e-5, atol=1e-15)


def test_add_cosine_of_huge_weights_is_scale_free():
    """The similarities do not depend on the scale: 1e19-sized fp32 weights (whose squares overflow) give
    the scaled result of unit-sized ones."""
    r = gen(8)
    a, b = r(8, 6), r(8, 6)
    for name in ("add_cosine_a", "add_cosine_b"):
        big = run(name, [a * 1e19, b * 1e19], alpha=0.2)
        assert torch.isfinite(big).all(), name
        torch.testing.assert_close(big / 1e19, run(name, [a, b], alpha=0.2), rtol=1e-5, atol=1e-6)


# ============================================================================== tensor_sum
def _rows(n):
    """A: rows of 0, B: rows of 1, 2 columns, so the result's first column says where B was copied."""
    return torch.zeros(n, 2), torch.ones(n, 2)


@pytest.mark.parametrize("width, offset, b_rows", [
    (0.4, 0.2, [1, 2]),             # rows [1, 3)
    (0.5, 0.8, [0, 1, 4]),          # from row 4 past the end, wrapping to rows 0, 1 (1.5 rounds to 2)
    (-0.4, 0.6, [1, 2]),            # ends at row 3
    (0.5, 0.0, [0, 1]),             # 2.5 rounds half to even: rows [0, 2)
    (0.7, 0.0, [0, 1, 2, 3]),       # 3.5 rounds half to even: rows [0, 4)
    (0.0, 0.3, []),
    (1.0, 0.0, [0, 1, 2, 3, 4]),
    (1.0, 0.6, [0, 1, 2, 3, 4]),    # wraps all the way round
])
def test_tensor_sum_by_hand(width, offset, b_rows):
    a, b = _rows(5)
    out = run("tensor_sum", [a, b], width=width, offset=offset)
    assert out[:, 0].nonzero().flatten().tolist() == b_rows
    assert torch.equal(out[:, 0], out[:, 1])


def test_tensor_sum_zero_dim_and_base():
    a, b = torch.tensor(2.0), torch.tensor(7.0)
    assert torch.equal(run("tensor_sum", [a, b], width=0.6), b)
    assert torch.equal(run("tensor_sum", [a, b], width=0.5), a)
    # with a base C: C + tensor_sum(A − C, B − C); rows 1, 2 of B − C = (10, 20) on top of C = 1
    a = torch.tensor([[4.0], [5.0], [6.0], [7.0], [8.0]])
    b = torch.tensor([[0.0], [11.0], [21.0], [0.0], [0.0]])
    c = torch.ones(5, 1)
    out = run("tensor_sum", [a, b], base=c, width=0.4, offset=0.2)
    torch.testing.assert_close(out, torch.tensor([[4.0], [11.0], [21.0], [7.0], [8.0]]))


@pytest.mark.parametrize("shape", [()] + SHAPES)
def test_tensor_sum_invariants(shape):
    r = gen(7)
    a, b, c = r(*shape), r(*shape), r(*shape)
    snapshot = (a.clone(), b.clone(), c.clone())
    assert torch.equal(run("tensor_sum", [a, b], width=0.0, offset=0.3), a)
    assert torch.equal(run("tensor_sum", [a, b], width=1.0, offset=0.3), b)
    out = run("tensor_sum", [a, b], width=0.35, offset=0.8)
    assert out.shape == a.shape
    assert bool(((out == a) | (out == b)).all())
    # the base variant is C + tensor_sum(A − C, B − C)
    for width, offset in [(0.35, 0.8), (0.5, 0.1), (-0.3, 0.2), (0.7, 0.0)]:
        with_base = run("tensor_sum", [a, b], base=c, width=width, offset=offset)
        plain = run("tensor_sum", [a - c, b - c], width=width, offset=offset)
        assert torch.equal(with_base, c + plain), (width, offset)
    for x, y in zip((a, b, c), snapshot):
        assert torch.equal(x, y)


@needs_mecha
@pytest.mark.parametrize("shape", [()] + SHAPES + [(1, 4), (320,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_base", [False, True])
def test_tensor_sum_agrees_with_sdmecha(shape, dtype, with_base):
    """Bit for bit, with sd-mecha's copy_region: C + tensor_sum(A − C, B − C) with a base."""
    ref_fn = _mecha_module("slicing").tensor_sum.__wrapped__     # sd_mecha.tensor_sum is the copy_region wrapper
    r = gen(8, dtype)
    a, b, c = r(*shape), r(*shape), r(*shape)
    for width in (-1.0, -0.55, -0.2, 0.0, 0.13, 0.5, 0.51, 0.75, 1.0):
        for offset in (0.0, 0.05, 0.3, 0.5, 0.9, 1.0):
            if with_base:
                out = run("tensor_sum", [a, b], base=c, width=width, offset=offset)
                ref = c + ref_fn((a - c).clone(), (b - c).clone(), width=width, offset=offset)
            else:
                out = run("tensor_sum", [a, b], width=width, offset=offset)
                ref = ref_fn(a.clone(), b.clone(), width=width, offset=offset)
            assert torch.equal(out, ref), (width, offset)


@needs_mecha
def test_tensor_sum_region_is_sdmecha_s():
    from merge_methods.ops import ratio_to_region
    reference = _mecha_module("slicing").ratio_to_region
    for n in (1, 2, 5, 7, 10, 320, 1280):
        for w in [x / 40 for x in range(-40, 41)]:
            for o in [x / 40 for x in range(0, 41)]:
                assert ratio_to_region(w, o, n) == reference(w, o, n), (n, w, o)


# ============================================================================== geometric_sum
def test_geometric_sum_by_hand():
    a = t(4, -4, 4, -4, 0, 2, 0)
    b = t(9, 9, -9, -9, 5, 0, 0)
    # alpha 0.5: √(|A|·|B|) = 6, rotated by half of each negative value's half-turn: 6, 6·cos(90°) = 0, 0, −6
    torch.testing.assert_close(run("geometric_sum", [a, b], alpha=0.5), t(6, 0, 0, -6, 0, 0, 0), atol=1e-6, rtol=0)
    # alpha 0.25: |A|^¾·|B|^¼ = 2^1.5·3^0.5 = √24; A < 0 turns it by 135° (cos −1/√2), B < 0 by 45° (cos 1/√2)
    m = math.sqrt(24)
    expected = t(m, -m / math.sqrt(2), m / math.sqrt(2), -m, 0, 0, 0)
    torch.testing.assert_close(run("geometric_sum", [a, b], alpha=0.25), expected)
    # positive values: the weighted geometric mean
    torch.testing.assert_close(run("geometric_sum", [t(1, 8), t(8, 1)], alpha=1 / 3), t(2, 4))


@pytest.mark.parametrize("shape", [()] + SHAPES)
def test_geometric_sum_invariants(shape):
    r = gen(9)
    a, b = r(*shape), r(*shape)
    a.reshape(-1)[:2] = 0.0                     # zeros: 0^0 is 1 here, so the ends stay exact
    snapshot = (a.clone(), b.clone())
    assert torch.equal(run("geometric_sum", [a, b], alpha=0.0), a)
    assert torch.equal(run("geometric_sum", [a, b], alpha=1.0), b)
    out = run("geometric_sum", [a, b], alpha=0.3)
    assert out.shape == a.shape and torch.isfinite(out).all()
    # |out| = |A|^0.7·|B|^0.3 where A and B have the same sign
    same = (a * b) > 0
    torch.testing.assert_close(out.abs()[same], (a.abs() ** 0.7 * b.abs() ** 0.3)[same])
    assert bool((out.sign()[same] == a.sign()[same]).all())
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])


def test_geometric_sum_is_sliced_bit_identically(monkeypatch):
    r = gen(10)
    a, b = r(5000), r(5000)
    m = mm.create("geometric_sum", alpha=0.37)
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = m.merge(None, [a, b])
    monkeypatch.setattr(spec_mod, "SLICE", 512)
    assert torch.equal(m.merge(None, [a, b]), whole)


@needs_mecha
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_geometric_sum_agrees_with_sdmecha(shape, dtype):
    """On tensors without zeros (where sd-mecha's complex pow gives NaN at alpha 0 and 1)."""
    r = gen(11, dtype)
    a, b = r(*shape), r(*shape)
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    for alpha in (0.0, 0.2, 0.5, 0.8, 1.0):
        out = run("geometric_sum", [a, b], alpha=alpha)
        ref = sd_mecha.geometric_sum.__wrapped__(a.clone(), b.clone(), alpha=torch.tensor(alpha, dtype=dtype))
        assert out.dtype == dtype
        # sd-mecha's complex product leaves a rounding error of the magnitudes' size where the signs differ
        # at alpha 0.5 (cos 90° in fp32: ~4e-8); elsewhere both are the same to rounding
        tol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(out, ref, atol=tol * scale, rtol=tol)


# ============================================================================== clamp
def test_clamp_by_hand():
    value = t(5.0, -3.0, 0.5, 2.0)
    b1, b2 = t(1.0, 1.0, 0.0, 2.0), t(2.0, -1.0, 1.0, 2.0)
    # ranges [1, 2], [-1, 1], [0, 1], [2, 2]
    assert torch.equal(run("clamp", [value, b1, b2]), t(2.0, -1.0, 0.5, 2.0))
    # two bounds: the values nearest the mean on either side are the bounds themselves
    assert torch.equal(run("clamp", [value, b1, b2], stiffness=1.0), t(2.0, -1.0, 0.5, 2.0))
    # three bounds 0, 1, 10 (mean 11/3): nearest below 1, nearest above 10; stiffness 0.5: lo 0.5, hi 10
    v = t(-5.0, 0.2, 20.0)
    b = [t(0.0, 0.0, 0.0), t(1.0, 1.0, 1.0), t(10.0, 10.0, 10.0)]
    assert torch.equal(run("clamp", [v, *b]), t(0.0, 0.2, 10.0))
    assert torch.equal(run("clamp", [v, *b], stiffness=0.5), t(0.5, 0.5, 10.0))
    assert torch.equal(run("clamp", [v, *b], stiffness=1.0), t(1.0, 1.0, 10.0))


def test_clamp_invariants():
    r = gen(71)
    value, bounds = r(40, 30) * 3, [r(40, 30) for _ in range(3)]
    keep = [x.clone() for x in (value, *bounds)]
    for stiffness in (0.0, 0.3, 1.0):
        out = run("clamp", [value, *bounds], stiffness=stiffness)
        stack = torch.stack(bounds)
        assert (out >= stack.amin(0)).all() and (out <= stack.amax(0)).all()
        inside = (value >= stack.amin(0)) & (value <= stack.amax(0))
        if stiffness == 0.0:
            assert torch.equal(out[inside], value[inside])
    assert all(torch.equal(x, y) for x, y in zip(keep, (value, *bounds)))
    spec = mm.get_spec("clamp")
    assert spec.elementwise and spec.min_models == 2 and spec.max_models is None and spec.base == "none"


@needs_mecha
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bounds", [1, 2, 4])
def test_clamp_agrees_with_sdmecha(dtype, n_bounds):
    r = gen(72 + n_bounds, dtype)
    value = r(33, 7) * 2
    bounds = [r(33, 7) for _ in range(n_bounds)]
    bounds[0][0, :3] = bounds[-1][0, :3]   # ties
    for stiffness in (0.0, 0.4, 1.0):
        want = sd_mecha.clamp.__wrapped__(value, *bounds, stiffness=stiffness)
        got = run("clamp", [value, *bounds], stiffness=stiffness)
        torch.testing.assert_close(got, want, rtol=0, atol=0 if stiffness in (0.0, 1.0) else 1e-6)


# ============================================================================== truncate_rank
def test_truncate_rank_keeps_the_best_low_rank_difference():
    r = gen(81, torch.float64)
    c = r(24, 40)
    u, _ = torch.linalg.qr(r(24, 24))
    v, _ = torch.linalg.qr(r(40, 24))
    s = torch.linspace(10.0, 0.5, 24, dtype=torch.float64)
    a = c + (u * s) @ v.T                      # a difference with known singular values
    out = run("truncate_rank", [a], base=c, rank_ratio=0.25)            # round(0.25·24) = 6
    kept = out - c
    assert torch.linalg.matrix_rank(kept) == 6
    torch.testing.assert_close(kept, (u[:, :6] * s[:6]) @ v[:, :6].T)
    # Eckart–Young: the error is the dropped singular values
    torch.testing.assert_close((a - out).norm(), s[6:].square().sum().sqrt())
    assert torch.equal(run("truncate_rank", [a], base=c, rank_ratio=1.0), a)
    assert torch.equal(run("truncate_rank", [a], base=c, rank_ratio=0.0), c)
    vec = r(40)
    assert torch.equal(run("truncate_rank", [vec], base=torch.zeros(40, dtype=torch.float64), rank_ratio=0.1), vec)
    spec = mm.get_spec("truncate_rank")
    assert (spec.base, spec.min_models, spec.max_models, spec.elementwise) == ("required", 1, 1, False)


@pytest.mark.parametrize("magnitude", [3e37, 1e-41])
def test_truncate_rank_of_huge_and_tiny_differences(magnitude):
    """fp32 differences of 3e37 per entry have a top singular value above fp32's range, subnormal ones lose
    digits: they are scaled by a power of two (exact) first, so the result is the fp64 one to fp32 rounding."""
    r = gen(83)
    a = r(64, 48) * magnitude
    c = torch.zeros(64, 48)
    out = run("truncate_rank", [a], base=c, rank_ratio=0.25)
    assert out.isfinite().all()
    want = run("truncate_rank", [a.double()], base=c.double(), rank_ratio=0.25)
    # fp32 SVD rounding on entries of about `magnitude` (subnormal outputs are 2^-149 ≈ 1.4e-45 apart)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4 * magnitude)


@needs_mecha
@pytest.mark.parametrize("shape", [(30, 20), (16, 8, 3, 3), (12, 5, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncate_rank_agrees_with_sdmecha(shape, dtype):
    r = gen(82, dtype)
    a, c = r(*shape), r(*shape)
    full = min(shape[0], math.prod(shape[1:]))
    for ratio in (0.1, 0.5, 0.9):
        rank = sd_mecha.get_rank_from_ratio.__wrapped__(a - c, ratio=ratio)
        assert rank == min(max(round(full * ratio), 0), full)
        ref = c + _mecha_module("svd").truncate_rank.__wrapped__(a - c, rank=rank, use_approximate_basis=False)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(run("truncate_rank", [a], base=c, rank_ratio=ratio), ref, rtol=tol, atol=tol)


# ============================================================================== truncate_kronecker
def test_truncate_kronecker_by_hand():
    """A 4×4 difference that is exactly [[1, 2], [3, 4]] ⊗ [[1, 0], [0, −1]] plus a part orthogonal to every
    Kronecker product of that split: the product is kept, the rest dropped."""
    w1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    w2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert kronecker_dims((4, 4), 0.5) == (2, 2, 2, 2)
    # X1 ⊗ X2 with X1·W1 = 0 and X2·W2 = 0 (entrywise sums): rearranged, orthogonal to W1 ⊗ W2 on both sides
    noise = torch.kron(torch.tensor([[2.0, -1.0], [0.0, 0.0]], dtype=torch.float64),
                       torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    c = gen(91, torch.float64)(4, 4)
    out = run("truncate_kronecker", [c + torch.kron(w1, w2) + 0.5 * noise], base=c, kronecker_ratio=0.5)
    torch.testing.assert_close(out, c + torch.kron(w1, w2), rtol=1e-12, atol=1e-12)


def test_kronecker_dims_follow_the_ratio():
    # 12 × 8: W1 sizes m1·n1 from 1 to 96, balanced at √96 ≈ 9.8
    assert kronecker_dims((12, 8), 0.0) == (1, 12, 1, 8)         # W1 a scalar
    assert kronecker_dims((12, 8), 1.0) == (12, 1, 8, 1)         # W2 a scalar
    m1, m2, n1, n2 = kronecker_dims((12, 8), 0.5)
    assert (m1 * m2, n1 * n2) == (12, 8) and m1 * n1 in (8, 12)  # the sizes nearest 9.8 (ln 8, ln 12 straddle)
    # primes: only trivial splits of each side; s = ln(m1·n1) − ln(315)/2 is −2.88, −1.27, −0.93 or 0.68, and
    # 0.68 (W1 the whole 7 × 5, W2 the kernel) is nearest the balanced 0
    assert kronecker_dims((7, 5, 3, 3), 0.5) == (7, 1, 5, 1)
    # a convolution at ratio 1 is still truncated: W2 keeps the 3 × 3 kernel
    r = gen(95, torch.float64)
    a, c = r(4, 4, 3, 3), r(4, 4, 3, 3)
    assert kronecker_dims((4, 4, 3, 3), 1.0) == (4, 1, 4, 1)
    assert not torch.allclose(run("truncate_kronecker", [a], base=c, kronecker_ratio=1.0), a)
    assert torch.equal(run("truncate_kronecker", [a], base=c, kronecker_ratio=0.0), a)
    sizes = [kronecker_dims((320, 1280), r) for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    w1 = [m1 * n1 for m1, _, n1, _ in sizes]
    assert w1 == sorted(w1) and len(set(w1)) == len(w1)          # W1 grows with the ratio


@pytest.mark.parametrize("shape", [(12, 8), (16, 6, 3, 3), (9, 10, 1, 1)])
def test_truncate_kronecker_is_the_nearest_kronecker_product(shape):
    """The result minus C is a Kronecker product W1 ⊗ W2 of the chosen split, and no other product is nearer
    to A − C: a rank-1 matrix once rearranged, whose residual is orthogonal to it (least squares)."""
    r = gen(92, torch.float64)
    a, c = r(*shape), r(*shape)
    for ratio in (0.0, 0.3, 0.5, 0.8, 1.0):
        out = run("truncate_kronecker", [a], base=c, kronecker_ratio=ratio)
        m1, m2, n1, n2 = kronecker_dims(shape, ratio)
        p = math.prod(shape[2:])

        def rearranged(x):
            return x.reshape(m1, m2, n1, n2 * p).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2 * p)

        kept, full = rearranged(out - c), rearranged(a - c)
        if min(kept.shape) == 1:
            torch.testing.assert_close(out, a, rtol=0, atol=1e-12)     # nothing to truncate
            continue
        assert torch.linalg.matrix_rank(kept) == 1
        torch.testing.assert_close((full - kept).mul(kept).sum(), torch.zeros((), dtype=torch.float64),
                                   rtol=0, atol=1e-10)
        s = torch.linalg.svdvals(full)
        torch.testing.assert_close((full - kept).norm(), s[1:].square().sum().sqrt())   # Eckart–Young
    vec = r(10)
    assert torch.equal(run("truncate_kronecker", [vec], base=torch.zeros(10, dtype=torch.float64)), vec)
    spec = mm.get_spec("truncate_kronecker")
    assert (spec.base, spec.min_models, spec.max_models, spec.elementwise) == ("required", 1, 1, False)


@needs_mecha
@pytest.mark.parametrize("shape", [(30, 20), (16, 8, 3, 3), (12, 5, 1, 1), (64, 48), (13, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncate_kronecker_agrees_with_sdmecha(shape, dtype):
    kron = _mecha_module("kronecker")
    r = gen(93, dtype)
    a, c = r(*shape), r(*shape)
    for ratio in (0.0, 0.2, 0.5, 0.65, 1.0):
        assert kronecker_dims(shape, ratio) == kron.kron_dims_from_ratio(torch.Size(shape), ratio)
        # sd-mecha's exact mode (a full SVD) in fp64: its fp32 SVD is the less accurate of the two
        ref = c.double() + kron.truncate_kronecker.__wrapped__((a - c).double(), kronecker_ratio=ratio,
                                                               use_approximate_basis=False)
        tol = 2e-6 if dtype == torch.float32 else 1e-12
        got = run("truncate_kronecker", [a], base=c, kronecker_ratio=ratio)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_top_eigenvector_by_inverse_iteration():
    """The rank-1 path's top eigenvector (inverse iteration on σI − G) is eigh's, up to sign; a start with no
    component along it, or a zero matrix, leaves the decision to eigh (None)."""
    from merge_methods.sd_mecha_methods import _top_eigenvector
    r = gen(96, torch.float64)
    for n, m in ((40, 60), (64, 64), (100, 30)):
        d = r(n, m)
        gram = d @ d.T
        want = torch.linalg.eigh(gram)[1][:, -1:]
        got = _top_eigenvector(gram)
        assert got is not None
        torch.testing.assert_close(got * torch.sign((got * want).sum()), want, rtol=0, atol=1e-10)
    # near-equal top eigenvalues (1 and 1 − 1e-6): still the top one
    q, _ = torch.linalg.qr(r(30, 30))
    gram = (q * torch.cat([torch.tensor([1.0, 1.0 - 1e-6]), torch.linspace(0.5, 0.0, 28)])) @ q.T
    got = _top_eigenvector(gram)
    assert abs(float((got[:, 0] * q[:, 0]).sum())) > 1 - 1e-6
    # block-diagonal: the column of largest norm (e5, eigenvalue 0.9) has no component along the top vector
    # (1, 1, 1, 1, 0)/2; the start is not a column
    u1 = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0], dtype=torch.float64)
    e5 = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    got = _top_eigenvector(torch.outer(u1, u1) + 0.9 * torch.outer(e5, e5))
    torch.testing.assert_close(got[:, 0].abs(), u1, rtol=0, atol=1e-12)
    from merge_methods.sd_mecha_methods import best_low_rank
    d = torch.outer(u1, u1) + 0.9 ** 0.5 * torch.outer(e5, e5)      # d·dᵀ is that matrix
    torch.testing.assert_close(best_low_rank(d, 1), torch.outer(u1, u1), rtol=0, atol=1e-12)
    # any magnitude (best_low_rank scales its input, this function does not need it to)
    h = r(20, 30)
    g0 = h @ h.T
    for k in (1e-300, 1e300):
        torch.testing.assert_close(_top_eigenvector(g0 * k), _top_eigenvector(g0), rtol=0, atol=1e-12)
    assert _top_eigenvector(torch.zeros(4, 4, dtype=torch.float64)) is None
    # the fallback: where the check fails, best_low_rank takes eigh's vector
    import merge_methods.sd_mecha_methods as smm
    try:
        smm._top_eigenvector, saved = (lambda g: None), smm._top_eigenvector
        torch.testing.assert_close(best_low_rank(d, 1), torch.outer(u1, u1), rtol=0, atol=1e-12)
    finally:
        smm._top_eigenvector = saved


@pytest.mark.parametrize("magnitude", [3e37, 1e-41])
def test_truncate_kronecker_of_huge_and_tiny_differences(magnitude):
    r = gen(94)
    a = r(48, 32) * magnitude
    c = torch.zeros(48, 32)
    out = run("truncate_kronecker", [a], base=c)
    assert out.isfinite().all()
    want = run("truncate_kronecker", [a.double()], base=c.double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4 * magnitude)


# ============================================================================== multiply_quotient
def test_multiply_quotient_by_hand():
    e = math.e
    c = t(1.0, 1.0, 1.0, 1.0, -1.0, 2.0)
    # log ratios (a, b): (1, −2), (2, −1), (1, 2) (same direction), (1, −2) with B < 0 < C, (1, −2) with B and C
    # negative (B/C > 0), (0, 1)
    a = t(e, e ** 2, e, e, -e, 2.0)
    b = t(e ** -2, e ** -1, e ** 2, -e ** -2, -e ** -2, 2 * e)
    # x = alpha·|a|·|b|/max²: 0.5, 0.5, 0, 0.5, 0.5, 0 at alpha 1; out = A·|B/C|^x (·cos πx where B/C < 0)
    want = t(1.0, e ** 1.5, e, 0.0, -1.0, 2.0)
    torch.testing.assert_close(run("multiply_quotient", [a, b], base=c, alpha=1.0), want, atol=1e-6, rtol=1e-6)
    # alpha 0.5: x = 0.25 and cos(π/4) where B/C < 0; |b| ≥ |a| gives |C|^½·|A|^½
    h = math.cos(math.pi / 4)
    want = t(e ** 0.5, e ** 1.75, e, e ** 0.5 * h, -(e ** 0.5), 2.0)
    torch.testing.assert_close(run("multiply_quotient", [a, b], base=c, alpha=0.5), want)


def test_multiply_quotient_zeros_and_equal_magnitudes_return_a():
    a = t(0.0, 2.0, 2.0, 2.0, 0.0, 3.0, -3.0, 2.0, 0.0)
    b = t(2.0, 0.0, 2.0, 2.0, 0.0, 3.0, 3.0, -2.0, 5.0)
    c = t(1.0, 1.0, 0.0, 2.0, 0.0, 3.0, 3.0, 2.0, 0.0)
    for alpha in (0.5, 1.0, 2.0, -1.0):
        assert torch.equal(run("multiply_quotient", [a, b], base=c, alpha=alpha), a), alpha


@pytest.mark.parametrize("shape", [()] + SHAPES)
def test_multiply_quotient_invariants(shape):
    r = gen(91)
    c = r(*shape)
    a, b = c * (0.4 * r(*shape)).exp(), c * (0.4 * r(*shape)).exp()
    keep = (a.clone(), b.clone(), c.clone())
    assert torch.equal(run("multiply_quotient", [a, b], base=c, alpha=0.0), a)
    out = run("multiply_quotient", [a, b], base=c, alpha=1.0)
    assert out.shape == a.shape and torch.isfinite(out).all()
    # same signs everywhere (B/C > 0): |out| lies between |A| and |C| in log space, pulled from A toward C
    la, lc, lo = a.abs().log(), c.abs().log(), out.abs().log()
    assert bool(((lo - la) * (la - lc) <= 1e-6).all()) and bool(((lo - lc).abs() <= (la - lc).abs() + 1e-6).all())
    assert bool((out.sign() == a.sign()).all())
    # where A and B moved the same way, A unchanged
    same = (la - lc) * (b.abs().log() - lc) >= 0
    assert torch.equal(out[same], a[same])
    assert all(torch.equal(x, y) for x, y in zip(keep, (a, b, c)))


def test_multiply_quotient_has_no_quotient_to_overflow():
    """Deliberate difference: sd-mecha's fp32 B/C = 1e40 overflows, its NaN is replaced by A; here
    |B/C|^x = e^(x·(ln|B| − ln|C|)) stays finite: the log ratios a = ln 1e-10, b = ln 1e40 give x = |a|/|b| = 1/4,
    |out| = 1e-20·(1e40)^(1/4) = 1e-10 = |C| (B > 0), and cos(π/4) of it (B < 0)."""
    a, b, c = torch.tensor([1e-20, 1e-20]), torch.tensor([1e30, -1e30]), torch.tensor([1e-10, 1e-10])
    got = run("multiply_quotient", [a, b], base=c, alpha=1.0)
    x = math.log(1e10) * math.log(1e40) / math.log(1e40) ** 2
    want = 1e-20 * (1e40 ** x) * torch.tensor([1.0, math.cos(math.pi * x)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    ref = _mecha_module("linear").multiply_quotient.__wrapped__(a, b, c, alpha=torch.tensor(1.0))
    assert torch.equal(ref, a)


@needs_mecha
@pytest.mark.parametrize("shape", [()] + SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiply_quotient_agrees_with_sdmecha(shape, dtype):
    """Random magnitudes around C's, a fifth of B's signs flipped (the complex power's cos factor), and zeros,
    equal magnitudes and sign flips planted: within a few ulp (sd-mecha's complex pow rounds differently)."""
    r = gen(92, dtype)
    c = r(*shape)
    a, b = c * (0.5 * r(*shape)).exp(), c * (0.5 * r(*shape)).exp()
    b = torch.where(r(*shape) > 0.85, -b, b)
    a = torch.where(r(*shape) > 0.9, -a, a)
    if a.numel() > 8:
        flat_a, flat_b, flat_c = a.view(-1), b.view(-1), c.view(-1)
        flat_a[0], flat_b[1], flat_c[2] = 0.0, 0.0, 0.0
        flat_a[3] = flat_c[3]
        flat_b[4] = -flat_c[4]
        flat_a[5], flat_b[5] = flat_c[5], flat_c[5]
    ref_fn = _mecha_module("linear").multiply_quotient.__wrapped__
    scale = float(torch.stack([a.abs().max(), b.abs().max(), c.abs().max()]).max())
    for alpha in (0.0, 0.3, 1.0, 2.0, -1.0):
        out = run("multiply_quotient", [a, b], base=c, alpha=alpha)
        ref = ref_fn(a.clone(), b.clone(), c.clone(), alpha=torch.tensor(alpha, dtype=dtype))
        assert out.dtype == dtype
        tol = 2e-6 if dtype == torch.float32 else 5e-15
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)



@pytest.mark.parametrize("name", ["multiply_quotient", "dropout"])
def test_the_method_functions_leave_their_inputs_alone(name):
    """Called directly (merge() hands a method a stacked copy of the models, so only a direct call can show an
    in-place change), in fp32 and fp64."""
    spec = mm.get_spec(name)
    for dtype in (torch.float32, torch.float64):
        r = gen(99, dtype)
        models = torch.stack([r(6, 5) for _ in range(2)])
        base = r(6, 5)
        keep_m, keep_b = models.clone(), base.clone()
        method = mm.create(name, **({"probability": 0.5} if name == "dropout" else {}))
        spec.fn(base, models, mm.MergeContext(key="k"), **{p.name: method.get(p.name) for p in spec.global_params})
        assert torch.equal(models, keep_m) and torch.equal(base, keep_b), name


# ============================================================================== dropout
def _ties():
    return _mecha_module("ties")


class _TorchWithNumpyLerp:
    """sd-mecha 1.1.8's overlapping_sets_pmf calls torch.lerp on numpy arrays (a TypeError): this stands in for
    its module's ``torch`` with a lerp that takes them, so that its distribution can be compared."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def lerp(start, end, weight):
        if isinstance(start, np.ndarray):
            return start + weight * (end - start)
        return torch.lerp(start, end, weight)


@pytest.fixture
def mecha_ties(monkeypatch):
    ties = _ties()
    monkeypatch.setattr(ties, "torch", _TorchWithNumpyLerp())
    return ties


def _dropout_inputs(n, shape=(30, 20), dtype=torch.float32, seed=101):
    r = gen(seed, dtype)
    c = r(*shape)
    return c, [c + r(*shape) for _ in range(n)]


def _sets(n):
    """Every keep-set of n models as (bitmask, members)."""
    return [(k, [i for i in range(n) if k >> i & 1]) for k in range(2 ** n)]


def _set_probabilities(n, p, overlap, emphasis):
    if overlap == 1.0:
        return [(1 - p) ** len(m) * p ** (n - len(m)) for _, m in _sets(n)]
    return dropout_set_probabilities(n, p, overlap, emphasis)


def test_dropout_declaration():
    spec = mm.get_spec("dropout")
    assert (spec.base, spec.min_models, spec.max_models, spec.source) == ("required", 1, None, "sd-mecha")
    assert spec.randomized and not spec.elementwise and not spec.result_is_model1
    for bad in ({"probability": 1.1}, {"overlap": 1.5}, {"overlap_emphasis": -0.1}, {"rescale": -1.0}):
        with pytest.raises(MergeError):
            mm.create("dropout", **bad)


def test_dropout_by_hand():
    c = t(1.0, 1.0, 1.0)
    a, b = c + t(2.0, 4.0, -6.0), c + t(4.0, 0.0, 2.0)
    # probability 0, overlap 1: every entry of both kept: their mean; alpha 0.5
    assert torch.equal(run("dropout", [a, b], c, probability=0.0, alpha=0.5), c + 0.5 * t(3.0, 2.0, -2.0))
    # probability 1: everything dropped, at any overlap
    for overlap in (0.0, 0.4, 1.0):
        assert torch.equal(run("dropout", [a, b], c, probability=1.0, overlap=overlap, alpha=2.0), c)
    # one model, probability 0 and any overlap: the one non-empty set is the model itself
    for overlap in (0.0, 0.3, 0.5, 0.999):
        assert torch.equal(run("dropout", [a], c, probability=0.0, overlap=overlap, alpha=1.0), a)
    # overlap 0, probability 0: each entry from exactly one model, divided by 1
    out = mm.create("dropout", probability=0.0, overlap=0.0, alpha=1.0).merge(c, [a, b], key="k", seed=3)
    assert bool(((out == a) | (out == b)).all())


def test_dropout_masks_come_from_the_seeded_generator():
    """The keep masks are the per-key generator's: reproducible, different for another key or seed, the same
    in fp64; the result is exactly Σ mᵢ·δᵢ / max(Σ mᵢ, 1) / (1 − p)^rescale·alpha + C with those masks."""
    c, models = _dropout_inputs(3)
    for p, overlap, emphasis, rescale in [(0.7, 1.0, 0.0, 1.0), (0.4, 0.3, 0.6, 0.5), (0.5, 0.0, 0.0, 2.0)]:
        method = mm.create("dropout", probability=p, overlap=overlap, overlap_emphasis=emphasis, rescale=rescale,
                           alpha=0.8)
        out = method.merge(c, models, key="x.weight", seed=7)
        assert torch.equal(out, method.merge(c, models, key="x.weight", seed=7))
        assert not torch.equal(out, method.merge(c, models, key="y.weight", seed=7))
        assert not torch.equal(out, method.merge(c, models, key="x.weight", seed=8))
        masks = dropout_keep_masks(mm.MergeContext(key="x.weight", seed=7), 3, c.shape, p, overlap, emphasis)
        deltas = [m - c for m in models]
        total = torch.where(masks[0], deltas[0], 0.0)
        for i in (1, 2):
            total = total + torch.where(masks[i], deltas[i], 0.0)
        want = (total / masks.sum(0).clamp(min=1) / (1 - p) ** rescale) * 0.8 + c
        assert torch.equal(out, want), (p, overlap)
        out64 = method.merge(c.double(), [m.double() for m in models], key="x.weight", seed=7)
        assert torch.equal(out64 != c.double(), out != c)


@needs_mecha
def test_dropout_set_probabilities_are_sdmecha_s(mecha_ties):
    """overlapping_sets_pmf (with its torch.lerp of numpy arrays made to work): the same numbers; at probability
    0 its binomial weights are 0/0 (NaN, at any emphasis), here their limit as the probability goes to 0."""
    for n in (1, 2, 3, 4):
        for p in (0.1, 0.5, 0.9, 1.0):
            for overlap in (0.0, 1e-9, 0.2, 0.5, 0.77, 1 - 1e-9):
                for emphasis in (0.0, 0.3, 1.0):
                    ours = np.array(dropout_set_probabilities(n, p, overlap, emphasis))
                    ref = mecha_ties.overlapping_sets_pmf(n, p, overlap, emphasis)
                    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15, err_msg=str((n, p, overlap)))
        for overlap in (0.2, 0.5, 0.77):
            with np.errstate(invalid="ignore"):
                assert np.isnan(mecha_ties.overlapping_sets_pmf(n, 0.0, overlap, 0.0)[1:]).all()
            np.testing.assert_allclose(dropout_set_probabilities(n, 0.0, overlap, 0.5),
                                       dropout_set_probabilities(n, 1e-12, overlap, 0.5), rtol=0, atol=1e-9)
    # within numpy's isclose of 1 (not 1 itself): all models together; 0: one model at a time
    assert dropout_set_probabilities(3, 0.0, 1 - 1e-9, 0.0) == [0.0] * 7 + [1.0]
    assert dropout_set_probabilities(3, 0.25, 0.0, 0.0) == [0.25, 0.25, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0]


@needs_mecha
def test_sdmecha_dropout_fails_for_overlaps_other_than_1():
    """Why the comparisons below patch sd-mecha's lerp: unpatched, any overlap but an odd integer raises."""
    deltas = [torch.ones(3), torch.ones(3)]
    with pytest.raises(TypeError):
        _ties().dropout.__wrapped__(*deltas, probability=0.5, overlap=0.5, overlap_emphasis=0.0, seed=0)


@needs_mecha
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_dropout_agrees_with_sdmecha_where_nothing_is_random(mecha_ties, dtype, n):
    """Bit for bit with sd-mecha's dropout (the wrapper's add_difference as C + alpha·that; sd-mecha's addcmul
    rounds the product into the sum: 1 ulp) at the settings whose masks are fixed: probability 0 with overlap 1
    or within isclose of 1 (all kept), probability 1 (all dropped), and one model at probability 0. sd-mecha's
    other overlaps at probability 0 give NaN probabilities (its binomial term is 0/0 even at emphasis 0): those
    are compared with its overlap 1, the same all-kept masks."""
    c, models = _dropout_inputs(n, dtype=dtype)
    deltas = [m - c for m in models]
    cases = [(0.0, 1.0), (1.0, 1.0), (0.0, 1 - 1e-9), (1.0, 0.3)] + ([(0.0, 0.0), (0.0, 0.4)] if n == 1 else [])
    for p, overlap in cases:
        for alpha, rescale in ((0.5, 1.0), (1.3, 2.0)):
            got = run("dropout", models, c, probability=p, overlap=overlap, alpha=alpha, rescale=rescale)
            ref = mecha_ties.dropout.__wrapped__(*[d.clone() for d in deltas], probability=p, rescale=rescale,
                                                 overlap=1.0 if p == 0.0 else overlap, overlap_emphasis=0.0, seed=0)
            assert torch.equal(got, ref * alpha + c), (p, overlap)
            # the fused product and sum: one rounding of the terms' size apart
            fused = c.addcmul(ref, torch.tensor(alpha, dtype=dtype))
            assert bool(((got - fused).abs() <= torch.finfo(dtype).eps * (c.abs() + (alpha * ref).abs())).all())


class _GivenDraws:
    """Stands in for sd-mecha's numpy generator: hands it our masks (binomial, per model) or our keep-sets
    (choice), after checking that it asks for the same distribution."""

    def __init__(self, masks, probabilities):
        self.masks, self.probabilities, self.calls = masks, probabilities, 0

    def binomial(self, n, p, size):
        assert n == 1 and np.isclose(p, self.probabilities)
        mask = self.masks[self.calls]
        self.calls += 1
        assert tuple(size) == tuple(mask.shape)
        return mask.numpy().astype(np.int64)

    def choice(self, ks, size, p):
        np.testing.assert_allclose(p, self.probabilities, rtol=1e-12, atol=1e-15)
        bits = torch.tensor([1 << i for i in range(self.masks.shape[0])]).view(-1, *[1] * (self.masks.dim() - 1))
        chosen = (self.masks.long() * bits).sum(0)
        assert tuple(size) == tuple(chosen.shape)
        return chosen.numpy()


@needs_mecha
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_with_our_masks_is_sdmecha_s(mecha_ties, monkeypatch, n, dtype):
    """sd-mecha's dropout handed our masks (its numpy draws replaced) gives our result bit for bit, at random
    settings: the arithmetic (sum in model order, the count clamped at 1, the rescale) is the same."""
    c, models = _dropout_inputs(n, dtype=dtype, seed=102)
    deltas = [m - c for m in models]
    for p, overlap, emphasis, rescale, alpha in [(0.9, 1.0, 0.0, 1.0, 0.5), (0.3, 1.0, 0.0, 0.5, 1.0),
                                                 (0.5, 0.0, 0.0, 1.0, 0.7), (0.4, 0.35, 0.8, 2.0, 1.0),
                                                 (0.2, 0.9, 0.3, 0.0, -1.0)]:
        masks = dropout_keep_masks(mm.MergeContext(key="k", seed=0), n, c.shape, p, overlap, emphasis)
        expected = (1 - p) if overlap == 1.0 else mecha_ties.overlapping_sets_pmf(n, p, overlap, emphasis)
        monkeypatch.setattr(np.random, "default_rng", lambda seed=None: _GivenDraws(masks, expected))
        ref = mecha_ties.dropout.__wrapped__(*[d.clone() for d in deltas], probability=p, rescale=rescale,
                                             overlap=overlap, overlap_emphasis=emphasis, seed=0)
        got = mm.create("dropout", probability=p, overlap=overlap, overlap_emphasis=emphasis, rescale=rescale,
                        alpha=alpha).merge(c, models, key="k", seed=0)
        assert torch.equal(got, ref * alpha + c), (p, overlap, emphasis)


@pytest.mark.parametrize("n, p, overlap, emphasis", [(3, 0.3, 1.0, 0.0), (3, 0.5, 0.0, 0.0), (3, 0.2, 0.3, 0.7),
                                                     (2, 0.6, 0.8, 0.0), (3, 0.0, 0.5, 0.0), (2, 0.1, 0.6, 1.0)])
def test_dropout_keep_sets_follow_their_distribution(n, p, overlap, emphasis):
    """Differences 1, 2, 4 from a zero base, no rescale: each entry's result names its keep-set (its members'
    mean); the share of each set over 120,000 entries is its probability within 5 standard errors."""
    size = 120_000
    c = torch.zeros(size)
    models = [torch.full((size,), float(1 << i)) for i in range(n)]
    out = mm.create("dropout", probability=p, overlap=overlap, overlap_emphasis=emphasis, rescale=0.0,
                    alpha=1.0).merge(c, models, key="k", seed=1)
    probabilities = _set_probabilities(n, p, overlap, emphasis)
    seen = 0
    for (k, members), prob in zip(_sets(n), probabilities):
        value = sum(1 << i for i in members) / max(len(members), 1)
        share = float((out == torch.tensor(value, dtype=torch.float32)).float().mean())
        seen += share
        assert abs(share - prob) <= 5 * math.sqrt(prob * (1 - prob) / size) + 1e-9, (k, share, prob)
    assert seen == pytest.approx(1.0)


@pytest.mark.parametrize("p, overlap, emphasis, rescale", [(0.5, 1.0, 0.0, 1.0), (0.8, 1.0, 0.0, 0.5),
                                                          (0.4, 0.3, 0.5, 1.0), (0.3, 0.0, 0.0, 2.0)])
def test_dropout_mean_over_draws(p, overlap, emphasis, rescale):
    """The mean of 300 draws (seeds) is the exact expectation Σ_S P(S)·Σ_{i∈S} δᵢ/max(|S|, 1)/(1 − p)^rescale,
    per entry within 5.5 standard errors (the variance likewise exact); with overlap 1 that is
    (1 − pⁿ)/n·Σ δᵢ/(1 − p)^rescale."""
    n, draws = 3, 300
    c, models = _dropout_inputs(n, shape=(20, 30), dtype=torch.float64, seed=103)
    deltas = torch.stack([m - c for m in models])
    method = mm.create("dropout", probability=p, overlap=overlap, overlap_emphasis=emphasis, rescale=rescale,
                       alpha=1.0)
    outs = torch.stack([method.merge(c, models, key="k", seed=s) - c for s in range(draws)])
    scale = (1 - p) ** rescale
    mean = torch.zeros_like(c)
    square = torch.zeros_like(c)
    for (_, members), prob in zip(_sets(n), _set_probabilities(n, p, overlap, emphasis)):
        value = deltas[members].sum(0) / max(len(members), 1) / scale
        mean += prob * value
        square += prob * value ** 2
    if overlap == 1.0:
        torch.testing.assert_close(mean, (1 - p ** n) / n * deltas.sum(0) / scale)
    z = (outs.mean(0) - mean) / ((square - mean ** 2) / draws).sqrt()
    assert float(z.abs().max()) < 5.5
    assert 0.75 < float(z.square().mean()) < 1.25


@pytest.mark.parametrize("a_val, b_val, c_val, alpha", [(1e-10, 1e31, 1e10, 2.0), (1e-43, 1e38, 1e-3, 1.0),
                                                         (1e30, 1e-30, 1e10, 2.0)])
def test_multiply_quotient_factor_out_of_range(a_val, b_val, c_val, alpha):
    """|B/C|^x alone overflows or is subnormal while A·|B/C|^x is a normal number: the result is that number
    (computed as e^(ln|A| + x·b)), as in fp64."""
    a, b, c = (torch.tensor([v, 2.0]) for v in (a_val, b_val, c_val))
    out = run("multiply_quotient", [a, b], base=c, alpha=alpha)
    want = run("multiply_quotient", [a.double(), b.double()], base=c.double(), alpha=alpha)
    assert out.isfinite().all() and want[0] != 0
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)


# ============================================================================== coverage
#: sd-mecha 1.1.8's merge methods that are here under another name
SD_MECHA_RENAMED = {
    "add_opposite_mask": "add_opposite", "add_strict_opposite_mask": "add_strict_opposite",
    "train_difference_mask": "train_difference", "perpendicular_component": "add_perpendicular",
    "ties_sum": "ties", "n_average": "linear",
}
#: and those that are not merge methods of weights here, with the reason (convert_*, extract_*: below)
SD_MECHA_NOT_METHODS = {
    # recipe plumbing: dtypes, devices, key formats, picking or stacking values, arithmetic on recipe nodes
    "cast": "dtype", "get_device": "plumbing", "get_dtype": "plumbing", "convert_singleton": "key format",
    "convert_sd1_blocks_to_ldm": "block format", "convert_sdxl_blocks_to_sgm": "block format",
    "fallback": "missing keys", "omit_non_finite": "plumbing", "omit_component": "plumbing",
    "pick_component": "plumbing", "stack": "plumbing", "scale": "arithmetic", "subtract": "arithmetic",
    "get_rank_from_ratio": "a helper of truncate_rank (its rank rule is truncate_rank's here)",
    # need a whole model at once, not one key: weight permutations and a per-attention reparametrization
    "rebasin": "whole model", "rebasin_sdxl_sgm": "whole model", "randperm": "whole model",
    "randperm_sdxl_sgm": "whole model", "balance_attention": "whole attention",
    "balance_attention_sdxl_sgm": "whole attention",
    # the EMA copy of an SD1 checkpoint's weights: ComfyUI's loaders drop model_ema.* keys
    "exchange_ema": "EMA keys", "exchange_ema_'sd1-ldm'": "EMA keys",
}


@needs_mecha
def test_every_sd_mecha_merge_method_is_here():
    """sd-mecha's registry, read from the installed sd-mecha: each of its merge methods of weights exists here,
    by its name or under the name listed; its LoRA extraction (extract_*) is the Extract LoRA node, its key
    format conversions (convert_*) are ComfyUI's loaders; the rest are listed with the reason."""
    from sd_mecha.extensions import merge_methods as registry
    theirs = {m.identifier for m in registry.get_all()}
    assert len(theirs) >= 70
    ours = set(mm.names())
    missing = set()
    for name in theirs:
        if name.startswith(("convert_", "extract_")) or name in SD_MECHA_NOT_METHODS:
            continue
        if SD_MECHA_RENAMED.get(name, name) not in ours:
            missing.add(name)
    assert not missing, sorted(missing)
    assert set(SD_MECHA_RENAMED) | set(SD_MECHA_NOT_METHODS) <= theirs      # the lists name real methods
