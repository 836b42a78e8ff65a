"""fp64 inputs are merged in fp64 (the mergers' compute_dtype fp64); everything else in fp32."""
import pytest
import torch

import merge_methods as mm


def _inputs(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    return base, [base + 0.002 * torch.randn(shape, generator=g) for _ in range(n)]


def _count(spec):
    return spec.max_models if spec.max_models is not None and spec.max_models < 3 else max(3, spec.min_models)


def test_linear_in_fp64_is_the_fp64_formula():
    """Σ wᵢxᵢ / Σ wᵢ evaluated in fp64, bit for bit; the same inputs in fp32 give the fp32 rounding of it."""
    _, xs = _inputs((4096,), 3)
    xs64 = [x.double() for x in xs]
    w = [0.3, 0.5, 0.2]
    got = mm.create("linear").merge(None, xs64, weight=w)
    w64 = torch.tensor(w, dtype=torch.float64)
    want = torch.tensordot(w64, torch.stack(xs64), dims=1) / w64.sum()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    got32 = mm.create("linear").merge(None, xs, weight=w)
    assert got32.dtype == torch.float32
    # fp32 math loses what fp64 keeps: the fp32 result is further from the exact value
    assert (got32.double() - want).abs().max() > (got - want).abs().max()


def _check_fp64(spec, shape):
    base, xs = _inputs(shape, _count(spec))
    b = base if spec.base != "none" else None
    m = mm.create(spec.name, **({"ratio": 0.3} if spec.name == "weighted_sum" else {}))
    out32 = m.merge(b, xs, key="k", seed=3)
    out64 = m.merge(None if b is None else b.double(), [x.double() for x in xs], key="k", seed=3)
    assert out64.dtype == torch.float64 and out64.shape == out32.shape
    assert torch.isfinite(out64).all()
    close = torch.isclose(out64, out32.double(), rtol=1e-5, atol=1e-8)
    # arcee_fusion's importance threshold may flip a few entries that sit on it; truncate_rank's cut falls
    # between nearly equal singular values of this random data, where the kept subspace moves with rounding
    least = {"arcee_fusion": 0.9, "truncate_rank": 0.99}.get(spec.name, 1.0)
    assert close.float().mean() >= least, spec.name
    # computed in fp64, not widened from fp32: bits beyond fp32's (but for methods that pick input entries;
    # tensor_sum's C + (B − C) is B exactly in fp64, clamp picks them too, top_k_tensor_sum moves A's values;
    # rotate lerps 1-D weights by alpha, 0 by default; truncate_rank and truncate_kronecker keep a 1-D weight's
    # whole difference: model 1)
    picks = spec.name in ("passthrough", "arcee_fusion", "tensor_sum", "clamp", "top_k_tensor_sum")
    if not picks and not (spec.name in ("rotate", "truncate_rank", "truncate_kronecker") and len(shape) == 1):
        assert not torch.equal(out64, out64.float().double()), spec.name


@pytest.mark.parametrize("shape", [(64, 48), (3000,), (40, 8, 3, 3)])
@pytest.mark.parametrize("spec", mm.all_specs(), ids=lambda s: s.name)
def test_every_method_runs_in_fp64(spec, shape):
    """Every method runs on fp64 inputs: fp64 out, near the fp32 result (within what fp32 rounding and
    thresholds flipping at the margin allow)."""
    _check_fp64(spec, shape)


@pytest.mark.parametrize("name", ["linear", "ties", "task_arithmetic", "weighted_sum"])
def test_large_cpu_tensors_in_fp64(name):
    """Above one slice on the CPU, fp64 takes the whole-tensor path (the sliced and streamed paths are
    fp32-only) and still merges in fp64."""
    _check_fp64(mm.get_spec(name), ((1 << 20) + 5,))


def test_mixed_precision_inputs_compute_in_fp64_when_one_is_fp64():
    base, xs = _inputs((4096,), 2)
    m = mm.create("task_arithmetic")
    mixed = m.merge(base, [xs[0].double(), xs[1]])
    assert mixed.dtype == torch.float32          # the base's dtype, computed in fp64
    b64 = base.double()
    want = (b64 + ((xs[0].double() - b64) + (xs[1].double() - b64))).float()
    assert torch.equal(mixed, want)
    assert not torch.equal(m.merge(base, xs), want)     # fp32 math rounds differently somewhere


@pytest.mark.parametrize("name, params", [
    ("ties", {}), ("breadcrumbs", {"gamma": 0.05}), ("breadcrumbs_ties", {"gamma": 0.05}),
])
@pytest.mark.parametrize("shape", [(300, 300), (40, 50)])
def test_magnitude_pruning_in_fp64_keeps_exactly_the_top_entries(name, params, shape):
    """Pruned methods at density 0.2 on fp64 inputs keep the same entries as on the fp32 inputs they were
    made from: exactly int(density·n) per model (the span-wise cut read fp64 as fp32 bit patterns and kept
    everything or nothing above 65,536 entries)."""
    base, xs = _inputs(shape, 2)
    m = mm.create(name)
    kw = dict(key="k", seed=0, weight=[1.0, 0.5], density=[0.2, 0.2], **{k: [v, v] for k, v in params.items()})
    out32 = m.merge(base, xs, **kw)
    out64 = m.merge(base.double(), [x.double() for x in xs], **kw)
    assert out64.dtype == torch.float64
    changed32, changed64 = out32 != base, out64 != base.double()
    assert torch.equal(changed32, changed64)
    n = base.numel()
    assert 0.2 * n <= int(changed64.sum()) <= 0.4 * n          # two models' top 20 %, overlapping
    torch.testing.assert_close(out64, out32.double(), rtol=1e-5, atol=1e-9)


def test_ties_sum_with_dropout_della_eps_in_fp64():
    """della_eps ranks magnitudes by their bits: fp64 inputs (no room for the index beside 64 bits) take a
    stable sort with the same order; the result is the fp32 one computed in fp64."""
    base, xs = _inputs((50, 60), 3)
    m = mm.create("ties_sum_with_dropout", della_eps=0.1)
    out32 = m.merge(base, xs, key="k", seed=4)
    out64 = m.merge(base.double(), [x.double() for x in xs], key="k", seed=4)
    assert out64.dtype == torch.float64
    assert torch.equal(out64 != base.double(), out32 != base)          # the same entries kept
    torch.testing.assert_close(out64, out32.double(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 4), (2, 0, 3, 3)])
