"""task_arithmetic, ties, dare_*, breadcrumbs*, della*: formulas, invariants, randomness and edge cases."""
import math

import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError
from merge_methods import task_arithmetic as ta
from merge_methods.context import MergeContext

GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]
SPARSE = GTA[1:]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def run(name, base, models, key="k", seed=0, **params):
    """Split params into global (create) and per-model (merge) ones and merge one tensor."""
    spec = mm.get_spec(name)
    glob = {k: v for k, v in params.items() if not spec.param(k).per_model}
    pm = {k: v for k, v in params.items() if spec.param(k).per_model}
    return mm.create(name, **glob).merge(base, models, key=key, seed=seed, **pm)


# -- an independent element-by-element reference (plain Python, small tensors only) ----------------

def _sign(v):
    return (v > 0) - (v < 0)


def naive(base, models, weight, density=None, gamma=None, consensus=None, normalize=False, lam=1.0):
    b = base.double().flatten().tolist()
    n = len(b)
    deltas = []
    for i, m in enumerate(models):
        d = [x - y for x, y in zip(m.double().flatten().tolist(), b)]
        if density is not None and density[i] < 1:
            k = int(density[i] * n)
            order = sorted(range(n), key=lambda j: (-abs(d[j]), j))
            top = 0 if gamma is None else min(int(gamma[i] * n), n - k)
            keep = set(order[top:top + k])
            d = [d[j] if j in keep else 0.0 for j in range(n)]
        deltas.append(d)
    out = []
    for j in range(n):
        vals = [weight[i] * deltas[i][j] for i in range(len(models))]
        if consensus:
            s = sum(vals) if consensus == "sum" else sum(_sign(v) for v in vals)
            elected = 1 if s >= 0 else -1
            agree = [_sign(v) == elected for v in vals]
            mixed = sum(v for v, a in zip(vals, agree) if a)
            div = sum(w for w, a in zip(weight, agree) if a)
            div = 1.0 if div == 0 else div
        else:
            mixed = sum(vals)
            div = sum(weight)
            div = 1.0 if abs(div) < 1e-8 else div
        out.append(b[j] + lam * (mixed / div if normalize else mixed))
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# -- spec ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,normalize,rescale,consensus", [
    ("task_arithmetic", False, None, None), ("ties", True, "none", "sum"), ("dare_ties", False, "l1", "sum"),
    ("dare_linear", False, "l1", None), ("breadcrumbs", False, "none", None),
    ("breadcrumbs_ties", False, "none", "sum"), ("della", True, "l1", "sum"), ("della_linear", False, "l1", None)])
def test_defaults_follow_mergekit_table(name, normalize, rescale, consensus):
    spec = mm.get_spec(name)
    names = {p.name for p in spec.params}
    assert spec.param("normalize").default is normalize
    assert spec.param("lambda").default == 1.0 and not spec.param("lambda").per_model
    assert spec.param("weight").default == 1.0 and spec.param("weight").per_model
    assert (rescale is None) == ("rescale" not in names)
    if rescale:
        assert spec.param("rescale").default == rescale
        assert spec.param("rescale").choices == ("l1", "inverse_density", "none")
        assert spec.param("density").default == 1.0 and spec.param("density").per_model
    assert (consensus is None) == ("consensus" not in names)
    if consensus:
        assert spec.param("consensus").default == "sum"
    assert ("gamma" in names) == name.startswith("breadcrumbs")
    assert ("epsilon" in names) == name.startswith("della")
    if "gamma" in names:
        assert spec.param("gamma").default == 0.01
    if "epsilon" in names:
        assert spec.param("epsilon").default == 0.15
    assert spec.randomized == (name in RANDOM)
    assert spec.base == mm.BASE_REQUIRED


def test_consensus_off_only_for_dare_ties():
    assert "off" in mm.get_spec("dare_ties").param("consensus").choices
    for name in ("ties", "breadcrumbs_ties", "della"):
        assert "off" not in mm.get_spec(name).param("consensus").choices
        with pytest.raises(MergeError, match="consensus"):
            mm.create(name, consensus="off")


# -- hand-checked formulas ---------------------------------------------------------------------------

