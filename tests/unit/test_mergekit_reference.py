"""Agreement with mergekit's own implementation (mergekit 0.1.5) on random inputs.

Deterministic methods must agree to a relative error of 1e-5; DARE/DELLA (random masks drawn from
different generators) are compared statistically.  Where we deliberately differ (a mergekit defect
we fix) a test pins the difference down instead.

Needs ``pip install --no-deps mergekit==0.1.5`` (its imports used here need only torch, pydantic,
typing_extensions, which the environment already has).
"""
import math

import pytest
import torch

mergekit = pytest.importorskip("mergekit")

from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import (  # noqa: E402
    ConsensusMethod, GeneralizedTaskArithmeticMerge, get_mask)
from mergekit.sparsify import (RescaleNorm, SparsificationMethod, della_magprune, magnitude,  # noqa: E402
                               magnitude_outliers, rescaled_masked_tensor)

import merge_methods as mm  # noqa: E402
from merge_methods import ops  # noqa: E402
from merge_methods import task_arithmetic as ta  # noqa: E402


def theirs(name, base, models, seed=None, method=None, **params):
    """Run mergekit's registered method (or a given method object) on one tensor group."""
    group = TensorGroup.from_tensors(models if base is None else [base] + list(models),
                                     base_index=None if base is None else 0)
    method = method or registry.get(name)
    if seed is None:
        return method([group], parameters=params)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return method([group], parameters=params)[0]


def ours(name, base, models, seed=0, key="k", **params):
    spec = mm.get_spec(name)
    glob = {k: v for k, v in params.items() if not spec.param(k).per_model}
    pm = {k: v for k, v in params.items() if spec.param(k).per_model}
    return mm.create(name, **glob).merge(base, models, key=key, seed=seed, **pm)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def agree(a, b, tol=1e-5):
    assert torch.isfinite(b).all()
    assert rel_err(a, b) <= tol, rel_err(a, b)


SHAPES = [(300,), (24, 40), (8, 6, 3, 3)]


def inputs(seed, n_models, shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    models = [base + scale * (0.5 * common + torch.randn(shape, generator=g)) for _ in range(n_models)]
    return base, models


def _rescale_bool(v):
    return {"l1": True, "none": False}[v]


# -- the deterministic methods --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 3])
def test_task_arithmetic(shape, n_models):
    base, models = inputs(1, n_models, shape)
    w = [1.0, -0.4, 0.7][:n_models]
    for normalize in (False, True):
        for lam in (1.0, 0.5):
            p = dict(weight=w, normalize=normalize, **{"lambda": lam})
            agree(ours("task_arithmetic", base, models, **p), theirs("task_arithmetic", base, models, **p))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_methods(shape, name):
    base, models = inputs(2, 3, shape)
    extra = {"gamma": [0.01, 0.0, 0.2]} if name.startswith("breadcrumbs") else {}
    for w, density in (([1.0, 0.5, 0.8], [0.2, 0.5, 0.9]), ([1.0, -0.6, 0.3], [1.0, 0.1, 0.35]),
                       ([0.5, 0.5, 0.5], 0.3)):
        for normalize in (False, True):
            for rescale in ("none", "l1"):
                p = dict(weight=w, density=density, normalize=normalize, **extra, **{"lambda": 0.9})
                agree(ours(name, base, models, rescale=rescale, **p),
                      theirs(name, base, models, rescale=_rescale_bool(rescale), **p))


@pytest.mark.parametrize("shape", SHAPES)
def test_count_consensus(shape):
    # mergekit has no registered method with the count vote; build one from its own class
    base, models = inputs(3, 3, shape)
    method = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.count, sparsification_method=SparsificationMethod.magnitude,
        default_normalize=True, default_rescale=False, method_name="ties_count", method_pretty_name=None,
        method_reference_url=None)
    for normalize in (False, True):
        p = dict(weight=[1.0, 0.7, -0.3], density=[0.4, 0.6, 1.0], normalize=normalize)
        agree(ours("ties", base, models, consensus="count", **p), theirs(None, base, models, method=method, **p))


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_at_density_one(name):
    base, models = inputs(4, 3, (16, 20))
    for normalize in (False, True):
        for rescale in ("none", "l1"):
            p = dict(weight=[1.0, 0.3, 0.6], density=1.0, normalize=normalize, **{"lambda": 1.2})
            agree(ours(name, base, models, rescale=rescale, **p),
                  theirs(name, base, models, seed=0, rescale=_rescale_bool(rescale), **p))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_sce(shape, n_models):
    base, models = inputs(5, n_models, shape)
    for topk in (1.0, 0.6, 0.25, 0.0):
        agree(ours("sce", base, models, select_topk=topk), theirs("sce", base, models, select_topk=topk))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_model_stock(shape, n_models):
    base, models = inputs(6, n_models, shape)
    for fw in (False, True):
        agree(ours("model_stock", base, models, filter_wise=fw), theirs("model_stock", base, models, filter_wise=fw))


