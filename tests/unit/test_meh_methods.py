"""supermerger's triple_sum / sum_twice and meh's weighted_subtraction, euclidean_add_difference,
multiply_difference, similarity_add_difference, distribution_crossover: hand-checked examples, invariants
and agreement with meh (sd-meh's merge_methods)."""
import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError

from references import needs_meh, sd_meh

NAMES = ("triple_sum", "sum_twice", "weighted_subtraction", "euclidean_add_difference", "multiply_difference",
         "similarity_add_difference", "distribution_crossover")
BASED = {"euclidean_add_difference", "multiply_difference", "similarity_add_difference", "distribution_crossover"}


def run(name, models, base=None, **params):
    return mm.create(name, **params).merge(base, models, key="k")


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_declarations():
    for name in NAMES:
        spec = mm.get_spec(name)
        assert spec.base == ("required" if name in BASED else "none"), name
        n = 3 if name in ("triple_sum", "sum_twice") else 2
        assert spec.min_models == spec.max_models == n, name
        assert not spec.randomized
    assert mm.get_spec("similarity_add_difference").result_is_model1
    with pytest.raises(MergeError, match="1 − alpha·beta"):
        mm.create("weighted_subtraction", alpha=1.0, beta=1.0)


# ============================================================================== by hand
def test_sums_by_hand():
    a, b, c = t(1.0, 0.0), t(0.0, 2.0), t(4.0, 4.0)
    torch.testing.assert_close(run("triple_sum", [a, b, c], alpha=0.25, beta=0.5), t(2.25, 2.5))
    # (1 − 0.5)·(0.5·a + 0.5·b) + 0.5·c
    torch.testing.assert_close(run("sum_twice", [a, b, c], alpha=0.5, beta=0.5), t(2.25, 2.5))
    torch.testing.assert_close(run("sum_twice", [a, b, c], alpha=1.0, beta=0.0), b)
    # A = 0.75·X + 0.25·B: taking 0.25 of B out recovers X
    x, bb = t(3.0, -1.0), t(1.0, 7.0)
    torch.testing.assert_close(run("weighted_subtraction", [0.75 * x + 0.25 * bb, bb], alpha=0.5, beta=0.5), x)


def test_add_difference_family_by_hand():
    c = t(1.0, 1.0, 1.0, 1.0)
    a = t(3.0, 1.0, 0.0, 5.0)            # differences  2, 0, −1, 4
    b = t(5.0, 4.0, 2.0, 1.0)            # differences  4, 3,  1, 0
    # |dA|^½·|dB|^½ with the sign of (A + B)/2 − C: √8, 0, −1 (signs: 3, 1.5, 0 → +0 → +1), 0
    got = run("multiply_difference", [a, b], c, alpha=0.5, beta=0.5)
    torch.testing.assert_close(got, c + t(8.0 ** 0.5, 0.0, 1.0, 0.0))
    # similarity: A·B/max² → 15/25, 4/16, 0, 5/25; s = 0.5·(x + 1)/2 = 0.4, 0.3125, 0.25, 0.3
    added = a + 1.0 * (b - c)
    summed = 0.5 * a + 0.5 * b
    s = t(0.4, 0.3125, 0.25, 0.3)
    got = run("similarity_add_difference", [a, b], c, alpha=1.0, beta=0.5)
    torch.testing.assert_close(got, (1 - s) * added + s * summed)
    # euclidean: unit differences u = (2, 0, −1, 4)/√21, v = (4, 3, 1, 0)/√26; α = ½:
    # d = √((u² + v²)/2) with the signs of (A + B)/2 − C = (3, 1.5, 0, 2), rescaled to that vector's norm
    u, v = (a - c) / 21 ** 0.5, (b - c) / 26 ** 0.5
    d = ((u ** 2 + v ** 2) / 2).sqrt() * t(1.0, 1.0, 1.0, 1.0)
    target = t(3.0, 1.5, 0.0, 2.0)
    torch.testing.assert_close(run("euclidean_add_difference", [a, b], c, alpha=0.5),
                               c + d / d.norm() * target.norm())