def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0])
    models = [torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 4.0, 3.0])]
    # deltas [1, 0, -1] and [-1, 2, 0]; weighted sum with (1, 0.5): [0.5, 1, -1]
    close(run("task_arithmetic", base, models, weight=[1.0, 0.5]), torch.tensor([1.5, 3.0, 2.0]))
    close(run("task_arithmetic", base, models, weight=[1.0, 0.5], normalize=True),
          torch.tensor([1 + 0.5 / 1.5, 2 + 1 / 1.5, 3 - 1 / 1.5]))
    close(run("task_arithmetic", base, models, weight=[1.0, 0.5], **{"lambda": 2.0}), torch.tensor([2.0, 4.0, 1.0]))


def test_ties_by_hand():
    base = torch.zeros(4)
    models = [torch.tensor([3.0, -1.0, 2.0, -4.0]), torch.tensor([-2.0, 1.0, 1.0, -0.5]),
              torch.tensor([1.0, 5.0, -3.0, 0.1])]
    # density 0.5 keeps 2 of 4: [3,0,0,-4]; [-2,1,0,0] (|1| tie at index 1 and 2 -> index 1); [0,5,-3,0]
    # sums [1, 6, -3, -4] -> signs + + - -; agreeing: {m1}, {m2, m3}, {m3}, {m1}
    out = run("ties", base, models, density=0.5)
    close(out, torch.tensor([3.0, 3.0, -3.0, -4.0]))
    close(run("ties", base, models, density=0.5, normalize=False), torch.tensor([3.0, 6.0, -3.0, -4.0]))


def test_ties_sum_and_count_consensus_differ_by_hand():
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    # sum: 1 + 1 - 5 < 0 -> "-", only model 3 agrees; count: two "+" against one "-" -> "+"
    close(run("ties", base, models, consensus="sum"), torch.tensor([-5.0]))
    close(run("ties", base, models, consensus="count"), torch.tensor([1.0]))
    close(run("ties", base, models, consensus="count", normalize=False), torch.tensor([2.0]))


def test_sign_ties_go_to_plus_and_zeros_never_vote():
    base = torch.zeros(2)
    models = [torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])]
    # entry 0: sum 0 -> elected "+", only model 1 agrees; entry 1: nobody agrees -> divisor 1, result 0
    close(run("ties", base, models), torch.tensor([2.0, 0.0]))


def test_breadcrumbs_by_hand():
    base = torch.zeros(10)
    model = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)  # |delta| = 1..10
    # density 0.3, gamma 0.2: drop the 2 largest (10, 9), keep the next 3 (8, 7, 6)
    out = run("breadcrumbs", base, [model], density=0.3, gamma=0.2)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[5, 6, 7]] = True
    close(out, model * keep)
    # density 0.9, gamma 0.2: 9 kept leaves room for 1 outlier only
    out = run("breadcrumbs", base, [model], density=0.9, gamma=0.2)
    close(out, model * (torch.arange(10) != 9))
    # density 1 ignores gamma (as mergekit)
    close(run("breadcrumbs", base, [model], density=1.0, gamma=0.5), model)


@pytest.mark.parametrize("gamma", [0.0, 0.05])  # gamma*n = 0 and 0.5 < 1
def test_breadcrumbs_without_outliers_is_magnitude_pruning(gamma):
    # old mergekit zeroed the whole delta here (slice [n_bot:-0]); we remove no outliers
    g = torch.Generator().manual_seed(1)
    base, model = torch.randn(10, generator=g), torch.randn(10, generator=g)
    out = run("breadcrumbs", base, [model], density=0.4, gamma=gamma)
    close(out, run("ties", base, [model], density=0.4, normalize=False))
    assert int(((out - base) != 0).sum()) == 4


def test_della_keep_prob_by_hand():
    x = torch.tensor([0.1, -3.0, 2.0, 0.5])
    # ascending |x| ranks 0, 3, 2, 1 of 3 -> p = 0.35 + 0.3 * r / 3
    close(ta.della_keep_prob(x, 0.5, 0.15), torch.tensor([0.35, 0.65, 0.55, 0.45]))
    # 2-d: ranks run along dim 1, per row
    x2 = torch.tensor([[1.0, -2.0, 3.0], [9.0, 0.0, -4.0]])
    close(ta.della_keep_prob(x2, 0.5, 0.1), torch.tensor([[0.4, 0.5, 0.6], [0.6, 0.4, 0.5]]))
    # rows of length 1 / 0-d: probability = density (mergekit: 0/0 = NaN)
    close(ta.della_keep_prob(torch.randn(5, 1), 0.3, 0.1), torch.full((5, 1), 0.3))
    close(ta.della_keep_prob(torch.tensor(2.0), 0.3, 0.1), torch.tensor(0.3))
    # ties by index
    close(ta.della_keep_prob(torch.ones(3), 0.5, 0.2), torch.tensor([0.3, 0.5, 0.7]))


