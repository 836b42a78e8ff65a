"""nearswap, arcee_fusion, passthrough, weighted_sum, add_difference, train_difference, add_perpendicular."""
import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError

from references import needs_mecha, sd_mecha


def run(name, base, models, create_kw=None, **params):
    """create + merge; keyword parameters go where the spec declares them (global or per model)."""
    glob = {p.name for p in mm.get_spec(name).global_params}
    create_kw = dict(create_kw or {})
    per_model = {k: v for k, v in params.items() if k not in glob}
    create_kw.update({k: v for k, v in params.items() if k in glob})
    return mm.create(name, **create_kw).merge(base, models, **per_model)


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(shape, generator=g, dtype=torch.float32)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ============================================================================== nearswap
def test_nearswap_by_hand():
    base = torch.zeros(5)
    model = torch.tensor([0.05, 0.2, -1.0, 0.0, 0.1])
    # w = clamp(t/|d|, 0, 1): d=0.05 -> 1, 0.2 -> 0.5, -1 -> 0.1, 0 -> 1 (clamped 1e-6), 0.1 -> 1
    out = run("nearswap", base, [model], t=0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 0.0, 0.1]))


def test_nearswap_moves_each_element_by_min_of_distance_and_t():
    r = gen(1)
    base = r(50)
    model = base + r(50)
    t = 0.3
    out = run("nearswap", base, [model], t=t)
    d = model - base
    torch.testing.assert_close(out - base, torch.sign(d) * torch.clamp(d.abs(), max=t), atol=1e-6, rtol=1e-5)


def test_nearswap_extremes():
    r = gen(2)
    base, model = r(4, 3, 3, 3), r(4, 3, 3, 3)
    assert torch.equal(run("nearswap", base, [model], t=0.0), base)
    torch.testing.assert_close(run("nearswap", base, [model], t=100.0), model)
    with pytest.raises(MergeError, match="'t'"):
        run("nearswap", base, [model], t=-0.1)
    with pytest.raises(MergeError, match="model"):
        run("nearswap", base, [model, model])
    with pytest.raises(MergeError, match="base"):
        run("nearswap", None, [model])


# ============================================================================== arcee_fusion
def ref_fusion(base, model):
    """Straight from the notes, with the quantiles taken from a full sort (no sampling).

    fp32 like the method (fp64 importances would move elements that sit exactly at the threshold)."""
    a, b = base.float(), model.float()
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    p = torch.softmax(b, -1) + 1e-8
    q = torch.softmax(a, -1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    imp = (b - a).abs() * kl
    s = imp.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    mask = imp >= med + 1.5 * (q3 - q1)
    return torch.where(mask, b, a).reshape(base.shape), mask.reshape(base.shape)


def test_arcee_fusion_hand_example():
    # one row: KL is one positive number, so importance ranks by |model - base| alone.
    # |d| = [0, 0, 0, 0, 0, 0, 0, 0, 1, 5]: q1 = med = q3 = 0 -> threshold 0 -> all taken
    base = torch.zeros(10)
    model = torch.tensor([0.0] * 8 + [1.0, 5.0])
    torch.testing.assert_close(run("arcee_fusion", base, [model]), model)
    # |d| ∝ [1..9, 100] (KL scales all alike): sorted positions floor(q*9) = 2, 4, 6 hold 3, 5, 7, so the
    # threshold is 5 + 1.5*(7 - 3) = 11 and only the outlier 100 takes the model's value
    d = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 100])
    out = run("arcee_fusion", base, [d * 0.01])
    expected = torch.zeros(10)
    expected[9] = 1.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape", [(), (1,), (17,), (12, 9), (6, 4, 3, 3)])
def test_arcee_fusion_matches_reference(shape):
    r = gen(3)
    base = r(*shape)
    model = base + 0.2 * r(*shape) * (r(*shape) > 1.0)
    out = run("arcee_fusion", base, [model])
    expected, mask = ref_fusion(base, model)
    torch.testing.assert_close(out, expected)
    # every element is either the base's or the model's value
    assert bool(((out == base) | (out == model)).all())


