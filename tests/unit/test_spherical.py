"""slerp, nuslerp, multislerp, karcher: formulas, defining properties, edge cases, mergekit agreement.

The reference implementations below are written independently in fp64 straight from the formulas in
the research notes (one vector at a time, with the plain tangent-space iteration for karcher).
"""
import math

import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError


def run(name, base, models, create_kw=None, **params):
    """create + merge; keyword parameters go where the spec declares them (global or per model)."""
    glob = {p.name for p in mm.get_spec(name).global_params}
    create_kw = dict(create_kw or {})
    per_model = {k: v for k, v in params.items() if k not in glob}
    create_kw.update({k: v for k, v in params.items() if k in glob})
    return mm.create(name, **create_kw).merge(base, models, **per_model)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(shape, generator=g, dtype=torch.float32)


# ---------------------------------------------------------------- independent fp64 references
def ref_slerp(t, v0, v1):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    nb = nb if nb > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    dot = float(torch.clamp((a / na) @ (b / nb), -1, 1))
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        th = math.acos(dot)
        out = (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)
    return out.reshape(v0.shape)


def ref_slerp_rows(t, v0, v1):
    """nuslerp along the last dim, one row at a time."""
    a, b = v0.double().reshape(-1, v0.shape[-1]), v1.double().reshape(-1, v1.shape[-1])
    rows = []
    for x, y in zip(a, b):
        ux, uy = x / max(float(x.norm()), 1e-7), y / max(float(y.norm()), 1e-7)
        c = max(-1.0, min(1.0, float(ux @ uy)))
        if 1 - c * c <= 1e-16:
            rows.append((1 - t) * x + t * y)
        else:
            th = math.acos(c)
            rows.append((math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th))
    return torch.stack(rows).reshape(v0.shape)


