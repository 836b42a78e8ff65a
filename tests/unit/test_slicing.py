"""Merging a tensor slice by slice on the CPU (merge_methods.spec.slices) changes nothing: every method gives
the same bits with small slices as in one span, and the span-wise top-k cut is exact with ties that
straddle slice boundaries."""
import pytest
import torch

import merge_methods as mm
from merge_methods import ops, spec as spec_mod

from spying import spy_results
from test_registry import EXPECTED, n_models

# a slice length that is a multiple of every vector width, so sliced and whole runs take the same
# vectorized/scalar code paths at the same elements; the tensors below are many slices long
SMALL = 512


def _inputs(name, n, dtype, seed):
    """fp16-quantized task vectors, so magnitudes tie often, including across slice boundaries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    steps = torch.randint(-6, 7, (n_models(mm.get_spec(name)), n), generator=g).float() * 0.01
    models = [(base.float() + s).to(dtype) for s in steps]
    return base, models


def _merge(name, base, models, monkeypatch, slice_len, **params):
    monkeypatch.setattr(spec_mod, "SLICE", slice_len)
    spec = mm.get_spec(name)
    return mm.create(name).merge(None if spec.base == "none" else base, models, key="k.weight", seed=7, **params)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sliced_merge_is_bit_identical(name, dtype, monkeypatch, one_thread):
    """Also with half-precision inputs, whose base is converted span by span into the reused buffer."""
    base, models = _inputs(name, 40 * SMALL + 37, dtype, seed=11)
    whole = _merge(name, base, models, monkeypatch, 1 << 40)
    sliced = _merge(name, base, models, monkeypatch, SMALL)
    assert torch.equal(whole, sliced), f"{name}: {(whole != sliced).sum()} elements differ"


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_sliced_sparsification_with_options(name, rescale, monkeypatch, one_thread):
    base, models = _inputs(name, 30 * SMALL + 5, torch.float16, seed=12)
    params = {"density": [0.3, 0.6, 0.8][:len(models)]}
    if name in ("ties", "breadcrumbs_ties"):
        m = mm.create(name, rescale=rescale, consensus="count")
    else:
        m = mm.create(name, rescale=rescale)
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = m.merge(base, models, key="k", seed=3, **params)
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    sliced = m.merge(base, models, key="k", seed=3, **params)
    if rescale == "none":
        assert torch.equal(whole, sliced)
    else:
        # l1 norms are summed span by span (in fp64): the rescale factor may differ in its last bit, which
        # can move an fp16 result by one unit in the last place (also near zero, so no relative tolerance)
        ulps = (whole.view(torch.int16).int() - sliced.view(torch.int16).int()).abs()
        assert torch.equal(whole.sign(), sliced.sign())
        assert ulps.max() <= 1, f"{int(ulps.max())} ulps apart"
        assert (whole != sliced).float().mean() < 0.01


def _prune(x, k, spans):
    out = x.clone()
    cut = ops.magnitude_cut(out, k, spans)
    for i, (s, e) in enumerate(spans):
        cut.prune_(out[s:e], i)
    return out


@pytest.mark.parametrize("k", [0, 1, 700, 5000, 9999, 10000])
def test_magnitude_cut_over_spans_keeps_exactly_k_in_index_order(k):
    """Magnitudes 1..9 (about 1100 of each, either sign): the cut runs span by span through ties at its
    threshold and keeps exactly k entries, the tied ones first in index order, as the plain mask does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, 10, (10_000,), generator=g).float() * torch.where(
        torch.rand(10_000, generator=g) < 0.5, -1.0, 1.0)
    spans = [(s, min(s + 333, x.numel())) for s in range(0, x.numel(), 333)]
    pruned = _prune(x, k, spans)
    assert int(torch.count_nonzero(pruned)) == k
    assert torch.equal(pruned, x * ops.topk_mask(x.abs(), k))


@pytest.mark.parametrize("zeros,span,n", [(0.0, 65_536, 600_001), (0.9, 65_536, 600_001), (0.0, 65_537, 600_001),
                                          (0.0, 16_384, 100_003), (0.0, 262_144, 2_097_155)])