def test_arcee_fusion_exact_quantiles_above_one_million():
    # mergekit would estimate the quantiles from a random 1e6 sample here; ours are exact and
    # therefore deterministic
    r = gen(4)
    base = r(1100, 1000)
    model = base + 0.05 * r(1100, 1000)
    out = run("arcee_fusion", base, [model])
    expected, mask = ref_fusion(base, model)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, run("arcee_fusion", base, [model]))
    assert 0 < int(mask.sum()) < mask.numel()


def test_arcee_fusion_zero_delta_and_dtype():
    r = gen(5)
    base = r(8, 8)
    torch.testing.assert_close(run("arcee_fusion", base, [base.clone()]), base)
    out = run("arcee_fusion", base.half(), [r(8, 8).half()])
    assert out.dtype == torch.float16


def test_arcee_fusion_agrees_with_mergekit():
    pytest.importorskip("mergekit")
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs the mergekit 0.1.5 merge-method API")
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method
    r = gen(6)
    for shape in [(33,), (40, 30), (8, 4, 3, 3), (300, 320)]:     # all <= 1e6: mergekit is exact there
        base = r(*shape)
        model = base + 0.1 * r(*shape)
        group = base_mod.TensorGroup.from_tensors([base, model], base_index=0)
        ref = arcee_fusion_merge_method([group])[0]
        assert rel(run("arcee_fusion", base, [model]), ref) <= 1e-5


# ============================================================================== passthrough
def test_passthrough():
    r = gen(7)
    m = r(3, 4)
    assert torch.equal(run("passthrough", None, [m]), m)
    torch.testing.assert_close(run("passthrough", None, [m], scale=0.5), 0.5 * m)
    assert run("passthrough", None, [m.bfloat16()], scale=2.0).dtype == torch.bfloat16
    with pytest.raises(MergeError, match="model"):
        run("passthrough", None, [m, m])
    with pytest.raises(MergeError, match="base"):
        run("passthrough", m, [m])
    with pytest.raises(MergeError, match="scale"):
        run("passthrough", None, [m], scale=100.0)


# ============================================================================== weighted_sum
def test_weighted_sum_comfyui_semantics():
    spec = mm.get_spec("weighted_sum")
    assert spec.param("ratio").default == 1.0          # ComfyUI ModelMergeSimple's default
    r = gen(8)
    m1, m2 = r(5, 5), r(5, 5)
    assert torch.equal(run("weighted_sum", None, [m1, m2]), m1)            # ratio 1 -> model 1
    assert torch.equal(run("weighted_sum", None, [m1, m2], {"ratio": 0.0}), m2)
    torch.testing.assert_close(run("weighted_sum", None, [m1, m2], {"ratio": 0.3}), 0.3 * m1 + 0.7 * m2)
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(run("weighted_sum", None, [a, b], {"ratio": 0.25}), torch.tensor([2.5, 4.0]))


def test_weighted_sum_errors_and_dtype():
    r = gen(9)
    m1, m2 = r(2, 2), r(2, 2)
    assert run("weighted_sum", None, [m1.half(), m2.half()], {"ratio": 0.5}).dtype == torch.float16
    with pytest.raises(MergeError, match="ratio"):
        mm.create("weighted_sum", ratio=2.5)
    # inside [-1, 2] a ratio beyond [0, 1] extrapolates: 1.5·m1 − 0.5·m2
    torch.testing.assert_close(run("weighted_sum", None, [m1, m2], {"ratio": 1.5}), 1.5 * m1 - 0.5 * m2)
    torch.testing.assert_close(run("weighted_sum", None, [m1, m2], {"ratio": -0.5}), -0.5 * m1 + 1.5 * m2)
    with pytest.raises(MergeError, match="model"):
        run("weighted_sum", None, [m1])
    with pytest.raises(MergeError, match="base"):
        run("weighted_sum", m1, [m1, m2])