def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    """mergekit's algorithm step by step, tangent projection included."""
    x = torch.stack([m.double().reshape(-1) for m in xs])
    if base is not None:
        x = x - base.double().reshape(-1)
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = x.norm(dim=1, keepdim=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    if mean.norm() < eps:
        out = (x * w[:, None]).sum(0)
    else:
        mean = mean / mean.norm()
        tang = u - (u @ mean)[:, None] * mean
        t = (tang * w[:, None]).sum(0)
        tn = t.norm() + eps
        out = (mean * math.cos(tn) + t * math.sin(tn) / tn) * float((norms[:, 0] * w).sum())
    if base is not None:
        out = out + base.double().reshape(-1)
    return out.reshape(xs[0].shape)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    n = len(xs)
    vs = [x.double().reshape(-1) for x in xs]
    norms = [float(v.norm()) for v in vs]
    units = [v / nv if nv > 0 else torch.zeros_like(v) for v, nv in zip(vs, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    a = 1.0 / len(valid)
    mean = sum(a * units[i] for i in valid)
    mean = units[valid[0]].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = max(-1.0, min(1.0, float(mean @ units[i])))
            th = math.acos(dot)
            if th < tol:
                continue
            tangent += a * (th / math.sin(th)) * (units[i] - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(norms) / n * mean).reshape(xs[0].shape)


# ============================================================================== slerp
def test_slerp_orthogonal_raw_vectors_by_hand():
    # theta = pi/2: s0 = sin((1-t)pi/2), s1 = sin(t pi/2); raw vectors, norms not interpolated
    base, model = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("slerp", base, [model], t=0.5)
    h = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([2 * h, h]))
    out = run("slerp", base, [model], t=1 / 3)
    torch.testing.assert_close(out, torch.tensor([2 * math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_endpoints_exact():
    r = gen(0)
    base, model = r(6, 5), r(6, 5)
    assert torch.equal(run("slerp", base, [model], t=0.0), base)
    assert torch.equal(run("slerp", base, [model], t=1.0), model)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.8, 1.5, -0.5])
def test_slerp_equal_norms_stays_on_sphere_and_splits_angle(t):
    r = gen(1)
    a, b = r(40), r(40)
    a, b = a / a.norm() * 3, b / b.norm() * 3
    out = run("slerp", a, [b], t=t)
    assert abs(float(out.norm()) - 3.0) < 1e-5
    theta = math.acos(float(a @ b) / 9)
    ang0 = math.acos(max(-1.0, min(1.0, float(out @ a) / (float(out.norm()) * 3))))
    if 0 <= t <= 1:
        assert abs(ang0 - t * theta) < 1e-4
    else:       # extrapolated along the arc: |t|·θ from a (on the far side of a for t < 0)
        assert abs(ang0 - abs(t) * theta) < 1e-4
        torch.testing.assert_close(out, (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta))


def test_slerp_nearly_parallel_and_antipodal_are_lerped():
    r = gen(2)
    a = r(30)
    b = 2 * a + 1e-4 * r(30)          # |cos| > 0.9995
    torch.testing.assert_close(run("slerp", a, [b], t=0.3), 0.7 * a + 0.3 * b)
    torch.testing.assert_close(run("slerp", a, [-a], t=0.3), 0.4 * a)


def test_slerp_zero_base_is_not_normalized():
    # |base| <= 1e-8 is left as is: dot = 0, theta = pi/2, result = sin(t pi/2)·model
    model = gen(3)(4, 4)
    out = run("slerp", torch.zeros(4, 4), [model], t=0.4)
    torch.testing.assert_close(out, math.sin(0.4 * math.pi / 2) * model)


@pytest.mark.parametrize("shape", [(), (7,), (8, 6), (4, 3, 3, 3)])
def test_slerp_matches_reference_on_shapes(shape):
    r = gen(4)
    base = r(*shape)
    model = base + 0.7 * r(*shape)
    for t in (0.25, 0.6):
        out = run("slerp", base, [model], t=t)
        torch.testing.assert_close(out.double(), ref_slerp(t, base, model), rtol=1e-5, atol=1e-6)


def test_slerp_is_accurate_on_large_small_angle_tensors():
    # fp64 accumulation of the dot: fp32 summation of ~1e6 products would be off by ~1e-5 here
    r = gen(5)
    base = r(320, 320, 3)
    model = base + 0.1 * r(320, 320, 3)
    assert rel(run("slerp", base, [model], t=0.3), ref_slerp(0.3, base, model)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slerp_low_precision_dtype(dtype):
    r = gen(6)
    base, model = r(16, 8).to(dtype), r(16, 8).to(dtype)
    out = run("slerp", base, [model], t=0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_slerp(0.5, base, model).to(dtype))


def test_slerp_errors():
    r = gen(7)
    b, m = r(3, 3), r(3, 3)
    with pytest.raises(MergeError, match="base"):
        run("slerp", None, [m])
    with pytest.raises(MergeError, match="model"):
        run("slerp", b, [m, m])
    with pytest.raises(MergeError, match="'t'"):
        run("slerp", b, [m], t=2.5)
    with pytest.raises(MergeError, match="shape"):
        run("slerp", b, [r(3, 4)])
    with pytest.raises(MergeError, match="NaN"):
        run("slerp", b, [torch.full((3, 3), float("nan"))])


# ============================================================================== nuslerp
def test_nuslerp_t_from_weights():
    # t = w1/(w0+w1) = 0.75, whole tensor as one vector
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("nuslerp", None, [a, b], weight=[1.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([math.cos(0.75 * math.pi / 2), math.sin(0.75 * math.pi / 2)]))


def test_nuslerp_swap_symmetry_and_zero_sum_weights():
    r = gen(10)
    a, b = r(5, 7), r(5, 7)
    x = run("nuslerp", None, [a, b], weight=[0.3, 0.9])
    y = run("nuslerp", None, [b, a], weight=[0.9, 0.3])
    torch.testing.assert_close(x, y)
    # weights summing to ~0: t = 0.5
    torch.testing.assert_close(run("nuslerp", None, [a, b], weight=[2.0, -2.0]),
                               run("nuslerp", None, [a, b], weight=[1.0, 1.0]))


def test_nuslerp_with_base_slerps_task_vectors():
    r = gen(11)
    base, a, b = r(6, 4), r(6, 4), r(6, 4)
    out = run("nuslerp", base, [a, b], weight=[1.0, 2.0])
    expected = base.double() + ref_slerp_rows(2 / 3, (a - base).reshape(-1), (b - base).reshape(-1)).reshape(6, 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    # identical models: zero task vectors -> the base
    torch.testing.assert_close(run("nuslerp", base, [base.clone(), base.clone()]), base)


def test_nuslerp_rows_and_columns():
    r = gen(12)
    a = r(5, 8)
    b = a + 0.8 * r(5, 8)
    rows = run("nuslerp", None, [a, b], {"nuslerp_flatten": False}, weight=[1.0, 1.5])
    torch.testing.assert_close(rows.double(), ref_slerp_rows(0.6, a, b), rtol=1e-5, atol=1e-6)
    # each row is its own slerp
    row2 = run("nuslerp", None, [a[2], b[2]], weight=[1.0, 1.5])
    torch.testing.assert_close(rows[2], row2)
    # row_wise (mergekit's name) slerps the vectors along dim 0, i.e. the columns
    cols = run("nuslerp", None, [a, b], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weight=[1.0, 1.5])
    torch.testing.assert_close(cols.double(), ref_slerp_rows(0.6, a.t(), b.t()).t(), rtol=1e-5, atol=1e-6)


def test_nuslerp_colinear_rows_lerp():
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 6.0], [0.0, 1.0]])       # row 0 colinear, row 1 orthogonal
    out = run("nuslerp", None, [a, b], {"nuslerp_flatten": False}, weight=[1.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0], [h, h]]))


@pytest.mark.parametrize("shape", [(), (9,), (4, 3, 3, 3)])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_shapes(shape, flatten):
    r = gen(13)
    base = r(*shape)
    a, b = base + r(*shape), base + r(*shape) + 0.5 * base
    out = run("nuslerp", None, [a, b], {"nuslerp_flatten": flatten}, weight=[1.0, 2.0])
    assert out.shape == base.shape
    if flatten or len(shape) == 0:
        expected = ref_slerp_rows(2 / 3, a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
    else:
        expected = ref_slerp_rows(2 / 3, a, b)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_dtype_and_count_errors():
    r = gen(14)
    a, b = r(4, 4).half(), r(4, 4).half()
    assert run("nuslerp", None, [a, b]).dtype == torch.float16
    assert run("nuslerp", a.bfloat16(), [a, b]).dtype == torch.bfloat16   # the base's dtype
    with pytest.raises(MergeError, match="model"):
        run("nuslerp", None, [a])
    with pytest.raises(MergeError, match="model"):
        run("nuslerp", None, [a, b, a])
    with pytest.raises(MergeError, match="weight"):
        run("nuslerp", None, [a, b], weight=[1.0, 20.0])


# ============================================================================== multislerp
def test_multislerp_by_hand():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    h = math.sqrt(0.5)
    # direction: normalized mean of the unit vectors; norm: weighted mean of the norms
    torch.testing.assert_close(run("multislerp", None, [a, b]), torch.tensor([3 * h, 3 * h]))
    # unnormalized weights scale the norm: 2·2 + 2·4 = 12
    out = run("multislerp", None, [a, b], {"normalize_weights": False}, weight=[2.0, 2.0])
    torch.testing.assert_close(out, torch.tensor([12 * h, 12 * h]))
    # weights 1:3 -> direction (1/4, 3/4) normalized, norm (2 + 12)/4
    d = torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75)
    torch.testing.assert_close(run("multislerp", None, [a, b], weight=[1.0, 3.0]), d * 3.5)


def test_multislerp_two_equal_norm_models_equal_weights_is_the_slerp_midpoint():
    r = gen(20)
    a, b = r(50), r(50)
    a, b = a / a.norm() * 2, b / b.norm() * 2
    torch.testing.assert_close(run("multislerp", None, [a, b]), run("nuslerp", None, [a, b]))
    base = r(50)
    torch.testing.assert_close(run("multislerp", base, [base + a, base + b]),
                               run("nuslerp", base, [base + a, base + b]))


@pytest.mark.parametrize("shape", [(), (11,), (6, 5), (4, 3, 3, 3)])
def test_multislerp_matches_reference(shape):
    r = gen(21)
    base = r(*shape)
    models = [base + r(*shape) for _ in range(3)]
    w = [1.0, 2.0, 0.5]
    out = run("multislerp", None, models, weight=w)
    torch.testing.assert_close(out.double(), ref_multislerp(models, w), rtol=1e-5, atol=1e-6)
    out = run("multislerp", base, models, weight=w)
    torch.testing.assert_close(out.double(), ref_multislerp(models, w, base), rtol=1e-5, atol=1e-6)
    out = run("multislerp", base, models, {"normalize_weights": False}, weight=w)
    torch.testing.assert_close(out.double(), ref_multislerp(models, w, base, normalize=False),
                               rtol=1e-5, atol=1e-6)


def test_multislerp_permutation_invariant():
    r = gen(22)
    ms, w = [r(7, 3) for _ in range(4)], [0.5, 1.0, 1.5, 2.0]
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(run("multislerp", None, ms, weight=w),
                               run("multislerp", None, [ms[i] for i in perm], weight=[w[i] for i in perm]))


def test_multislerp_single_model_and_fallbacks():
    r = gen(23)
    base, m = r(5, 5), r(5, 5)
    assert torch.equal(run("multislerp", base, [m], weight=[3.0]), m)
    # all-zero deltas with 3 models: the unit mean vanishes -> linear fallback = base
    # (mergekit raises here for more than 2 models)
    torch.testing.assert_close(run("multislerp", base, [base.clone()] * 3), base)
    # antipodal pair with equal weights: linear fallback 0.5·a − 0.5·a = 0
    torch.testing.assert_close(run("multislerp", None, [m, -m]), torch.zeros(5, 5))


def test_multislerp_zero_sum_weights():
    r = gen(24)
    a, b = r(4), r(4)
    with pytest.raises(MergeError, match="sum to 0"):
        run("multislerp", None, [a, b], weight=[1.0, -1.0])
    with pytest.raises(MergeError, match="sum to 0"):
        mm.create("multislerp", weight=0.0)
    out = run("multislerp", None, [a, b], {"normalize_weights": False}, weight=[1.0, -1.0])
    torch.testing.assert_close(out.double(), ref_multislerp([a, b], [1.0, -1.0], normalize=False),
                               rtol=1e-5, atol=1e-6)


def test_multislerp_dtype():
    r = gen(25)
    ms = [r(8, 8).bfloat16() for _ in range(3)]
    assert run("multislerp", None, ms).dtype == torch.bfloat16
    assert run("multislerp", r(8, 8).half(), ms).dtype == torch.float16


# ============================================================================== karcher
def test_karcher_identical_inputs_return_the_input():
    x = gen(30)(6, 6)
    torch.testing.assert_close(run("karcher", None, [x, x.clone(), x.clone()]), x)


def test_karcher_two_vectors_geodesic_midpoint():
    h = math.sqrt(0.5)
    out = run("karcher", None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([h, h]))
    # norms 2 and 4: midpoint direction times the mean norm 3
    out = run("karcher", None, [torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0])])
    torch.testing.assert_close(out, torch.tensor([3 * h, 0.0, 3 * h]))
    # 120 degrees apart in a plane: the midpoint is at 60 degrees
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)])
    torch.testing.assert_close(run("karcher", None, [a, b]), torch.tensor([0.5, math.sqrt(3) / 2]))


