"""merge_methods.ops: exact top-k masks, sign consensus, norm rescaling."""
import pytest
import torch

from merge_methods import ops


@pytest.mark.parametrize("k", [0, 1, 5, 17, 99, 100, 150, -3])
def test_topk_mask_exact_count_and_order(k):
    x = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    m = ops.topk_mask(x, k)
    assert m.shape == x.shape and m.dtype == torch.bool
    want = min(max(k, 0), x.numel())
    assert int(m.sum()) == want
    if 0 < want < x.numel():
        assert x[m].min() > x[~m].max()
        ref = torch.zeros(100, dtype=torch.bool)
        ref[torch.argsort(x.flatten(), descending=True)[:want]] = True
        assert torch.equal(m.flatten(), ref)


def test_topk_mask_ties_broken_by_index():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    # 3, 3 then the first two of the three 2s
    assert ops.topk_mask(x, 4).tolist() == [False, True, True, True, True, False, False]
    assert ops.topk_mask(torch.zeros(6), 2).tolist() == [True, True, False, False, False, False]
    # bottomk: smallest (0, 1), then the first of the 2s by index
    assert ops.bottomk_mask(x, 3).tolist() == [True, False, True, False, False, False, True]


def test_topk_mask_is_nested():
    x = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(1)).float()
    prev = ops.topk_mask(x, 0)
    for k in range(1, 201, 7):
        cur = ops.topk_mask(x, k)
        assert bool((cur | ~prev).all()) and int(cur.sum()) == k
        prev = cur


def test_topk_mask_0d_and_beyond_quantile_limit():
    assert ops.topk_mask(torch.tensor(2.0), 1).item() is True
    assert ops.topk_mask(torch.tensor(2.0), 0).item() is False
    # torch.quantile refuses more than 16M elements; top-k must stay exact there
    n = (1 << 24) + 5
    x = torch.arange(n, dtype=torch.float32).remainder_(1000.0)
    k = 123_457
    m = ops.topk_mask(x, k)
    assert int(m.sum()) == k
    # n = 16777·1000 + 221: values 999..993 occur 16777 times each (117439 entries), so the
    # remaining 6018 come from the 992s, the lowest indices first (992, 1992, ...)
    assert bool(m[x >= 993].all()) and not bool(m[x < 992].any())
    tied = torch.nonzero(x == 992).flatten()
    assert bool(m[tied[:6018]].all()) and not bool(m[tied[6018:]].any())


def test_sign_consensus_modes():
    w = torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0],
                      [1.0, 1.0, -2.0, 0.0, 3.0],
                      [-5.0, -1.0, 0.0, 0.0, 0.0]])
    # sum: column sums -3, 1, 0, 0, 3 -> -, +, + (tie), + (tie), +
    s = ops.sign_consensus(w, "sum")
    assert s.tolist() == [[False, True, True, False, False],
                          [False, True, False, False, True],
                          [True, False, False, False, False]]
    # count: sign sums 1, 1, 0, 0, 1 -> all +
    c = ops.sign_consensus(w, "count")
    assert c.tolist() == [[True, True, True, False, False],
                          [True, True, False, False, True],
                          [False, False, False, False, False]]
    with pytest.raises(ValueError):
        ops.sign_consensus(w, "median")


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_rescale_to_norm(norm):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g)
    masked = x * (torch.rand(3, 40, generator=g) < 0.3)
    masked[2] = 0  # a slice whose masked norm is 0 stays unscaled (zero)
    out = ops.rescale_to_norm(x, masked, norm)
    f = {"l1": lambda t: t.abs().sum(-1), "l2": lambda t: t.norm(dim=-1), "linf": lambda t: t.abs().amax(-1)}[norm]
    torch.testing.assert_close(f(out[:2]), f(x[:2]))
    assert torch.equal(out[2], torch.zeros(40))
    # only a rescale of the kept entries
    torch.testing.assert_close(out[:2] / f(out[:2]).unsqueeze(-1), masked[:2] / f(masked[:2]).unsqueeze(-1))
    with pytest.raises(ValueError):
        ops.rescale_to_norm(x, masked, "l3")