# ============================================================================== add_difference
def test_add_difference_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([2.0, 0.0, 3.5])
    c = torch.tensor([0.5, 1.0, 3.0])
    # A + alpha (B - C), models = [A, B], base = C
    torch.testing.assert_close(run("add_difference", c, [a, b]), torch.tensor([2.5, 1.0, 3.5]))
    torch.testing.assert_close(run("add_difference", c, [a, b], {"alpha": 0.5}), torch.tensor([1.75, 1.5, 3.25]))
    assert torch.equal(run("add_difference", c, [a, b], {"alpha": 0.0}), a)
    # clamp to [min(A, B), max(A, B)]: 2.5 -> 2.0, 1.0 stays (in [0, 2]), 3.5 stays (in [3, 3.5])
    out = run("add_difference", c, [a, b], {"clamp_to_ab": True})
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 3.5]))


def test_add_difference_properties():
    r = gen(10)
    a, b, c = r(4, 3, 3, 3), r(4, 3, 3, 3), r(4, 3, 3, 3)
    # C == B: nothing is added
    torch.testing.assert_close(run("add_difference", b, [a, b]), a)
    out = run("add_difference", c, [a, b], {"alpha": 2.0, "clamp_to_ab": True})
    assert bool(((out >= torch.minimum(a, b)) & (out <= torch.maximum(a, b))).all())
    assert run("add_difference", c.half(), [a, b]).dtype == torch.float16     # the base's dtype
    with pytest.raises(MergeError, match="base"):
        run("add_difference", None, [a, b])
    with pytest.raises(MergeError, match="model"):
        run("add_difference", c, [a])
    with pytest.raises(MergeError, match="alpha"):
        mm.create("add_difference", alpha=20.0)


# ============================================================================== train_difference
def test_train_difference_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([2.0, 0.0, 3.5, 4.0, 1.0])
    c = torch.tensor([0.5, 1.0, 3.0, 2.0, 1.0])
    # A + 1.8·alpha·(B − C)·|B − A|/(|B − A| + |B − C|):
    # 1 + 1.8·1.5·1/2.5 = 2.08; 2 − 1.8·(2/3) = 0.8; 3 + 1.8·0.5·0.5 = 3.45; B = A: 4; B = C: 5
    torch.testing.assert_close(run("train_difference", c, [a, b]), torch.tensor([2.08, 0.8, 3.45, 4.0, 5.0]))
    torch.testing.assert_close(run("train_difference", c, [a, b], {"alpha": 0.5}),
                               torch.tensor([1.54, 1.4, 3.225, 4.0, 5.0]))
    assert torch.equal(run("train_difference", c, [a, b], {"alpha": 0.0}), a)
    # A = B = C: 0/0 adds nothing (no NaN)
    same = torch.ones(4)
    assert torch.equal(run("train_difference", same, [same, same]), same)


def test_train_difference_adds_at_most_1_8_alpha_of_the_trained_difference():
    r = gen(20)
    a, b, c = r(6, 7), r(6, 7), r(6, 7)
    out = run("train_difference", c, [a, b], {"alpha": 0.7})
    share = (out - a) / (1.8 * 0.7 * (b - c))
    assert bool((share >= -1e-6).all() and (share <= 1 + 1e-5).all())
    torch.testing.assert_close(share, (b - a).abs() / ((b - a).abs() + (b - c).abs()), atol=1e-4, rtol=1e-4)


@needs_mecha
def test_train_difference_agrees_with_sdmecha():
    r = gen(21)
    a, b, c = r(30, 40), r(30, 40), r(30, 40)
    b[0] = a[0]                  # B = A: nothing added
    a[1], b[1] = c[1], c[1]      # A = B = C: 0/0
    for alpha in (1.0, 0.35, -0.5):
        mask = sd_mecha.train_difference_mask.__wrapped__(a, b, c, alpha=torch.tensor(alpha))
        ref = a.addcmul(b - c, mask)
        torch.testing.assert_close(run("train_difference", c, [a, b], {"alpha": alpha}), ref, atol=1e-6, rtol=1e-6)


