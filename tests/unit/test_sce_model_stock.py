"""sce and model_stock: hand-checked values, an independent fp64 reference, invariants, edge cases."""
import itertools
import math

import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def sce(base, models, **kw):
    return mm.create("sce", **kw).merge(base, models)


def stock(base, models, **kw):
    return mm.create("model_stock", **kw).merge(base, models)


# -- SCE -------------------------------------------------------------------------------------------------

def naive_sce(base, models, topk=1.0):
    """fp64, element by element where it matters (selection by sorting, votes by loops)."""
    b = base.double().flatten()
    tv = [m.double().flatten() - b for m in models]
    n, size = len(tv), b.numel()
    if topk < 1:
        var = [sum((t[j] - sum(u[j] for u in tv) / n) ** 2 for t in tv) / n for j in range(size)]
        nz = sum(1 for v in var if v != 0)
        k = int(nz * topk)
        keep = set(sorted(range(size), key=lambda j: (-var[j], j))[:k])
        tv = [torch.tensor([t[j] if j in keep else 0.0 for j in range(size)], dtype=torch.float64) for t in tv]
    s = [float((t ** 2).mean()) if size else 0.0 for t in tv]
    total = sum(s)
    s = [x / total for x in s] if total > 0 else [1.0 / n] * n
    out = []
    for j in range(size):
        vals = [float(t[j]) for t in tv]
        elected = 1 if sum(vals) >= 0 else -1
        agree = [(v > 0) - (v < 0) == elected for v in vals]
        num = sum(v * w for v, w, a in zip(vals, s, agree) if a)
        den = max(sum(w for w, a in zip(s, agree) if a), 1e-6)
        out.append(float(b[j]) + num / den)
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


def test_sce_by_hand():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -2.0, -1.0])]
    # signs by sum: +, + (0 ties to +), -; weights mean(δ²): 2 and 14/3 -> 0.3 and 0.7
    close(sce(base, models), torch.tensor([1 * 0.3 + 3 * 0.7, 2.0, -1.0]))
    # variances 1, 4, 0: 2 non-zero, select_topk 0.5 keeps only entry 1 -> deltas [0,2,0], [0,-2,0]
    # vote ties to +, only model 1 agrees
    close(sce(base, models, select_topk=0.5), torch.tensor([0.0, 2.0, 0.0]))


@pytest.mark.parametrize("trial", range(8))
def test_sce_matches_naive_reference(trial):
    g = torch.Generator().manual_seed(trial)
    shape = [(9,), (4, 5), (2, 3, 2, 2), ()][trial % 4]
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * (i + 1) for i in range(1 + trial % 3)]
    for topk in (1.0, 0.7, 0.3, 0.0):
        close(sce(base, models, select_topk=topk), naive_sce(base, models, topk))


def test_sce_scale_equivariance_for_small_deltas():
    # mergekit makes the model weights uniform when Σ mean(δ²) < 1e-6; we weight at any scale
    g = torch.Generator().manual_seed(20)
    base = torch.randn(50, generator=g)
    tv = [torch.randn(50, generator=g) * s for s in (1.0, 3.0)]
    big = sce(torch.zeros(50), tv) - 0
    small = sce(base, [base + t * 1e-4 for t in tv]) - base
    torch.testing.assert_close(small, big * 1e-4, rtol=2e-3, atol=1e-9)


def test_sce_edge_cases():
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(21))
    model = base + 1.0
    close(sce(base, [model]), model)  # one model: its own weight cancels
    close(sce(base, [model], select_topk=0.5), base)  # one model has zero variance everywhere
    close(sce(base, [base.clone(), base.clone()]), base)  # all-zero task vectors
    close(sce(base, [model, model + 1], select_topk=0.0), base)
    empty = torch.zeros(0, 3)
    for topk in (1.0, 0.5):
        assert sce(empty, [empty, empty], select_topk=topk).shape == (0, 3)
    for dtype in (torch.float16, torch.bfloat16):
        out = sce(base.to(dtype), [model.to(dtype), (model * 2).to(dtype)])
        assert out.dtype == dtype
        torch.testing.assert_close(out, sce(base.to(dtype).float(), [model.to(dtype).float(),
                                                                      (model * 2).to(dtype).float()]).to(dtype))
    with pytest.raises(MergeError, match="select_topk"):
        mm.create("sce", select_topk=1.5)
    with pytest.raises(MergeError, match="base"):
        sce(None, [model])
    with pytest.raises(MergeError, match="shape"):
        sce(base, [model, torch.zeros(3)])
    bad = model.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN or Inf"):
        sce(base, [bad])
    with pytest.raises(MergeError, match="model"):
        sce(base, [])
    assert "weight" not in {p.name for p in mm.get_spec("sce").params}


# -- Model Stock -----------------------------------------------------------------------------------------