def test_magnitude_cut_sampled_path_is_exact_across_spans(zeros, span, n, monkeypatch):
    """Above 4·2^14 elements the cut brackets the k-th magnitude from a sample; still exact, with ties
    (split inside a span at the position of its last kept tie), with most entries zero (the bracket
    then reaches down to 0), and with spans at odd offsets (candidates gathered float by float).  The
    largest tensor's sample and gathered candidates are big enough to be sampled in turn."""
    assert ops.sample_stride(n) is not None
    sizes = []
    real = ops.kth_largest

    def spy(flat, k, least=ops._MIN_SAMPLE):
        sizes.append((flat.numel(), least))
        return real(flat, k, least)
    monkeypatch.setattr(ops, "kth_largest", spy)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(n, generator=g) * 50).round()
    x[x == 0] = 1.0
    x[torch.rand(n, generator=g) < zeros] = 0.0
    spans = [(s, min(s + span, n)) for s in range(0, n, span)]
    for k in (1, n // 20, n // 5, n // 2, n - 3):
        pruned = _prune(x, k, spans)
        assert torch.equal(pruned, x * ops.topk_mask(x.abs(), k)), k
        assert int(torch.count_nonzero(pruned)) == min(k, int(torch.count_nonzero(x))), k
    if n > 1_000_000:
        assert any(ops.sample_stride(size, least) is not None and least < ops._MIN_SAMPLE for size, least in sizes)


def test_magnitude_cut_threshold_is_exact_at_float_spacing():
    """Magnitudes one float32 step apart: the strict/non-strict boundary of hardshrink is right."""
    t = torch.tensor(0.1)
    up = torch.nextafter(t, torch.tensor(1.0))
    down = torch.nextafter(t, torch.tensor(0.0))
    x = torch.stack([down, t, up, -t, -down, -up]).repeat(3)
    for k in range(x.numel() + 1):
        assert torch.equal(_prune(x, k, [(0, 7), (7, x.numel())]), x * ops.topk_mask(x.abs(), k)), k


def test_elementwise_methods_are_declared_and_not_randomized():
    """The flag that lets the CPU path slice a method: set on exactly the per-element methods."""
    flagged = {s.name for s in mm.all_specs() if s.elementwise}
    assert flagged == {"linear", "task_arithmetic", "ram", "nearswap", "passthrough", "weighted_sum", "add_difference",
                       "train_difference", "add_opposite", "add_strict_opposite", "geometric_sum", "clamp",
                       "triple_sum", "sum_twice", "weighted_subtraction", "multiply_difference",
                       "similarity_add_difference", "multiply_quotient"}
    assert not any(s.randomized for s in mm.all_specs() if s.elementwise)
    with pytest.raises(ValueError, match="cannot be elementwise"):
        spec_mod.merge_method("never_registered", help="", source="", randomized=True, elementwise=True)


def test_sliced_merge_reports_the_model_with_nan(monkeypatch):
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    base = torch.zeros(10 * SMALL)
    bad = torch.ones(10 * SMALL)
    bad[7 * SMALL + 3] = float("nan")
    with pytest.raises(mm.MergeError, match=r": model 2 contains NaN"):
        mm.create("linear").merge(None, [base, bad])
    with pytest.raises(mm.MergeError, match="base tensor contains NaN"):
        mm.create("task_arithmetic").merge(bad, [base])
    with pytest.raises(mm.MergeError, match=r": model 2 contains NaN"):
        mm.create("ties").merge(base, [base + 1, bad], density=0.5)      # the streamed path


# -- the streamed path (methods with a ``streamed`` implementation: TIES and breadcrumbs) --------------

STREAMED = {"ties", "breadcrumbs", "breadcrumbs_ties", "ramplus_tl"}
GTA_STREAMED = STREAMED - {"ramplus_tl"}      # RAM+'s streamed path: tests/unit/test_ram.py


def test_streamed_methods_are_declared():
    assert {s.name for s in mm.all_specs() if s.streamed is not None} == STREAMED
    with pytest.raises(ValueError, match="takes no streamed"):
        spec_mod.merge_method("never_registered", help="", source="", elementwise=True,
                              streamed=lambda inputs, ctx, **p: None)


def _spy_streamed(monkeypatch):
    """Counts the streamed merges that produced a result (and not None, handing over to the stack path)."""
    from merge_methods import task_arithmetic as ta
    return spy_results(monkeypatch, ta, "_gta_streamed")


@pytest.mark.parametrize("name", sorted(GTA_STREAMED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rescale", ["none", "inverse_density"])
def test_streamed_merge_is_bit_identical(name, dtype, rescale, monkeypatch, one_thread):
    """Sampled brackets (a small sample size makes these tensors 'large'), ties at the thresholds across
    spans, models at density 0 and 1 beside a pruned one, an fp16 result written span by span."""
    monkeypatch.setattr(ops, "_SAMPLE", 256)
    base, models = _inputs("ties", 40 * SMALL + 37, dtype, seed=13)
    models = models[:2] + [models[0].clone()]
    params = {"density": [0.3, 0.0, 1.0], "weight": [1.0, 0.7, -0.4]}
    if name != "ties":
        params["gamma"] = [0.05, 0.01, 0.2]
    m = mm.create(name, rescale=rescale)
    calls = _spy_streamed(monkeypatch)
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = m.merge(base, models, key="k", **params)
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    streamed = m.merge(base, models, key="k", **params)
    assert calls == [True]
    assert streamed.dtype == dtype
    assert torch.equal(whole, streamed), f"{(whole != streamed).sum()} elements differ"


def test_streamed_merge_falls_back_to_the_exact_cut_when_the_sample_misleads(monkeypatch, one_thread):
    """Every sampled position holds a huge delta: the bracket misses and the exact cut takes over."""
    monkeypatch.setattr(ops, "_SAMPLE", 256)
    n = 40 * SMALL
    stride = ops.sample_stride(n)
    g = torch.Generator().manual_seed(14)
    base = torch.randn(n, generator=g)
    model = base + 0.01 * torch.randn(n, generator=g)
    model[::stride] += 100.0
    m = mm.create("ties")
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    streamed = m.merge(base, [model], density=0.2)
    delta = model - base
    assert torch.equal(streamed, base + delta * ops.topk_mask(delta.abs(), int(0.2 * n)))


def test_streamed_merge_leaves_l1_rescale_to_the_stacked_path(monkeypatch):
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    calls = _spy_streamed(monkeypatch)
    base, models = _inputs("ties", 4 * SMALL, torch.float32, seed=15)
    mm.create("ties", rescale="l1").merge(base, models, density=0.5)
    assert calls == [False]


@pytest.mark.parametrize("name", sorted(GTA_STREAMED))
def test_streamed_merge_accepts_differences_that_overflow(name, monkeypatch, one_thread):
    """Finite weights whose difference overflows to ±Inf are no input error: the streamed path (which
    checks the differences, and the inputs only where those are not finite) merges them as the
    stacked path does."""
    monkeypatch.setattr(ops, "_SAMPLE", 256)
    base, models = _inputs("ties", 40 * SMALL + 37, torch.float32, seed=16)
    for pos, (b, m0, m1) in {5: (-3e38, 3e38, 0.0), 9 * SMALL + 1: (3e38, -3e38, -3e38),
                             30 * SMALL: (-3e38, 3e38, 3e38)}.items():
        base[pos], models[0][pos], models[1][pos] = b, m0, m1
    m = mm.create(name)
    calls = _spy_streamed(monkeypatch)
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = m.merge(base, models, key="k", density=0.5)
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    streamed = m.merge(base, models, key="k", density=0.5)
    assert calls == [True]
    assert not whole.isfinite().all()
    torch.testing.assert_close(streamed, whole, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", sorted(GTA_STREAMED))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["base", "pruned", "dense", "dropped"])
def test_streamed_merge_reports_non_finite_inputs(name, bad, where, monkeypatch, one_thread):
    """NaN/±Inf anywhere in an input is the merge's error, naming the input, whether it sits in a model
    whose differences are scanned for its cut (the scan sees it) or in one kept whole or dropped (checked
    apart); with check_finite off the merge goes through."""
    monkeypatch.setattr(ops, "_SAMPLE", 256)
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    base, models = _inputs("ties", 40 * SMALL + 37, torch.float32, seed=17)
    models = models[:2] + [models[0].clone()]
    target = {"base": base, "pruned": models[0], "dense": models[1], "dropped": models[2]}[where]
    target[23 * SMALL + 5] = bad
    params = {"density": [0.3, 1.0, 0.0]}
    if name != "ties":
        params["gamma"] = 0.05
    calls = _spy_streamed(monkeypatch)
    m = mm.create(name)
    text = "base tensor contains NaN or Inf" if where == "base" else \
        rf": model {['pruned', 'dense', 'dropped'].index(where) + 1} contains NaN or Inf"
    with pytest.raises(mm.MergeError, match=text):
        m.merge(base, models, key="k", **params)
    out = m.merge(base, models, key="k", check_finite=False, **params)
    assert calls[-1] is True and out.shape == base.shape


@pytest.mark.parametrize("slice_len", [1 << 40, SMALL])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_merge_takes_weights_that_require_grad(name, slice_len, monkeypatch, one_thread):
    """ComfyUI's weights are nn.Parameters (requires_grad=True): every path (whole, sliced, streamed)
    gives the same bits as for detached copies, and the result carries no autograd graph."""
    base, models = _inputs(name, 6 * SMALL + 3, torch.float32, seed=13)
    plain = _merge(name, base, models, monkeypatch, slice_len)
    params = [torch.nn.Parameter(t.clone()) for t in [base] + models]
    got = _merge(name, params[0], params[1:], monkeypatch, slice_len)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, plain), f"{name}: {(got != plain).sum()} elements differ"


@pytest.mark.parametrize("density", [0.05, 0.2])
def test_streamed_merge_reports_many_infinite_entries(density, monkeypatch, one_thread):
    """A tenth of a model infinite: its sample brackets the cut at inf, which must not let the infinite entries
    pass the scan as candidates (the bracket stays below inf)."""
    monkeypatch.setattr(spec_mod, "SLICE", 64 * SMALL)
    base, models = _inputs("ties", 400_000, torch.float32, seed=18)
    models[0][::10] = float("inf")
    with pytest.raises(mm.MergeError, match=r": model 1 contains NaN or Inf"):
        mm.create("ties").merge(base, models, key="k", density=density)