# ============================================================================== add_opposite, add_strict_opposite
def test_add_opposite_by_hand():
    c = torch.tensor([0.0, 0.0, 0.0, 1.0])
    a = torch.tensor([1.0, 1.0, 2.0, 1.0])
    b = torch.tensor([-1.0, 1.0, 0.0, 3.0])
    # share = |A − B|/(|A − B| + |A + B − 2C|): 1 (opposite), 0 (A = B), 0.5 (B = C: adds 0), 0.5 (A = C)
    assert torch.equal(run("add_opposite", c, [a, b], {"alpha": 0.5}), torch.tensor([0.0, 1.0, 2.0, 2.0]))
    assert torch.equal(run("add_opposite", c, [a, b], {"alpha": 1.0}), torch.tensor([-1.0, 1.0, 2.0, 3.0]))
    same = torch.ones(3)
    assert torch.equal(run("add_opposite", same, [same, same]), same)     # 0/0 adds nothing


def test_add_strict_opposite_by_hand():
    c = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    a = torch.tensor([1.0, 1.0, 2.0, 1.0, 2.0])
    b = torch.tensor([-1.0, 1.0, 0.0, 3.0, -1.0])
    # share = max(0, (C − A)(B − C)/max(|A − C|, |B − C|)²): 1, 0 (same sign), 0 (B = C), 0 (A = C), 0.5
    assert torch.equal(run("add_strict_opposite", c, [a, b], {"alpha": 0.5}),
                       torch.tensor([0.0, 1.0, 2.0, 1.0, 1.5]))
    same = torch.ones(3)
    assert torch.equal(run("add_strict_opposite", same, [same, same]), same)


@pytest.mark.parametrize("name", ["add_opposite", "add_strict_opposite"])
def test_opposite_variants_add_only_where_the_differences_disagree(name):
    r = gen(23)
    a, b, c = r(40, 30), r(40, 30), r(40, 30)
    a_d, b_d = a - c, b - c
    out = run(name, c, [a, b], {"alpha": 0.8})
    share = (out - a) / (2 * 0.8 * b_d)          # the factor of B − C added
    top = 1.0 + 1e-5
    assert bool((share >= -1e-6).all() and (share <= top).all())
    opposite = a_d * b_d < 0
    if name == "add_strict_opposite":
        assert torch.equal(out[~opposite], a[~opposite])
    # where the differences nearly cancel, (nearly) all 2·alpha of B − C is added
    b2 = c - a_d * 0.999
    share2 = (run(name, c, [a, b2], {"alpha": 0.8}) - a) / (2 * 0.8 * (b2 - c))
    assert bool((share2 > 0.99).all())
    # B's difference of the same sign and size as A's (B = A) adds nothing
    assert torch.equal(run(name, c, [a, a.clone()]), a)


def test_add_strict_opposite_of_huge_differences_does_not_overflow():
    c = torch.zeros(2)
    a = torch.tensor([2e30, 1e-30])
    b = torch.tensor([-1e30, -1e-30])
    # (C − A)(B − C) = 2e60 would overflow fp32; the ratio is 0.5 and 1
    out = run("add_strict_opposite", c, [a, b], {"alpha": 1.0})
    torch.testing.assert_close(out, torch.tensor([2e30 - 1e30, 1e-30 - 2e-30]))


@needs_mecha
@pytest.mark.parametrize("name", ["add_opposite", "add_strict_opposite"])
def test_opposite_variants_agree_with_sdmecha(name):
    r = gen(24)
    a, b, c = r(30, 40), r(30, 40), r(30, 40)
    b[0] = a[0]                  # B = A
    a[1], b[1] = c[1], c[1]      # A = B = C: 0/0
    a[2] = c[2]                  # A = C
    b[3] = c[3]                  # B = C
    b[4] = 2 * c[4] - a[4]       # exact opposites
    mask_fn = getattr(sd_mecha, name + "_mask").__wrapped__
    for alpha in (1.0, 0.35, -0.5):
        ref = a.addcmul(b - c, mask_fn(a, b, c, alpha=torch.tensor(alpha)))
        torch.testing.assert_close(run(name, c, [a, b], {"alpha": alpha}), ref, atol=1e-6, rtol=1e-6)