def test_karcher_symmetric_three_vectors():
    e = torch.eye(3)
    torch.testing.assert_close(run("karcher", None, list(e)), torch.ones(3) / math.sqrt(3))


def test_karcher_result_is_a_fixed_point():
    # at the Karcher mean, the weighted sum of the log maps of the inputs vanishes
    r = gen(31)
    base = r(40)
    ms = [base + 0.8 * r(40) for _ in range(4)]
    out = run("karcher", None, ms, {"max_iter": 200, "tol": 1e-12}).double()
    mean = out / out.norm()
    tangent = torch.zeros_like(mean)
    for m in ms:
        u = m.double() / m.double().norm()
        c = float(mean @ u)
        th = math.acos(max(-1.0, min(1.0, c)))
        tangent += th / math.sin(th) * (u - c * mean)
    assert float(tangent.norm()) < 1e-5
    assert abs(float(out.norm()) - sum(float(m.norm()) for m in ms) / 4) < 1e-4


@pytest.mark.parametrize("shape", [(), (13,), (6, 5), (4, 3, 3, 3)])
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_karcher_matches_reference(shape, spread):
    r = gen(32)
    base = r(*shape)
    ms = [base + spread * r(*shape) for _ in range(3)]
    out = run("karcher", None, ms)
    torch.testing.assert_close(out.double(), ref_karcher(ms), rtol=1e-5, atol=1e-6)