def test_rescale_to_norm_dim_and_stacked_scalars():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # along dim 0: column norms 4 and 6 matched by 1 and 4
    torch.testing.assert_close(ops.rescale_to_norm(x, m, "l1", dim=0), torch.tensor([[4.0, 0.0], [0.0, 6.0]]))
    # a stack of 0-d tensors (N,) is N separate slices: a kept scalar keeps its value
    s = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(ops.rescale_to_norm(s, s * torch.tensor([1.0, 0.0, 1.0])), torch.tensor([1.0, 0, 3]))
    # small norms (< eps) are left unscaled
    tiny = torch.full((1, 4), 1e-9)
    assert torch.equal(ops.rescale_to_norm(tiny, tiny * torch.tensor([1.0, 0, 0, 0])),
                       tiny * torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("n", [100_000, 600_000])
@pytest.mark.parametrize("kind", ["randn", "sorted", "reversed", "constant", "few_values", "mostly_zero"])
def test_kth_largest_exact_on_large_and_adversarial_inputs(kind, n):
    """The sample-bracketed selection equals the k-th largest of the sorted values on tensors big enough to
    take that path (the smallest sample, a sample of n/32, and the smaller sample used on samples), also
    where the bracket misses (the ends of sorted tensors)."""
    from merge_methods.ops import kth_largest
    assert ops.sample_stride(n) is not None
    g = torch.Generator().manual_seed(3)
    x = {"randn": lambda: torch.randn(n, generator=g).abs(),
         "sorted": lambda: torch.sort(torch.randn(n, generator=g)).values,
         "reversed": lambda: torch.sort(torch.randn(n, generator=g), descending=True).values,
         "constant": lambda: torch.full((n,), 0.5),
         "few_values": lambda: torch.randint(0, 4, (n,), generator=g).float(),
         "mostly_zero": lambda: torch.cat([torch.zeros(n - 1000), torch.randn(1000, generator=g)]).abs()}[kind]()
    ascending = torch.sort(x).values        # (kthvalue itself is quadratic on descending values)
    for k in (1, 7, n // 1000, n // 5, n // 2, n - 3, n):
        ref = ascending[n - k]
        assert kth_largest(x, k) == ref, (kind, k)
        assert kth_largest(x, k, 1 << 12) == ref, (kind, k)         # a smaller sample (of a sample, say)
        assert int(ops.topk_mask(x, k).sum()) == k


@pytest.mark.parametrize("k_of_n", [lambda n: 1, lambda n: 2, lambda n: 40, lambda n: n - 40, lambda n: n - 1,
                                    lambda n: n])
def test_kth_largest_near_the_ends_needs_no_sort(k_of_n, monkeypatch):
    """Near an end of the order the sampled bracket reaches past the sample's extreme; the tensor's own
    min / max bound the answer there, so random data never takes the sorting fallback."""
    from merge_methods import ops as ops_mod
    n = 600_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    ascending = torch.sort(x).values
    k = k_of_n(n)

    def no_sort(*a, **kw):
        raise AssertionError("sorted")
    monkeypatch.setattr(ops_mod.torch, "sort", no_sort)
    assert ops_mod.kth_largest(x, k) == ascending[n - k]


@pytest.mark.parametrize("k_of_n", [lambda n: 1, lambda n: 3, lambda n: n - 3, lambda n: n - 1])
def test_cut_search_near_the_ends_finds_the_cut(k_of_n):
    """CutSearch with a bracket reaching past the sample's extremes still finds the exact cut (no fallback),
    and still reports an infinite entry."""
    n = 600_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    k = k_of_n(n)
    stride = ops.sample_stride(n)
    spans = [(0, n // 3), (n // 3, n)]
    search = ops.CutSearch(n, k, x[::stride].abs())
    assert all([search.scan(x[s:e]) for s, e in spans])
    cut = search.result()
    assert cut is not None
    out = x.clone()
    for i, (s, e) in enumerate(spans):
        cut.prune_(out[s:e], i)
    assert torch.equal(out, x * ops.topk_mask(x.abs(), k))
    bad = x.clone()
    bad[n // 2] = float("inf")
    search = ops.CutSearch(n, k, x[::stride].abs())
    assert not all([search.scan(bad[s:e]) for s, e in spans])


@pytest.mark.parametrize("magnitude", [2.0 ** 70, 2.0 ** -75, 1.0])
def test_sums_of_squares_and_dot_products_at_any_magnitude(magnitude):
    """fp32 squares and products overflow for entries over about 1e19 and underflow under about 1e-19: the
    fp64 results are still those of the exact arithmetic to fp32 rounding (each chunk's norm is an fp32 value)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 10000, generator=g)
    y = torch.randn(3, 10000, generator=g)
    want_rows = x.double().square().sum(dim=1) * magnitude ** 2
    torch.testing.assert_close(ops.sumsq_rows(x * magnitude), want_rows, rtol=5e-7, atol=0)
    torch.testing.assert_close(ops.sumsq(x[0] * magnitude), want_rows[0], rtol=5e-7, atol=0)
    want_dot = (x[0].double() * y[0].double()).sum() * magnitude ** 2
    scale = x[0].double().norm() * y[0].double().norm() * magnitude ** 2     # (random vectors: the dot cancels)
    assert abs(ops.dot64(x[0] * magnitude, y[0] * magnitude) - want_dot) <= 1e-7 * scale
    # one row huge, one row tiny, one row zero: each is right
    mixed = torch.stack([x[0] * 2.0 ** 70, x[1] * 2.0 ** -75, torch.zeros(10000)])
    want = torch.stack([want_rows[0] / magnitude ** 2 * 2.0 ** 140, want_rows[1] / magnitude ** 2 * 2.0 ** -150,
                        torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(ops.sumsq_rows(mixed), want, rtol=5e-7, atol=0)
    assert ops.dot64(torch.zeros(5), torch.ones(5)) == 0
    inf = torch.tensor([1.0, float("inf")])
    assert ops.sumsq(inf) == float("inf") and ops.dot64(inf, -inf) == float("-inf")