def test_every_method_merges_empty_tensors(shape):
    for name in mm.names():
        spec = mm.create(name).spec
        n = _count(spec)
        base = torch.zeros(shape, dtype=torch.float16)
        xs = [torch.zeros(shape, dtype=torch.float16) for _ in range(n)]
        m = mm.create(name, **({"ratio": 0.3} if name == "weighted_sum" else {}))
        out = m.merge(base if spec.base != "none" else None, xs, key="k", seed=0)
        assert out.shape == torch.Size(shape) and out.dtype == torch.float16, name


def test_multislerp_eps_must_be_positive():
    """eps 0 divided a zero task vector's 0 by 0 (all NaN, as mergekit): it is refused."""
    with pytest.raises(mm.MergeError, match="eps"):
        mm.create("multislerp", eps=0.0)
    mm.create("multislerp", eps=1e-8)


def test_slerp_family_coefficients_stay_in_fp64():
    """slerp / nuslerp / multislerp in fp64 evaluate their interpolation coefficients in fp64 (they were
    rounded to fp32: 1e-8 relative error on fp64 inputs)."""
    import math
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(5000, generator=g, dtype=torch.float64), torch.randn(5000, generator=g, dtype=torch.float64)
    t = 0.3
    theta = math.acos(float(a @ b) / (float(a.norm()) * float(b.norm())))
    want = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    got = mm.create("slerp", t=t).merge(a, [b])
    assert float((got - want).abs().max() / want.abs().max()) < 1e-13
    got = mm.create("nuslerp", nuslerp_flatten=True).merge(None, [a, b], weight=[1 - t, t])
    assert float((got - want).abs().max() / want.abs().max()) < 1e-13
    # multislerp of two unit vectors: the normalized weighted mean of the unit vectors, times the mean norm
    ua, ub = a / a.norm(), b / b.norm()
    m = 0.5 * ua + 0.5 * ub
    want = m / m.norm() * 1.0
    got = mm.create("multislerp").merge(None, [ua, ub], weight=[0.5, 0.5])
    assert float((got - want).abs().max()) < 1e-13