@pytest.mark.parametrize("shape", [(64, 300), (16, 40, 3, 3), (7, 1000, 2)])
def test_della_keep_prob_is_the_stable_rank_with_many_ties(shape):
    """The fp32 path sorts int64 keys (|x|'s bits above the index); it must give the stable argsort's ranks
    along dim 1, ties by index, as the fp64 path does: fp16-rounded values tie often, zeros and -0.0 too."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 0.01).half().float()
    x.view(-1)[::11] = 0.0
    x.view(-1)[::13] = -0.0
    order = torch.argsort(x.abs(), dim=1, stable=True)
    m = shape[1]
    view = [1] * len(shape)
    view[1] = m
    for dtype in (torch.float32, torch.float64):
        rank = torch.arange(m, dtype=dtype).view(view).expand(shape)
        want = torch.empty(shape, dtype=dtype).scatter_(1, order, rank).mul_(2 * 0.1 / (m - 1)).add_(0.5 - 0.1)
        assert torch.equal(ta.della_keep_prob(x.to(dtype), 0.5, 0.1), want), dtype


# -- against the independent reference ---------------------------------------------------------------

@pytest.mark.parametrize("trial", range(12))
def test_deterministic_methods_match_naive_reference(trial):
    g = torch.Generator().manual_seed(100 + trial)
    n_models = 1 + trial % 3
    shape = [(7,), (3, 5), (2, 3, 2, 2)][trial % 3]
    base = torch.randn(shape, generator=g)
    if trial % 2:  # integer deltas (exact in fp32): many magnitude ties and zero sign sums
        base = torch.randint(-3, 4, shape, generator=g).float() * 0.5
        models = [base + torch.randint(-2, 3, shape, generator=g).float() for _ in range(n_models)]
    else:
        models = [base + torch.randn(shape, generator=g) for _ in range(n_models)]
    weight = [round(float(x), 2) for x in (torch.rand(n_models, generator=g) * 2 - 0.5)]
    density = [[0.0, 0.3, 0.55, 1.0][(trial + i) % 4] for i in range(n_models)]
    gamma = [[0.0, 0.1, 0.3][(trial + i) % 3] for i in range(n_models)]
    lam = [1.0, 0.6, -1.5][trial % 3]
    for normalize in (False, True):
        kw = dict(weight=weight, normalize=normalize, **{"lambda": lam})
        nk = dict(weight=weight, normalize=normalize, lam=lam)
        close(run("task_arithmetic", base, models, **kw), naive(base, models, **nk))
        for cons in ("sum", "count"):
            close(run("ties", base, models, density=density, consensus=cons, **kw),
                  naive(base, models, density=density, consensus=cons, **nk))
            close(run("breadcrumbs_ties", base, models, density=density, gamma=gamma, consensus=cons, **kw),
                  naive(base, models, density=density, gamma=gamma, consensus=cons, **nk))
        close(run("breadcrumbs", base, models, density=density, gamma=gamma, **kw),
              naive(base, models, density=density, gamma=gamma, **nk))
        # randomized methods at density 1 are deterministic: plain TIES / task arithmetic
        close(run("dare_ties", base, models, density=1.0, **kw), naive(base, models, consensus="sum", **nk))
        close(run("dare_ties", base, models, density=1.0, consensus="off", **kw), naive(base, models, **nk))
        close(run("della", base, models, density=1.0, **kw), naive(base, models, consensus="sum", **nk))
        close(run("dare_linear", base, models, density=1.0, **kw), naive(base, models, **nk))
        close(run("della_linear", base, models, density=1.0, **kw), naive(base, models, **nk))


# -- invariants ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.0, 0.01, 0.29, 0.5, 0.77, 0.999, 1.0])
def test_magnitude_pruning_keeps_exactly_int_density_n(density):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 10, generator=g)
    x[0, :5] = 0.5  # a block of tied magnitudes
    x[1, :5] = -0.5
    mask = ta.magnitude_mask(x, density)
    if density >= 1:
        assert mask is None
        return
    k = int(density * x.numel())
    assert int(mask.sum()) == k
    if 0 < k < x.numel():
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


def test_magnitude_pruning_below_one_entry_keeps_none():
    # density*n < 1: mergekit 0.1.5 keeps 1 entry, old mergekit asserted; we keep int(density*n) = 0
    base = torch.zeros(3)
    model = torch.tensor([1.0, -2.0, 3.0])
    close(run("ties", base, [model], density=0.3), base)
    close(run("ties", torch.tensor(0.5), [torch.tensor(2.0)], density=0.9), torch.tensor(0.5))


@pytest.mark.parametrize("density,gamma", [(0.3, 0.01), (0.3, 0.2), (0.8, 0.3), (0.05, 0.0), (0.5, 1.0)])
def test_outlier_mask_counts(density, gamma):
    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(4))
    n = x.numel()
    mask = ta.outlier_mask(x, density, gamma)
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    assert int(mask.sum()) == keep
    order = torch.argsort(x.abs().flatten(), descending=True)
    assert not mask.flatten()[order[:top]].any()
    assert mask.flatten()[order[top:top + keep]].all()


def test_ties_result_agrees_with_elected_sign():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 20, generator=g)
    models = [base + torch.randn(30, 20, generator=g) for _ in range(3)]
    weight = [1.0, 0.7, 0.4]
    out = run("ties", base, models, weight=weight, density=0.4, normalize=False)
    pruned = torch.stack([(m - base) * ta.magnitude_mask(m - base, 0.4) for m in models])
    weighted = pruned * torch.tensor(weight).view(-1, 1, 1)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    delta = out - base
    nz = delta != 0
    assert torch.equal(torch.sign(delta[nz]), elected[nz])
    # every contribution against the elected sign was erased
    close(delta, (weighted * (torch.sign(weighted) == elected)).sum(0))


def test_rescale_choices_for_magnitude_pruning():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(50, generator=g)
    model = base + torch.randn(50, generator=g)
    delta = model - base
    plain = run("ties", base, [model], density=0.4, normalize=False) - base
    l1 = run("ties", base, [model], density=0.4, normalize=False, rescale="l1") - base
    inv = run("ties", base, [model], density=0.4, normalize=False, rescale="inverse_density") - base
    close(l1.abs().sum(), delta.abs().sum())
    close(l1, plain * (delta.abs().sum() / plain.abs().sum()))
    close(inv, plain / 0.4)


# -- DARE / DELLA ---------------------------------------------------------------------------------------

def _delta(name, base, model, **kw):
    return run(name, base, [model], normalize=False, **kw) - base


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_rescales(density):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(20000, generator=g)
    model = base + torch.randn(20000, generator=g)
    delta = model - base
    none = _delta("dare_linear", base, model, density=density, rescale="none")
    kept = none != 0
    frac = kept.double().mean().item()
    sigma = math.sqrt(density * (1 - density) / delta.numel())
    assert abs(frac - density) < 5 * sigma
    close(none[kept], delta[kept], tol=1e-6)  # kept entries untouched
    # the same draw for every rescale choice (same seed and key)
    inv = _delta("dare_linear", base, model, density=density, rescale="inverse_density")
    close(inv, none / density, tol=1e-5)
    l1 = _delta("dare_linear", base, model, density=density)  # default rescale l1
    assert torch.equal(l1 != 0, kept)
    close(l1.abs().sum(), delta.abs().sum(), tol=1e-5)


def test_dare_inverse_density_is_unbiased():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(64, generator=g)
    model = base + torch.randn(64, generator=g)
    outs = torch.stack([_delta("dare_linear", base, model, seed=s, density=0.5, rescale="inverse_density")
                        for s in range(400)])
    # per entry: mean of 400 draws of delta * Bernoulli(0.5) / 0.5 has std |delta| / 20
    err = (outs.mean(0) - (model - base)).abs() / (model - base).abs()
    assert float(err.max()) < 0.25
    assert float(err.mean()) < 0.06


def test_dare_determinism_keys_and_model_independence():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(40, 30, generator=g)
    models = [base + torch.randn(40, 30, generator=g) for _ in range(2)]
    a = run("dare_ties", base, models, key="a", seed=1, density=0.3)
    assert torch.equal(a, run("dare_ties", base, models, key="a", seed=1, density=0.3))
    b = run("dare_ties", base, models, key="b", seed=1, density=0.3)
    assert not torch.equal(a, b)
    assert not torch.equal(a, run("dare_ties", base, models, key="a", seed=2, density=0.3))
    # key order does not matter: merging b first and a afterwards gives the same a
    run("dare_ties", base, models, key="b", seed=1, density=0.3)
    assert torch.equal(a, run("dare_ties", base, models, key="a", seed=1, density=0.3))
    # model 1's mask does not depend on model 0's density, and grows with its own density
    m1 = lambda d0, d1: run("dare_linear", base, models, key="a", seed=1, density=[d0, d1], weight=[0.0, 1.0],
                            rescale="none") != base
    assert torch.equal(m1(0.3, 0.4), m1(1.0, 0.4))
    small, large = m1(0.5, 0.2), m1(0.5, 0.6)
    assert bool((large | ~small).all()) and int(large.sum()) > int(small.sum())


def test_dare_ties_consensus_off_is_dare_linear():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(100, generator=g)
    models = [base + torch.randn(100, generator=g) for _ in range(3)]
    for normalize in (False, True):
        a = run("dare_ties", base, models, density=0.4, consensus="off", normalize=normalize, weight=[1, 0.5, 2])
        b = run("dare_linear", base, models, density=0.4, normalize=normalize, weight=[1, 0.5, 2])
        assert torch.equal(a, b)


def test_dare_ties_elects_signs_after_dropping():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(500, generator=g)
    models = [base + torch.randn(500, generator=g) for _ in range(3)]
    out = run("dare_ties", base, models, density=0.5, rescale="none", consensus="count")
    dropped = torch.stack([run("dare_linear", base, models, density=0.5, rescale="none",
                               weight=[float(i == j) for j in range(3)]) - base for i in range(3)])
    elected = torch.where(torch.sign(dropped).sum(0) >= 0, 1.0, -1.0)
    close(out - base, (dropped * (torch.sign(dropped) == elected)).sum(0))


def test_della_kept_fraction_follows_rank():
    g = torch.Generator().manual_seed(12)
    base = torch.zeros(200, 400)
    model = torch.randn(200, 400, generator=g)
    d = _delta("della_linear", base, model, density=0.5, epsilon=0.2, rescale="none")
    kept = d != 0
    assert abs(kept.double().mean().item() - 0.5) < 0.01
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[ranks < 40].double().mean().item(), kept[ranks >= 360].double().mean().item()
    # p = 0.3 + 0.4·r/399 averaged over r < 40 and r >= 360
    assert abs(low - 0.3195) < 0.02 and abs(high - 0.6805) < 0.02
    close(d[kept], model[kept], tol=1e-6)
    l1 = _delta("della_linear", base, model, density=0.5, epsilon=0.2)
    close(l1.abs().sum(), model.abs().sum(), tol=1e-5)
    inv = _delta("della_linear", base, model, density=0.5, epsilon=0.2, rescale="inverse_density")
    close(inv, d / ta.della_keep_prob(model, 0.5, 0.2))


def test_della_checks_epsilon_against_density():
    base, models = torch.zeros(8), [torch.ones(8)]
    with pytest.raises(MergeError, match="epsilon"):
        run("della", base, models, density=0.1, epsilon=0.15)
    with pytest.raises(MergeError, match="epsilon"):
        mm.create("della_linear", density=0.9, epsilon=0.2)
    with pytest.raises(MergeError, match="epsilon"):
        run("della_linear", base, models + models, density=[0.5, 0.95], epsilon=[0.1, 0.1])
    # density 0 / 1 skip the rule (as mergekit); touching 0 or 1 is allowed
    close(run("della", base, models, density=0.0), base)
    close(run("della", base, models, density=1.0), models[0])
    assert torch.isfinite(run("della", base, models, density=0.15, epsilon=0.15)).all()


# -- edge cases for every method ------------------------------------------------------------------------

def _extra(name, density):
    kw = {}
    if name in SPARSE:
        kw["density"] = density
    if name.startswith("della") and 0 < density < 1:
        kw["epsilon"] = min(0.1, density, 1 - density)
    return kw


@pytest.mark.parametrize("name", SPARSE)
def test_density_zero_gives_base(name):
    g = torch.Generator().manual_seed(13)
    base = torch.randn(6, 4, generator=g)
    models = [base + torch.randn(6, 4, generator=g) for _ in range(2)]
    close(run(name, base, models, density=0.0), base)


@pytest.mark.parametrize("name", GTA)
@pytest.mark.parametrize("shape", [(), (5,), (4, 3, 3, 3), (0, 3)])
def test_shapes_all_zero_deltas_and_one_model(name, shape):
    g = torch.Generator().manual_seed(14)
    base = torch.randn(shape, generator=g)
    for density in (0.5, 1.0):
        out = run(name, base, [base.clone(), base.clone()], **_extra(name, density))
        close(out, base)  # all-zero task vectors
        models = [base + torch.randn(shape, generator=g) for _ in range(2)]
        out = run(name, base, models, **_extra(name, density))
        assert out.shape == base.shape and torch.isfinite(out).all()
    # one model, density 1, weight 1, no normalization: the model itself
    model = base + torch.randn(shape, generator=g)
    close(run(name, base, [model], normalize=False, **_extra(name, 1.0)), model)


@pytest.mark.parametrize("name", GTA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(name, dtype):
    g = torch.Generator().manual_seed(15)
    base = torch.randn(16, 8, generator=g)
    models = [base + torch.randn(16, 8, generator=g) for _ in range(3)]
    kw = _extra(name, 0.5)
    out = run(name, base.to(dtype), [m.to(dtype) for m in models], **kw)
    assert out.dtype == dtype
    ref = run(name, base.to(dtype).float(), [m.to(dtype).float() for m in models], **kw)
    torch.testing.assert_close(out, ref.to(dtype))


@pytest.mark.parametrize("name", GTA)
def test_weights_summing_to_zero(name):
    g = torch.Generator().manual_seed(16)
    base = torch.randn(20, generator=g)
    models = [base + torch.randn(20, generator=g) for _ in range(2)]
    out = run(name, base, models, weight=[1.0, -1.0], normalize=True, **_extra(name, 1.0))
    assert torch.isfinite(out).all()
    if name in ("task_arithmetic", "dare_linear", "della_linear", "breadcrumbs"):
        close(out, base + (models[0] - models[1]))  # undivided
    else:
        close(out, naive(base, models, [1.0, -1.0], consensus="sum", normalize=True))


@pytest.mark.parametrize("name", GTA)
def test_bad_input_raises(name):
    base = torch.zeros(4)
    models = [torch.ones(4), torch.ones(4)]
    bad = models[0].clone()
    bad[1] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        run(name, base, [models[0], bad])
    with pytest.raises(MergeError, match="shape"):
        run(name, base, [models[0], torch.ones(5)])
    with pytest.raises(MergeError, match="model"):
        run(name, base, [])
    with pytest.raises(MergeError, match="base"):
        run(name, None, models)
    with pytest.raises(MergeError, match="lambda"):
        mm.create(name, **{"lambda": 11.0})
    with pytest.raises(MergeError, match="weight"):
        run(name, base, models, weight=[1.0, 2.0, 3.0])
    if name in SPARSE:
        with pytest.raises(MergeError, match="density"):
            run(name, base, models, density=1.5)
        with pytest.raises(MergeError, match="rescale"):
            mm.create(name, rescale="l2")
    if name.startswith("breadcrumbs"):
        with pytest.raises(MergeError, match="gamma"):
            run(name, base, models, gamma=-0.1)
    if name.startswith("della"):
        with pytest.raises(MergeError, match="epsilon"):
            run(name, base, models, epsilon=0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SPARSE)
def test_cpu_and_cuda_agree(name):
    g = torch.Generator().manual_seed(17)
    base = torch.randn(64, 32, generator=g)
    models = [base + torch.randn(64, 32, generator=g) for _ in range(3)]
    kw = _extra(name, 0.4)
    cpu = run(name, base, models, **kw)
    gpu = run(name, base.cuda(), [m.cuda() for m in models], **kw)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    assert torch.equal(gpu.cpu() != base, cpu != base)


def test_sparsify_direct_call_without_host_values():
    # the public helper also works with a bare context (host values read from the tensors)
    ctx = MergeContext(key="x", seed=3)
    deltas = torch.randn(2, 100, generator=torch.Generator().manual_seed(18))
    out = ta.sparsify_(deltas.clone(), ctx, "magnitude", [0.25, 1.0], "none")
    assert int((out[0] != 0).sum()) == 25
    assert torch.equal(out[1], deltas[1])
