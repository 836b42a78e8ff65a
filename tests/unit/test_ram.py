"""RAM and RAM+ (mergekit's ``ram`` and ``ramplus_tl``): hand-checked values, invariants, agreement with
mergekit 0.1.5, and the streamed RAM+ path giving the whole-tensor bits."""
import pytest
import torch

import merge_methods as mm
from spying import spy_results
from merge_methods import ram as ram_mod
from merge_methods import spec as spec_mod


def _sparse_inputs(seed, n_models, shape, keep=0.3, noise=1e-6):
    """Task vectors changed on random, overlapping supports, with sub-epsilon noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n_models):
        on = torch.rand(shape, generator=g) < keep
        delta = torch.where(on, torch.randn(shape, generator=g), noise * torch.randn(shape, generator=g))
        models.append(base + delta)
    return base, models


# hand-checked: base 0; c = [2, 1, 2, 1, 0]; model 1 has 2 shared entries and 1 unique (ρ = 2), model 2 one
# of each (ρ = 1), model 3 one shared and its 1e-6 below epsilon
ZERO = torch.zeros(5)
MODELS = [torch.tensor([1.0, 5.0, 2.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 0.0, 7.0, 0.0]),
          torch.tensor([0.0, 0.0, 4.0, 0.0, 1e-6])]


def test_ram_hand_checked():
    out = mm.create("ram").merge(ZERO, MODELS)
    assert torch.equal(out, torch.tensor([2.0, 5.0, 3.0, 7.0, 0.0]))
    # on a tenth of the values, epsilon 0.25 drops the 0.1s and 0.2s: [0.3, 0.5, 0.4, 0.7, 0] are each counted
    # by one model
    tenth = [0.1 * m for m in MODELS]
    assert torch.equal(mm.create("ram", epsilon=0.25).merge(ZERO, tenth), 0.1 * torch.tensor([3.0, 5.0, 4.0, 7.0, 0.0]))
    # epsilon 0 counts every nonzero change, the 1e-6 too
    assert torch.equal(mm.create("ram", epsilon=0.0).merge(ZERO, MODELS), torch.tensor([2.0, 5.0, 3.0, 7.0, 1e-6]))


def test_ramplus_hand_checked():
    # r 0.5, alpha 1.5: λ₁ = 1 + 0.5·min(2, 1.5) = 1.75, λ₂ = 1 + 0.5·1 = 1.5
    out = mm.create("ramplus_tl", r=0.5, alpha=1.5).merge(ZERO, MODELS)
    assert torch.equal(out, torch.tensor([2.0, 5.0 * 1.75, 3.0, 7.0 * 1.5, 0.0]))
    # alpha caps ρ: alpha 0.5 gives both λ = 1.25; r 0 is RAM
    out = mm.create("ramplus_tl", r=0.5, alpha=0.5).merge(ZERO, MODELS)
    assert torch.equal(out, torch.tensor([2.0, 5.0 * 1.25, 3.0, 7.0 * 1.25, 0.0]))
    assert torch.equal(mm.create("ramplus_tl", r=0.0).merge(ZERO, MODELS), mm.create("ram").merge(ZERO, MODELS))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_invariants(name):
    base, models = _sparse_inputs(1, 3, (40, 30))
    method = mm.create(name)
    # identical models: their shared mean is the model itself where it changed, the base elsewhere
    same = method.merge(base, [models[0]] * 3)
    changed = (models[0] - base).abs() > 1e-5
    assert torch.allclose(same, torch.where(changed, models[0], base), rtol=0, atol=1e-6)
    # disjoint supports: every change above epsilon is kept whole (RAM+ scales nothing: no model has a
    # shared entry)
    masks = [torch.arange(base.numel()).reshape(base.shape) % 3 == i for i in range(3)]
    parts = [torch.where(k, m, base) for k, m in zip(masks, models)]
    expect = base + sum(torch.where((p - base).abs() > 1e-5, p - base, 0.0) for p in parts)
    assert torch.allclose(method.merge(base, parts), expect, rtol=0, atol=1e-6)
    # the order of the models does not matter
    a = method.merge(base, models)
    b = method.merge(base, models[::-1])
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_mean_of_huge_values_is_finite(name):
    """Each task vector is divided by the count before the sum (as mergekit): the mean of two changes of
    2e38 and 3e38 is 2.5e38, not an overflowed sum."""
    base = torch.zeros(3)
    out = mm.create(name).merge(base, [torch.full((3,), 2e38), torch.full((3,), 3e38)])
    assert torch.equal(out, torch.full((3,), 2e38) / 2 + torch.full((3,), 3e38) / 2)


def test_ramplus_boosts_only_unique_changes():
    base, models = _sparse_inputs(2, 2, (64, 48))
    plain = mm.create("ram").merge(base, models)
    plus = mm.create("ramplus_tl", r=1.0, alpha=10.0).merge(base, models)
    deltas = torch.stack([m - base for m in models])
    counted = deltas.abs() > 1e-5
    count = counted.sum(0)
    assert torch.equal(plain[count != 1], plus[count != 1])
    for i in range(2):
        unique = counted[i] & (count == 1)
        rho = (counted[i] & (count > 1)).sum() / unique.sum()
        lam = 1 + min(float(rho), 10.0)
        assert torch.allclose(plus[unique], base[unique] + lam * deltas[i][unique], rtol=1e-6, atol=1e-6)


# -- mergekit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(300,), (24, 40), (8, 6, 3, 3)])
@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_agrees_with_mergekit(shape, n_models):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    base, models = _sparse_inputs(3 + n_models, n_models, shape)
    settings = [("ram", {}), ("ram", {"epsilon": 0.3}), ("ramplus_tl", {}),
                ("ramplus_tl", {"r": 0.7, "alpha": 5.0}), ("ramplus_tl", {"r": 2.0, "alpha": 0.05, "epsilon": 0.1})]
    for name, params in settings:
        group = TensorGroup.from_tensors([base] + models, base_index=0)
        theirs = registry.get(name)([group], parameters=params)[0]
        ours = mm.create(name, **params).merge(base, models)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (name, params)
        assert not torch.equal(theirs, base)


# -- the streamed RAM+ ---------------------------------------------------------------------------------

SMALL = 512


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streamed_ramplus_is_bit_identical(dtype, monkeypatch, one_thread):
    calls = spy_results(monkeypatch, ram_mod, "_ramplus_streamed")
    base, models = _sparse_inputs(7, 3, (40 * SMALL + 37,), keep=0.4)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    method = mm.create("ramplus_tl", r=0.9, alpha=3.0)
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = method.merge(base, models, key="k")
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    streamed = method.merge(base, models, key="k")
    assert calls == [True]
    assert streamed.dtype == dtype
    assert torch.equal(whole, streamed), f"{(whole != streamed).sum()} elements differ"


def test_streamed_ramplus_accepts_differences_that_overflow(monkeypatch, one_thread):
    """Finite weights whose difference overflows to ±Inf are no input error, in the streamed path as in
    the stacked one."""
    base, models = _sparse_inputs(9, 2, (40 * SMALL + 37,))
    for pos, (b, m0, m1) in {5: (-3e38, 3e38, 0.0), 9 * SMALL + 1: (3e38, -3e38, -3e38)}.items():
        base[pos], models[0][pos], models[1][pos] = b, m0, m1
    method = mm.create("ramplus_tl", r=1.0, alpha=100.0)     # no cap: λ shows any miscount
    monkeypatch.setattr(spec_mod, "SLICE", 1 << 40)
    whole = method.merge(base, models, key="k")
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    with mm.reuse_buffers():       # as the engine merges: the check of a span must not leave its inputs in the buffer
        streamed = method.merge(base, models, key="k")
    assert not whole.isfinite().all()
    torch.testing.assert_close(streamed, whole, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["base", "model 1", "model 2"])
def test_streamed_ramplus_reports_non_finite_inputs(bad, where, monkeypatch):
    monkeypatch.setattr(spec_mod, "SLICE", SMALL)
    base, models = _sparse_inputs(8, 2, (10 * SMALL,))
    target = {"base": base, "model 1": models[0], "model 2": models[1]}[where]
    target[7 * SMALL + 3] = bad
    text = "base tensor contains NaN or Inf" if where == "base" else rf": {where} contains NaN or Inf"
    with pytest.raises(mm.MergeError, match=text):
        mm.create("ramplus_tl").merge(base, models)
    out = mm.create("ramplus_tl").merge(base, models, check_finite=False)
    assert out.shape == base.shape