def naive_stock(base, models, filter_wise=False):
    b = base.double()
    ms = [m.double() for m in models]
    n = len(ms)
    if filter_wise and b.dim() >= 1:
        rows_b = b.reshape(-1, b.shape[-1])
        rows_m = [m.reshape(-1, b.shape[-1]) for m in ms]
        out = torch.stack([naive_stock(rows_b[r], [m[r] for m in rows_m]) for r in range(rows_b.shape[0])])
        return out.view(b.shape)
    off = [(m - b).flatten() for m in ms]
    cos = []
    for i, j in itertools.combinations(range(n), 2):
        na, nb = math.sqrt(float(off[i] @ off[i])), math.sqrt(float(off[j] @ off[j]))
        c = float(off[i] @ off[j]) / (na * nb) if na * nb > 0 else 0.0
        cos.append(max(-1.0, min(1.0, c)))
    c = sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return t * sum(ms) / n + (1 - t) * b


def test_model_stock_by_hand():
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0 -> t 0 -> base
    close(stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]), base)
    # cos 1/√2: t = 2c/(1 + c)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]), torch.tensor([t, t / 2]))
    # identical task vectors: cos 1, t 1 -> the mean (= the model)
    m = torch.tensor([0.3, -2.0])
    close(stock(base, [m, m.clone(), m.clone()]), m)
    # opposite task vectors, N = 2: 1 + cos = 0 is singular -> base
    close(stock(base, [m, -m]), base)


@pytest.mark.parametrize("trial", range(6))
def test_model_stock_matches_naive_reference(trial):
    g = torch.Generator().manual_seed(30 + trial)
    shape = [(12,), (5, 4), (3, 2, 3, 3)][trial % 3]
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    models = [base + common + 0.7 * torch.randn(shape, generator=g) for _ in range(2 + trial % 3)]
    for fw in (False, True):
        close(stock(base, models, filter_wise=fw), naive_stock(base, models, fw))


def test_model_stock_filter_wise_is_per_row():
    g = torch.Generator().manual_seed(40)
    base = torch.randn(3, 7, generator=g)
    models = [base + torch.randn(3, 7, generator=g) for _ in range(3)]
    out = stock(base, models, filter_wise=True)
    for r in range(3):
        close(out[r], stock(base[r], [m[r] for m in models]))
    # 1-d tensors: filter-wise is the whole vector
    close(stock(base[0], [m[0] for m in models], filter_wise=True), stock(base[0], [m[0] for m in models]))


def test_model_stock_scale_equivariance_for_small_deltas():
    # mergekit clamps ‖a‖‖b‖ at 1e-6, shrinking the cosine (and t) of tiny task vectors toward 0
    g = torch.Generator().manual_seed(41)
    common = torch.randn(30, generator=g)
    tv = [common + torch.randn(30, generator=g) for _ in range(3)]
    big = stock(torch.zeros(30), tv)
    small = stock(torch.zeros(30), [t * 1e-5 for t in tv])
    torch.testing.assert_close(small, big * 1e-5, rtol=1e-4, atol=1e-12)


def test_model_stock_edge_cases():
    g = torch.Generator().manual_seed(42)
    base = torch.randn(4, generator=g)
    models = [base + torch.randn(4, generator=g) for _ in range(2)]
    close(stock(base, [base.clone(), base.clone()]), base)  # zero task vectors -> cos 0 -> base
    b0 = torch.tensor(1.5)
    out = stock(b0, [torch.tensor(2.0), torch.tensor(3.0)])  # 0-d: cos 1, t 1 -> mean
    close(out, torch.tensor(2.5))
    close(stock(b0, [torch.tensor(2.0), torch.tensor(3.0)], filter_wise=True), torch.tensor(2.5))
    empty = torch.zeros(0, 3)
    for fw in (False, True):
        assert stock(empty, [empty, empty], filter_wise=fw).shape == (0, 3)
    for dtype in (torch.float16, torch.bfloat16):
        out = stock(base.to(dtype), [m.to(dtype) for m in models])
        assert out.dtype == dtype
    with pytest.raises(MergeError, match="model"):
        stock(base, models[:1])
    with pytest.raises(MergeError, match="base"):
        stock(None, models)
    with pytest.raises(MergeError, match="shape"):
        stock(base, [models[0], torch.zeros(5)])
    bad = models[0].clone()
    bad[2] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        stock(base, [bad, models[1]])
    with pytest.raises(MergeError, match="filter_wise"):
        mm.create("model_stock", filter_wise="maybe")


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sce_variance_is_zero_where_the_models_agree(n):
    """sce keeps the top select_topk of the entries with non-zero variance across models: where every
    model has the same task vector the variance must be exactly 0 (as torch.var gives), also for 3 or 5
    models, whose mean of equal values is not always that value.  Elsewhere it is torch.var's."""
    from merge_methods.sce import _variance
    g = torch.Generator().manual_seed(n)
    same = torch.randn(50000, generator=g).expand(n, -1)
    differ = torch.randn(n, 50000, generator=g)
    v = _variance(torch.cat([same, differ], dim=1))
    assert int(torch.count_nonzero(v[:50000])) == 0
    torch.testing.assert_close(v[50000:], differ.var(dim=0, unbiased=False), rtol=1e-5, atol=1e-7)