def test_karcher_max_iter_zero_and_tol():
    r = gen(33)
    ms = [r(10) for _ in range(3)]
    out = run("karcher", None, ms, {"max_iter": 0})
    units = [m / m.norm() for m in ms]
    mean = sum(units) / 3
    expected = mean / mean.norm() * (sum(float(m.norm()) for m in ms) / 3)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(run("karcher", None, ms, {"max_iter": 3, "tol": 0.0}).double(),
                               ref_karcher(ms, 3, 0.0), rtol=1e-5, atol=1e-6)


def test_karcher_zero_inputs():
    r = gen(34)
    a, b = r(8), r(8)
    z = torch.zeros(8)
    # a zero tensor is left out of the direction but counts in the mean norm
    out = run("karcher", None, [z, a, b])
    two = run("karcher", None, [a, b])
    torch.testing.assert_close(out, two * (2 / 3))
    torch.testing.assert_close(run("karcher", None, [z, z.clone()]), z)
    # one model: itself
    assert torch.equal(run("karcher", None, [a]), a)


def test_karcher_permutation_invariant_and_dtype():
    r = gen(35)
    ms = [r(9, 2) for _ in range(4)]
    torch.testing.assert_close(run("karcher", None, ms), run("karcher", None, ms[::-1]))
    out = run("karcher", None, [m.half() for m in ms])
    assert out.dtype == torch.float16
    with pytest.raises(MergeError, match="base"):
        run("karcher", ms[0], ms[1:])
    with pytest.raises(MergeError, match="max_iter"):
        mm.create("karcher", max_iter=1.5)