@pytest.mark.parametrize("shape", SHAPES + [()])
def test_linear(shape):
    _, models = inputs(7, 3, shape)
    for w in ([1.0, 2.0, 0.5], [0.3, -0.2, 0.4]):
        for normalize in (False, True):
            agree(ours("linear", None, models, weight=w, normalize=normalize),
                  theirs("linear", None, models, weight=w, normalize=normalize))


# -- the building blocks -----------------------------------------------------------------------------------

def test_sparsifiers_and_consensus_agree():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(37, 23, generator=g)
    for d in (0.05, 0.3, 0.77):
        assert torch.equal(x * ta.magnitude_mask(x, d), magnitude(x, d))
        for gamma in (0.0, 0.01, 0.1, 0.5):
            assert torch.equal(x * ta.outlier_mask(x, d, gamma), magnitude_outliers(x, d, gamma=gamma))
    mask = (torch.rand(x.shape, generator=g) < 0.4).float()
    for norm in ("l1", "l2", "linf"):
        agree(ops.rescale_to_norm(x[None], (x * mask)[None], norm)[0], rescaled_masked_tensor(x, mask, RescaleNorm(norm)))
    stacked = torch.randint(-2, 3, (4, 50), generator=g).float()  # sign ties and zeros
    for mode in ("sum", "count"):
        assert torch.equal(ops.sign_consensus(stacked, mode), get_mask(stacked, mode))


# -- deliberate differences -------------------------------------------------------------------------------

def test_difference_magnitude_below_one_entry():
    # mergekit 0.1.5 keeps max(1, int(d·n)) entries (older versions asserted); we keep int(d·n) = 0
    x = torch.tensor([1.0, -2.0, 3.0])
    assert int((magnitude(x, 0.3) != 0).sum()) == 1
    assert int(ta.magnitude_mask(x, 0.3).sum()) == 0


def test_difference_della_rows_of_length_one():
    x = torch.randn(5, 1)
    with pytest.raises(RuntimeError):  # mergekit: 0/0 probabilities make torch.bernoulli fail
        della_magprune(x, 0.5, 0.1)
    torch.testing.assert_close(ta.della_keep_prob(x, 0.5, 0.1), torch.full((5, 1), 0.5))


def test_difference_linear_weights_summing_to_zero():
    models = [torch.ones(3), torch.zeros(3)]
    assert not torch.isfinite(theirs("linear", None, models, weight=[1.0, -1.0])).any()
    torch.testing.assert_close(ours("linear", None, models, weight=[1.0, -1.0]), torch.ones(3))


def test_difference_small_deltas_sce_and_model_stock():
    # unit-scale task vectors agree; at 1e-5 scale mergekit's absolute epsilons (SCE: uniform weights
    # when Σ mean(δ²) < 1e-6; Model Stock: ‖a‖‖b‖ clamped at 1e-6) change the result, ours is
    # scale-equivariant.  A zero base keeps the tiny deltas exact in fp32.
    g = torch.Generator().manual_seed(9)
    base, common = torch.zeros(30, 10), torch.randn(30, 10, generator=g)
    tvs = [(common + torch.randn(30, 10, generator=g)) * s for s in (1.0, 2.0, 4.0)]  # unequal SCE weights
    for name in ("sce", "model_stock"):
        big = ours(name, base, tvs)
        agree(big, theirs(name, base, tvs))
        small = [t * 1e-5 for t in tvs]
        agree(ours(name, base, small), big * 1e-5)
        assert rel_err(theirs(name, base, small), big * 1e-5) > 0.05