# ============================================================================== add_perpendicular
def test_add_perpendicular_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([2.0, 0.0, 3.5])
    c = torch.tensor([0.5, 1.0, 3.0])
    # A − C = (.5, 1, 0), B − C = (1.5, −1, .5); ⟨·,·⟩ = −.25, ‖A − C‖² = 1.25: P = (B − C) + 0.2·(A − C)
    torch.testing.assert_close(run("add_perpendicular", c, [a, b]), torch.tensor([2.6, 1.2, 3.5]))
    torch.testing.assert_close(run("add_perpendicular", c, [a, b], {"alpha": 0.5}), torch.tensor([1.8, 1.6, 3.25]))


def test_add_perpendicular_properties():
    r = gen(22)
    a, b, c = r(5, 4, 3, 3), r(5, 4, 3, 3), r(5, 4, 3, 3)
    out = run("add_perpendicular", c, [a, b], {"alpha": 1.3})
    # the added part is perpendicular to A's difference
    cos = torch.dot((out - a).double().flatten(), (a - c).double().flatten()) / ((out - a).double().norm() * (a - c).double().norm())
    assert abs(float(cos)) < 1e-6
    # B's difference parallel to A's: nothing is added; B = C: A; A = C: all of B − C
    torch.testing.assert_close(run("add_perpendicular", c, [a, c + 2.5 * (a - c)]), a, atol=1e-5, rtol=1e-5)
    assert torch.equal(run("add_perpendicular", c, [a, c.clone()]), a)
    torch.testing.assert_close(run("add_perpendicular", c, [c.clone(), b], {"alpha": 0.5}), c + 0.5 * (b - c))


@needs_mecha
def test_add_perpendicular_agrees_with_sdmecha():
    r = gen(23)
    a, b, c = r(64, 80), r(64, 80), r(64, 80)
    for alpha in (1.0, 0.4):
        perp = sd_mecha.perpendicular_component.__wrapped__((a - c).double(), (b - c).double())
        ref = a.double() + alpha * perp
        torch.testing.assert_close(run("add_perpendicular", c, [a, b], {"alpha": alpha}).double(), ref,
                                   atol=1e-5, rtol=1e-5)


# ============================================================================== common edge cases
CASES = {
    "nearswap": (True, 1), "arcee_fusion": (True, 1), "passthrough": (False, 1),
    "weighted_sum": (False, 2), "add_difference": (True, 2), "train_difference": (True, 2),
    "add_perpendicular": (True, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(), (5,), (4, 3, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_common_shapes_and_dtypes(name, shape, dtype):
    r = gen(11)
    has_base, n = CASES[name]
    base = r(*shape).to(dtype) if has_base else None
    ms = [r(*shape).to(dtype) for _ in range(n)]
    out = run(name, base, ms)
    assert out.shape == torch.Size(shape) and out.dtype == dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", sorted(CASES))
def test_common_errors(name):
    r = gen(12)
    has_base, n = CASES[name]
    base = r(3, 3) if has_base else None
    ms = [r(3, 3) for _ in range(n)]
    with pytest.raises(MergeError, match="NaN"):
        run(name, base, ms[:-1] + [torch.full((3, 3), float("nan"))])
    if has_base or n > 1:
        with pytest.raises(MergeError, match="shape"):
            run(name, base, ms[:-1] + [r(3, 2)])
    with pytest.raises(MergeError, match="model"):
        run(name, base, ms + [r(3, 3)])
    if has_base:
        with pytest.raises(MergeError, match="NaN"):
            run(name, torch.full((3, 3), float("inf")), ms)


def test_add_opposite_of_huge_opposite_weights():
    """A = 2e38, B = −2e38 around C = 0: |A − B| overflows fp32, the share is still 1 (from halves)."""
    c = torch.zeros(2)
    a = torch.tensor([2e38, 1.0])
    b = torch.tensor([-2e38, -1.0])
    assert torch.equal(run("add_opposite", c, [a, b], {"alpha": 0.5}), torch.tensor([0.0, 0.0]))