# ============================================================================== common edge cases
CASES = {
    "slerp": (True, 1), "nuslerp": (False, 2), "multislerp": (True, 3), "karcher": (False, 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(), (5,), (4, 3, 3, 3)])
def test_common_shapes_finite(name, shape):
    r = gen(40)
    has_base, n = CASES[name]
    base = r(*shape) if has_base else None
    ms = [r(*shape) for _ in range(n)]
    out = run(name, base, ms)
    assert out.shape == torch.Size(shape) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", sorted(CASES))
def test_common_errors(name):
    r = gen(41)
    has_base, n = CASES[name]
    base = r(3, 3) if has_base else None
    ms = [r(3, 3) for _ in range(n)]
    with pytest.raises(MergeError, match="NaN"):
        run(name, base, ms[:-1] + [torch.full((3, 3), float("nan"))])
    with pytest.raises(MergeError, match="shape"):
        run(name, base, ms[:-1] + [r(3, 2)])
    with pytest.raises(MergeError, match="model"):
        run(name, base, [])
    if name in ("slerp", "nuslerp"):
        with pytest.raises(MergeError, match="model"):
            run(name, base, ms + [r(3, 3)])


# ============================================================================== mergekit agreement
def _mk():
    pytest.importorskip("mergekit")
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs the mergekit 0.1.5 merge-method API")
    return base_mod.TensorGroup