# -- DARE / DELLA: statistics ------------------------------------------------------------------------------

def _stats(delta, out_delta):
    kept = out_delta != 0
    return (kept.double().mean().item(), float(out_delta.abs().sum() / delta.abs().sum()),
            float(out_delta.norm() / delta.norm()))


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_dare_linear_statistics(density):
    base, (model,) = inputs(10, 1, (100, 100))
    delta = model - base
    sigma = math.sqrt(density * (1 - density) / delta.numel())
    for rescale in ("l1", "none"):
        a = ours("dare_linear", base, [model], seed=1, density=density, rescale=rescale) - base
        b = theirs("dare_linear", base, [model], seed=1, weight=1.0, density=density,
                   rescale=_rescale_bool(rescale)) - base
        fa, l1a, l2a = _stats(delta, a)
        fb, l1b, l2b = _stats(delta, b)
        assert abs(fa - density) < 5 * sigma and abs(fb - density) < 5 * sigma
        if rescale == "l1":
            assert abs(l1a - 1) < 1e-5 and abs(l1b - 1) < 1e-5  # both match the L1 norm exactly
            assert abs(l2a - l2b) / l2b < 0.03  # ≈ 1/sqrt(density)
        else:
            assert abs(l1a - l1b) < 0.03 and abs(l2a - l2b) < 0.03


def test_dare_ties_statistics():
    base, models = inputs(11, 3, (60, 60))
    p = dict(weight=[1.0, 0.6, 0.8], density=[0.3, 0.5, 0.4])
    fa, fb, na, nb, sa, sb = [], [], [], [], [], []
    ref = theirs("task_arithmetic", base, models, weight=p["weight"]) - base
    for s in range(6):
        a = ours("dare_ties", base, models, seed=s, **p) - base
        b = theirs("dare_ties", base, models, seed=s, rescale=True, **p) - base
        fa.append((a != 0).double().mean().item())
        fb.append((b != 0).double().mean().item())
        na.append(float(a.norm()))
        nb.append(float(b.norm()))
        sa.append((torch.sign(a) == torch.sign(ref)).double().mean().item())
        sb.append((torch.sign(b) == torch.sign(ref)).double().mean().item())
    mean = lambda v: sum(v) / len(v)
    assert abs(mean(fa) - mean(fb)) < 0.01  # ≈ 1 − 0.7·0.5·0.6 = 0.79
    assert abs(mean(fa) - 0.79) < 0.01
    assert abs(mean(na) - mean(nb)) / mean(nb) < 0.02
    assert abs(mean(sa) - mean(sb)) < 0.02


def test_della_statistics():
    base, (model,) = inputs(12, 1, (200, 300))
    delta = model - base
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)  # mergekit ranks along dim 1, as we do
    lo, hi = ranks < 30, ranks >= 270
    for name in ("della_linear", "della"):
        a = ours(name, base, [model], seed=3, density=0.4, epsilon=0.2, normalize=False) - base
        b = theirs(name, base, [model], seed=3, weight=1.0, density=0.4, epsilon=0.2, normalize=False) - base
        for out in (a, b):
            kept = out != 0
            assert abs(kept.double().mean().item() - 0.4) < 0.01
            # p = 0.2 + 0.4·r/299: ≈ 0.219 on the 30 smallest of each row, ≈ 0.581 on the 30 largest
            assert abs(kept[lo].double().mean().item() - 0.2194) < 0.02
            assert abs(kept[hi].double().mean().item() - 0.5806) < 0.02
            assert abs(float(out.abs().sum() / delta.abs().sum()) - 1) < 1e-5  # L1 rescale (default)
        assert abs(float(a.norm() / b.norm()) - 1) < 0.02


def test_every_mergekit_method_is_here_under_its_name():
    """mergekit's registry, read from the installed mergekit: each of its methods exists here by the same name
    (a recipe naming a mergekit method needs no translation)."""
    theirs = {m.spec.name for m in registry.registered_methods()}
    assert len(theirs) >= 20
    assert theirs <= set(mm.names()), sorted(theirs - set(mm.names()))