def test_distribution_crossover_by_hand():
    # C's order is (2, 0, 1): A and B in that order are (30, 10, 20) and (3, 1, 2); a hard cut at 0.5 of the
    # 2-bin spectrum keeps A's mean (bin 0) and B's bin 1
    a, b, c = t(10.0, 20.0, 30.0), t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    sa, sb = torch.fft.rfft(t(30.0, 10.0, 20.0)), torch.fft.rfft(t(3.0, 1.0, 2.0))
    mixed = torch.fft.irfft(torch.stack((sa[0], sb[1])), 3)
    want = torch.empty(3, dtype=torch.float64)
    want[torch.tensor([2, 0, 1])] = mixed
    torch.testing.assert_close(run("distribution_crossover", [a, b], c, alpha=0.5, beta=0.0), want)
    torch.testing.assert_close(run("distribution_crossover", [a, b], c, alpha=1.0, beta=0.0), a)
    torch.testing.assert_close(run("distribution_crossover", [a, b], c, alpha=0.0, beta=0.0), b)
    s0 = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(run("distribution_crossover", [s0, 2 * s0], s0, alpha=0.25), 0.25 * s0 + 0.75 * 2 * s0)


# ============================================================================== invariants
@pytest.mark.parametrize("name", NAMES)
def test_inputs_untouched_and_shapes(name):
    n = 3 if name in ("triple_sum", "sum_twice") else 2
    for shape in [(7,), (6, 5), (4, 3, 3, 3)]:
        models = [randn(*shape, seed=i) for i in range(n)]
        base = randn(*shape, seed=9) if name in BASED else None
        keep = [m.clone() for m in models] + ([base.clone()] if base is not None else [])
        out = run(name, models, base)
        assert out.shape == torch.Size(shape) and out.dtype == torch.float64 and torch.isfinite(out).all()
        assert all(torch.equal(x, y) for x, y in zip(keep, models + ([base] if base is not None else [])))


def test_degenerate_inputs_stay_finite():
    z = torch.zeros(4, 3, dtype=torch.float64)
    x = randn(4, 3, seed=1)
    assert torch.equal(run("euclidean_add_difference", [z, z], z), z)                 # meh: NaN
    assert torch.equal(run("euclidean_add_difference", [x, x], x), x)
    out = run("similarity_add_difference", [z, x], z, alpha=1.0, beta=1.0)            # 0/0 → s = beta
    assert torch.isfinite(out).all()


def test_euclidean_keeps_the_weighted_sums_norm_and_signs():
    a, b, c = randn(30, 20, seed=2), randn(30, 20, seed=3), randn(30, 20, seed=4)
    for alpha in (0.0, 0.3, 1.0):
        out = run("euclidean_add_difference", [a, b], c, alpha=alpha)
        target = torch.lerp(a, b, alpha) - c
        torch.testing.assert_close((out - c).norm(), target.norm())
        assert ((out - c).sign() == target.sign()).all()
    # alpha 0 with A's own difference: the weighted sum is A, the magnitudes A's: A itself
    torch.testing.assert_close(run("euclidean_add_difference", [a, b], c, alpha=0.0), a)


def test_elementwise_methods_slice_bit_identically():
    for name in NAMES:
        spec = mm.get_spec(name)
        if not spec.elementwise:
            continue
        n = spec.min_models
        models = [randn(5000, seed=20 + i, dtype=torch.float32) for i in range(n)]
        base = randn(5000, seed=30, dtype=torch.float32) if name in BASED else None
        whole = run(name, models, base)
        parts = [run(name, [m[i:i + 1000] for m in models], None if base is None else base[i:i + 1000])
                 for i in range(0, 5000, 1000)]
        assert torch.equal(whole, torch.cat(parts)), name


# ============================================================================== meh
@needs_meh
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(17,), (12, 9), (6, 4, 3, 3)])
def test_agrees_with_meh(dtype, shape):
    a, b, c = (randn(*shape, seed=s, dtype=dtype) for s in (41, 42, 43))
    a = c + 0.3 * (a - c)
    b = c + 0.5 * (b - c)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    cases = [("triple_sum", (a, b, c), [a, b, c], None, dict(alpha=0.3, beta=0.2)),
             ("sum_twice", (a, b, c), [a, b, c], None, dict(alpha=0.7, beta=0.4)),
             ("weighted_subtraction", (a, b), [a, b], None, dict(alpha=0.6, beta=0.5)),
             ("euclidean_add_difference", (a, b, c), [a, b], c, dict(alpha=0.35)),
             ("multiply_difference", (a, b, c), [a, b], c, dict(alpha=0.4, beta=0.7)),
             ("similarity_add_difference", (a, b, c), [a, b], c, dict(alpha=0.8, beta=0.6)),
             ("distribution_crossover", (a, b, c), [a, b], c, dict(alpha=0.3, beta=0.0)),
             ("distribution_crossover", (a, b, c), [a, b], c, dict(alpha=0.45, beta=0.2))]
    for name, ref_args, models, base, params in cases:
        ref = getattr(sd_meh, name)(*[x.clone() for x in ref_args], **params)
        got = run(name, models, base, **params)
        assert got.dtype == dtype, name
        # meh rounds the models to fp32 in these (.float()) whatever the input
        fp32_in_meh = name in ("distribution_crossover", "euclidean_add_difference", "multiply_difference")
        case_tol = dict(rtol=2e-5, atol=2e-5) if fp32_in_meh else tol
        torch.testing.assert_close(got, ref.to(dtype), **case_tol, msg=name)


