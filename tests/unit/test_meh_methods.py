"""supermerger's triple_sum / sum_twice and meh's weighted_subtraction, euclidean_add_difference,
multiply_difference, similarity_add_difference, distribution_crossover, ties_add_difference, top_k_tensor_sum:
hand-checked examples, invariants and agreement with meh (sd-meh's merge_methods) and, for top_k_tensor_sum,
sd-mecha."""
import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError

from references import needs_mecha, needs_meh, sd_meh

NAMES = ("triple_sum", "sum_twice", "weighted_subtraction", "euclidean_add_difference", "multiply_difference",
         "similarity_add_difference", "distribution_crossover", "ties_add_difference", "top_k_tensor_sum")
BASED = {"euclidean_add_difference", "multiply_difference", "similarity_add_difference", "distribution_crossover",
         "ties_add_difference"}


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


# ============================================================================== ties_add_difference
def test_ties_add_difference_by_hand():
    c = t(1.0, 1.0, 1.0, 1.0, 1.0)
    a = c + t(4.0, -1.0, 2.0, 0.5, -3.0)
    b = c + t(2.0, 1.0, -2.0, 0.0, -1.0)
    # beta 1 keeps everything. Signs (+ − + + −) and (+ + − 0 −) elect + 0 0 + −: both agree in entries 0 and 4
    # (means 3 and −2), opposite signs in 1 and 2 (C), in 3 only A's 0.5 has the elected sign
    torch.testing.assert_close(run("ties_add_difference", [a, b], c, alpha=1.0, beta=1.0),
                               c + t(3.0, 0.0, 0.0, 0.5, -2.0))
    # beta 0.4 of 5 entries: k = int(0.6·5) = 3, each difference keeps |δ| ≥ its 3rd smallest magnitude:
    # A's (4, 0, 2, 0, −3) (cut at 2), B's (2, 1, −2, 0, −1) (cut at 1). Entry 1: only B's kept → B's 1 whole;
    # entry 3: both 0, the vote 0 and the count 2 → 0
    torch.testing.assert_close(run("ties_add_difference", [a, b], c, alpha=0.5, beta=0.4),
                               c + 0.5 * t(3.0, 1.0, 0.0, 0.0, -2.0))
    # beta 0: each keeps only its largest magnitude, A's 4, B's 2 and −2 (a tie: both stay)
    torch.testing.assert_close(run("ties_add_difference", [a, b], c, alpha=1.0, beta=0.0), c + t(3, 0, -2, 0, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_add_difference_keeps_n_minus_k_plus_one_entries(dtype):
    """meh's count: the entries at or above the k-th smallest magnitude, k = max(int((1 − beta)·n), 1); the
    cut is exact in fp64 too (meh rounds it to fp32)."""
    c = randn(40, 30, seed=81, dtype=dtype)
    a = c + randn(40, 30, seed=82, dtype=dtype)
    n = a.numel()
    for beta in (0.0, 0.05, 0.2, 0.5, 0.999, 1.0):
        k = max(int((1 - beta) * n), 1)
        # B = C: B's difference is 0 everywhere, so A's kept entries are added whole and the rest is C
        out = run("ties_add_difference", [a, c.clone()], c, alpha=1.0, beta=beta)
        assert int((out != c).sum()) == n - k + 1, beta
        kept = (a - c).abs() >= (a - c).abs().flatten().kthvalue(k).values
        torch.testing.assert_close(out, torch.where(kept, a, c), rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_ties_add_difference_invariants():
    c = randn(30, 20, seed=83)
    a, b = c + randn(30, 20, seed=84), c + randn(30, 20, seed=85)
    keep = (a.clone(), b.clone(), c.clone())
    assert torch.equal(run("ties_add_difference", [a, b], c, alpha=0.0, beta=0.3), c)
    # the same model twice: every kept entry agrees with itself; alpha 1, beta 1 gives it back
    torch.testing.assert_close(run("ties_add_difference", [a, a.clone()], c, alpha=1.0, beta=1.0), a)
    # symmetric in A and B, linear in alpha
    out = run("ties_add_difference", [a, b], c, alpha=1.0, beta=0.3)
    assert torch.equal(out, run("ties_add_difference", [b, a], c, alpha=1.0, beta=0.3))
    torch.testing.assert_close(run("ties_add_difference", [a, b], c, alpha=0.4, beta=0.3) - c, 0.4 * (out - c))
    # every change is one of the differences or their mean
    d = out - c
    da, db = a - c, b - c
    assert bool((torch.isclose(d, da) | torch.isclose(d, db) | torch.isclose(d, (da + db) / 2) | (d == 0)).all())
    assert all(torch.equal(x, y) for x, y in zip(keep, (a, b, c)))


@needs_meh
@pytest.mark.parametrize("shape", [(), (1,), (17,), (12, 9), (6, 4, 3, 3), (300, 400)])
def test_ties_add_difference_agrees_with_meh_bit_for_bit(shape):
    """fp32, and fp64 differences that fp32 holds exactly (meh's fp32 cut is then exact); (300, 400) takes
    kth_largest's sampled path; the rounded copies have many equal magnitudes."""
    for dtype in (torch.float32, torch.float64):
        c = randn(*shape, seed=86, dtype=torch.float32)
        a, b = c + randn(*shape, seed=87, dtype=torch.float32), c + randn(*shape, seed=88, dtype=torch.float32)
        for rounded in (False, True):
            x, y, z = ((v * 8).round() / 8 if rounded else v for v in (a, b, c))
            x, y, z = x.to(dtype), y.to(dtype), z.to(dtype)
            if dtype == torch.float64:     # differences fp32 holds exactly
                x, y = z + (x - z).float().double(), z + (y - z).float().double()
            for alpha in (0.5, 1.0, 1.7):
                for beta in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
                    ref = sd_meh.ties_add_difference(x.clone(), y.clone(), z.clone(), alpha=alpha, beta=beta)
                    got = run("ties_add_difference", [x, y], z, alpha=alpha, beta=beta)
                    assert got.dtype == dtype
                    assert torch.equal(got, ref), (dtype, rounded, alpha, beta)


@needs_meh
def test_ties_add_difference_cut_is_not_rounded_to_fp32():
    """Deliberate difference: meh rounds the k-th magnitude to fp32 (kthvalue of .float()), so in fp64 the entry
    at the cut, 1 − 2⁻³⁰, is compared with 1.0 and dropped; here it is kept."""
    c = torch.zeros(4, dtype=torch.float64)
    a = t(0.5, 1 - 2.0 ** -30, 2.0, 3.0)
    b = c.clone()
    # beta 0.5: k = int(0.5·4) = 2, the cut is the 2nd smallest magnitude
    got = run("ties_add_difference", [a, b], c, alpha=1.0, beta=0.5)
    assert torch.equal(got, t(0.0, 1 - 2.0 ** -30, 2.0, 3.0))
    ref = sd_meh.ties_add_difference(a, b, c, alpha=1.0, beta=0.5)
    assert torch.equal(ref, t(0.0, 0.0, 2.0, 3.0))


# ============================================================================== top_k_tensor_sum
def test_top_k_tensor_sum_by_hand():
    a = t(3.0, -1.0, 2.0, -5.0)             # sorted: −5, −1, 2, 3; magnitudes 1 < 2 < 3 < 5
    b = t(0.1, 0.4, 0.2, 0.3)               # ranks 0, 3, 1, 2: offered −5, 3, −1, 2
    assert torch.equal(run("top_k_tensor_sum", [a, b], width=1.0, offset=0.0), t(-5.0, 3.0, -1.0, 2.0))
    assert torch.equal(run("top_k_tensor_sum", [a, b], width=0.0, offset=0.4), a)
    # s = 1, e = 3: magnitudes above the 1st smallest (1) up to the 3rd (3): 2 and 3 are taken
    assert torch.equal(run("top_k_tensor_sum", [a, b], width=0.5, offset=0.25), t(3.0, 3.0, 2.0, 2.0))
    # the same band from the other side: width −0.5 ending at offset 0.75
    assert torch.equal(run("top_k_tensor_sum", [a, b], width=-0.5, offset=0.75), t(3.0, 3.0, 2.0, 2.0))
    # offset 0.75 + width 0.5 wraps: s = 1, e = 3, inverted: the magnitudes ≤ 1 or > 3 (1 and 5) are taken
    assert torch.equal(run("top_k_tensor_sum", [a, b], width=0.5, offset=0.75), t(-5.0, -1.0, -1.0, -5.0))
    # ties in B go in flat order: B all equal ranks the entries 0, 1, 2, 3: A sorted
    assert torch.equal(run("top_k_tensor_sum", [a, torch.zeros(4, dtype=torch.float64)]), t(-5.0, -1.0, 2.0, 3.0))
    # 0-dim: one value, A's
    x = torch.tensor(2.5, dtype=torch.float64)
    assert torch.equal(run("top_k_tensor_sum", [x, torch.tensor(-1.0, dtype=torch.float64)]), x)


@pytest.mark.parametrize("shape", [(17,), (12, 9), (6, 4, 3, 3)])
def test_top_k_tensor_sum_invariants(shape):
    a, b = randn(*shape, seed=91), randn(*shape, seed=92)
    keep = (a.clone(), b.clone())
    n = a.numel()
    full = run("top_k_tensor_sum", [a, b])
    # width 1: A's values, in B's order
    assert torch.equal(full.flatten().sort().values, a.flatten().sort().values)
    assert torch.equal(full.flatten().argsort(), b.flatten().argsort())
    # B = A: every value is offered its own place
    assert torch.equal(run("top_k_tensor_sum", [a, a.clone()], width=0.6, offset=0.3), a)
    # a band of e − s magnitudes (no ties in random data): the entries offered a value whose magnitude ranks
    # s + 1 … e among A's take it (the others, if the band wraps), the rest keep A's
    from merge_methods.ops import ratio_to_region
    magnitude_rank = torch.searchsorted(a.abs().flatten().sort().values, full.abs().flatten(), right=True)
    for width, offset in [(0.3, 0.2), (0.5, 0.8), (-0.25, 0.1), (0.7, 0.0)]:
        s, e, inverted = ratio_to_region(width, offset, n)
        band = (magnitude_rank > s) & (magnitude_rank <= e)
        if inverted:
            band = ~band
        assert int(band.sum()) == (n - (e - s) if inverted else e - s)
        out = run("top_k_tensor_sum", [a, b], width=width, offset=offset)
        assert torch.equal(out, torch.where(band.view(a.shape), full, a)), (width, offset)
    assert torch.equal(a, keep[0]) and torch.equal(b, keep[1])


_TOP_K_SETTINGS = [(w, o) for w in (-1.0, -0.55, -0.2, 0.0, 0.13, 0.5, 0.51, 0.75, 1.0)
                   for o in (0.0, 0.05, 0.3, 0.5, 0.9, 1.0)]


@needs_meh
@pytest.mark.parametrize("shape", [(), (1,), (17,), (16,), (12, 9), (6, 4, 3, 3), (300, 400)])
def test_top_k_tensor_sum_agrees_with_meh_bit_for_bit(shape):
    """meh's alpha and beta are width and offset. fp32, and fp64 values that fp32 holds exactly (meh's fp32
    magnitudes are then exact); rounded copies have many ties; (300, 400) takes kth_largest's sampled path."""
    for dtype in (torch.float32, torch.float64):
        a = randn(*shape, seed=93, dtype=torch.float32).to(dtype)
        b = randn(*shape, seed=94, dtype=torch.float32).to(dtype)
        for rounded in (False, True):
            x, y = ((v * 4).round() / 4 for v in (a, b)) if rounded else (a, b)
            settings = _TOP_K_SETTINGS if a.numel() < 1000 else _TOP_K_SETTINGS[::5]
            for width, offset in settings:
                ref = sd_meh.top_k_tensor_sum(x.clone(), y.clone(), alpha=width, beta=offset)
                got = run("top_k_tensor_sum", [x, y], width=width, offset=offset)
                assert got.dtype == dtype
                assert torch.equal(got, ref), (dtype, rounded, width, offset)


@needs_meh
def test_top_k_tensor_sum_band_ends_are_not_rounded_to_fp32():
    """Deliberate difference: meh rounds the band's ends to fp32, so in fp64 the e-th magnitude 1 + 2⁻³⁰ is
    compared with 1.0 and falls out of its own band; here it is in."""
    a = t(0.5, 1 + 2.0 ** -30, 2.0, 3.0)
    b = t(3.0, 2.0, 1.0, 0.0)               # offered 3, 2, 1 + 2⁻³⁰, 0.5
    # width 0.5 from 0: the two smallest magnitudes, 0.5 and 1 + 2⁻³⁰
    got = run("top_k_tensor_sum", [a, b], width=0.5, offset=0.0)
    assert torch.equal(got, t(0.5, 1 + 2.0 ** -30, 1 + 2.0 ** -30, 0.5))
    ref = sd_meh.top_k_tensor_sum(a, b, alpha=0.5, beta=0.0)
    assert torch.equal(ref, t(0.5, 1 + 2.0 ** -30, 2.0, 0.5))


@needs_mecha
@pytest.mark.parametrize("shape", [(17,), (12, 9), (6, 4, 3, 3)])
def test_top_k_tensor_sum_against_sdmecha(shape):
    """sd-mecha's band also takes the s-th smallest magnitude (<= where meh has <): the same result when the band
    starts at the smallest magnitude (s = 0); otherwise the two differ exactly at the entries offered a value of
    that magnitude (one entry without ties)."""
    import importlib
    from merge_methods.ops import ratio_to_region
    slicing = importlib.import_module("sd_mecha.extensions.builtin.merge_methods.slicing")
    a, b = randn(*shape, seed=95, dtype=torch.float32), randn(*shape, seed=96, dtype=torch.float32)
    n = a.numel()
    offered = torch.sort(a.flatten()).values[b.flatten().argsort(stable=True).argsort()]
    for width, offset in _TOP_K_SETTINGS:
        s, _, _ = ratio_to_region(width, offset, n)
        ref = slicing.top_k_tensor_sum.__wrapped__(a.clone(), b.clone(), width=width, offset=offset)
        got = run("top_k_tensor_sum", [a, b], width=width, offset=offset)
        if s == 0:
            assert torch.equal(got, ref), (width, offset)
        else:
            at_s = offered.abs() == a.abs().flatten().kthvalue(s).values
            differ = (got != ref).flatten()
            assert int(at_s.sum()) == 1 and torch.equal(differ, at_s & (offered != a.flatten())), (width, offset)


@needs_meh
def test_meh_ratio_to_region_is_ours():
    from merge_methods.ops import ratio_to_region
    for n in (1, 2, 5, 7, 10, 320):
        for w in [x / 20 for x in range(-20, 21)]:
            for o in [x / 20 for x in range(0, 21)]:
                assert ratio_to_region(w, o, n) == sd_meh.ratio_to_region(w, o, n), (n, w, o)


def test_ties_add_difference_mean_of_huge_differences_is_finite():
    """Two agreeing differences of 2e38 and 3e38: their sum overflows, their mean (2.5e38) does not."""
    c = torch.zeros(2)
    a = torch.tensor([2e38, 1.0])
    b = torch.tensor([3e38, 2.0])
    out = run("ties_add_difference", [a, b], base=c, alpha=1.0, beta=1.0)
    assert torch.equal(out, torch.tensor([2e38 * 0.5 + 3e38 * 0.5, 1.5]))