def _d(xs):
    return [x.double() for x in xs]


# mergekit evaluated on fp64 inputs runs its formulas in fp64: the clean reference.  (Its fp32
# evaluation is itself off by up to ~1e-5 on large tensors; ours accumulates reductions in fp64.)
@pytest.mark.parametrize("shape", [(), (33,), (16, 12), (8, 4, 3, 3), (256, 96)])
def test_agrees_with_mergekit_slerp(shape):
    TG = _mk()
    from mergekit.merge_methods.slerp import slerp_merge_method
    r = gen(50)
    base = r(*shape)
    for model in (base + 0.5 * r(*shape), 2 * base + 1e-3 * r(*shape)):
        for t in (0.2, 0.7):
            ref = slerp_merge_method([TG.from_tensors(_d([base, model]), base_index=0)], parameters={"t": t})[0]
            assert rel(run("slerp", base, [model], t=t), ref) <= 1e-5
            ref32 = slerp_merge_method([TG.from_tensors([base, model], base_index=0)], parameters={"t": t})[0]
            assert rel(run("slerp", base, [model], t=t), ref32) <= 1e-4


@pytest.mark.parametrize("shape", [(33,), (16, 12), (8, 4, 3, 3)])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_agrees_with_mergekit_nuslerp(shape, flatten, row_wise, with_base):
    TG = _mk()
    from mergekit.merge_methods.nuslerp import nuslerp_merge_method
    r = gen(51)
    base = r(*shape)
    common = r(*shape)          # shared direction keeps rows away from the ill-conditioned antipodal case
    a, b = base + common + 0.5 * r(*shape), base + common + 0.5 * r(*shape)
    params = {"weight": [1.0, 2.5], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    tensors = [a, b] + ([base] if with_base else [])
    group = TG.from_tensors(_d(tensors), base_index=2 if with_base else None)
    ref = nuslerp_merge_method([group], parameters=params)[0]
    out = run("nuslerp", base if with_base else None, [a, b],
              {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, weight=[1.0, 2.5])
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(), (33,), (16, 12), (8, 4, 3, 3), (256, 96)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_agrees_with_mergekit_multislerp(shape, with_base, normalize):
    TG = _mk()
    from mergekit.merge_methods.multislerp import multislerp
    r = gen(52)
    base = r(*shape)
    ms = [base + 0.3 * r(*shape) for _ in range(3)]
    w = [1.0, 2.0, 0.5]
    tensors = ms + ([base] if with_base else [])
    group = TG.from_tensors(_d(tensors), base_index=3 if with_base else None)
    ref = multislerp([group], parameters={"weight": w, "normalize_weights": normalize})[0]
    out = run("multislerp", base if with_base else None, ms, {"normalize_weights": normalize}, weight=w)
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(), (33,), (16, 12), (8, 4, 3, 3), (256, 96)])
@pytest.mark.parametrize("n_models,spread", [(2, 1.0), (3, 0.01), (4, 1.0)])
def test_agrees_with_mergekit_karcher(shape, n_models, spread):
    TG = _mk()
    from mergekit.merge_methods.karcher import karcher_merge_method
    r = gen(53)
    base = r(*shape)
    ms = [base + spread * r(*shape) for _ in range(n_models)]
    for params in ({}, {"max_iter": 3, "tol": 1e-3}):
        ref = karcher_merge_method([TG.from_tensors(_d(ms))], parameters=params)[0]
        out = run("karcher", None, ms, params)
        assert rel(out, ref) <= 1e-5