# ============================================================================== edge cases (review)
def test_similarity_values_at_the_ends_and_at_any_scale():
    c = t(0.5, 0.5, 0.5)
    alpha, beta = 1.0, 0.8
    for scale in (1.0, 1e-23, 1e20):
        a = t(0.0, 0.0, 2.0, dtype=torch.float32) * scale
        b = t(0.0, 3.0, -2.0, dtype=torch.float32) * scale
        cc = c.float() * scale
        # s = beta where both are 0, beta/2 for a zero against a non-zero, 0 for opposite values
        s = torch.tensor([beta, beta / 2, 0.0])
        added, summed = a + alpha * (b - cc), (1 - alpha / 2) * a + (alpha / 2) * b
        got = run("similarity_add_difference", [a, b], cc, alpha=alpha, beta=beta)
        torch.testing.assert_close(got, (1 - s) * added + s * summed, rtol=1e-6, atol=0)


def test_euclidean_at_huge_and_tiny_scales():
    a, b, c = t(1.0, 2.0, 3.0), t(2.0, 1.0, 0.0), t(0.0, 0.0, 1.0)
    unit = run("euclidean_add_difference", [a.float(), b.float()], c.float(), alpha=0.5)
    for scale in (1e19, 1e-25):
        got = run("euclidean_add_difference", [a.float() * scale, b.float() * scale], c.float() * scale, alpha=0.5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got / scale, unit, rtol=1e-5, atol=0)


def test_weighted_subtraction_rejects_products_near_one():
    for alpha, beta in ((1.0, 1.0), (-1.0, -1.0), (1.0, 1.0 - 1e-7), (-1.0, -1.0 + 1e-7)):
        with pytest.raises(MergeError, match="1 − alpha·beta"):
            mm.create("weighted_subtraction", alpha=alpha, beta=beta)
    mm.create("weighted_subtraction", alpha=1.0, beta=0.999)


def test_distribution_crossover_ramp_ties_and_single_values():
    a, b = randn(64, seed=51), randn(64, seed=52)
    c = randn(64, seed=53)
    # with a ramp (beta > 0) alpha 1 still gives B the top beta/2 of the spectrum: not A
    assert not torch.allclose(run("distribution_crossover", [a, b], c, alpha=1.0, beta=0.1), a)
    # a base full of ties: the stable order is the flat order
    flat = torch.zeros(64, dtype=torch.float64)
    sa, sb = torch.fft.rfft(a), torch.fft.rfft(b)
    share = (torch.arange(sa.numel(), dtype=torch.float32) / sa.numel() >= 0.4).to(torch.float64)
    want = torch.fft.irfft(sa * (1 - share) + sb * share, 64)
    torch.testing.assert_close(run("distribution_crossover", [a, b], flat, alpha=0.4, beta=0.0), want)
    # one value, 0-dim or one element: the weighted blend
    for shape in ((), (1,), (1, 1)):
        x, y = torch.full(shape, 2.0, dtype=torch.float64), torch.full(shape, 6.0, dtype=torch.float64)
        torch.testing.assert_close(run("distribution_crossover", [x, y], x, alpha=0.25, beta=0.0),
                                   torch.full(shape, 5.0, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_the_method_functions_leave_their_inputs_alone(name):
    """Called directly (the engine hands a method a stacked copy of the models, so only a direct call can
    show an in-place change), in fp32 and fp64."""
    spec = mm.get_spec(name)
    for dtype in (torch.float32, torch.float64):
        models = torch.stack([randn(6, 5, seed=60 + i, dtype=dtype) for i in range(spec.min_models)])
        base = randn(6, 5, seed=70, dtype=dtype) if name in BASED else None
        keep_m, keep_b = models.clone(), None if base is None else base.clone()
        method = mm.create(name)
        spec.fn(base, models, mm.MergeContext(key="k"), **{p.name: method.get(p.name) for p in spec.global_params})
        assert torch.equal(models, keep_m), name
        assert base is None or torch.equal(base, keep_b), name
