"""The SVD / rank math of LoRA extraction, merge and resize (engine/lora_svd.py): plain torch."""
import math

import pytest
import torch

from engine.lora_svd import (RankError, RankSpec, SVDOptions, choose_rank, exact_quantile, factorize,
                             factorize_product, optimal_rank_error, product_svd, randomized_svd, truncated_svd)


def spectrum_matrix(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.t()).float()


def test_choose_rank_hand_checked():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    sq = 16 + 4 + 1 + 0.25
    assert choose_rank(s, RankSpec("fixed", 3), sq) == 3
    assert choose_rank(s, RankSpec("fixed", 9), sq) == 4                     # capped by the spectrum
    assert choose_rank(s, RankSpec("sv_ratio", 9, 4.0), sq) == 3             # S ≥ 4/4 = 1
    assert choose_rank(s, RankSpec("sv_ratio", 9, 1.0), sq) == 1
    assert choose_rank(s, RankSpec("sv_fro", 9, 0.9), sq) == 2               # 0.81·21.25 = 17.2 ≤ 16+4
    assert choose_rank(s, RankSpec("sv_fro", 9, math.sqrt(16 / sq)), sq) == 1
    assert choose_rank(s, RankSpec("sv_fro", 9, 1.0), sq) == 4
    assert choose_rank(s, RankSpec("sv_cumulative", 9, 0.8), sq, total_sum=7.5) == 2   # 6 ≥ 0.8·7.5
    assert choose_rank(s, RankSpec("sv_cumulative", 9, 0.81), sq, total_sum=7.5) == 3
    assert choose_rank(s, RankSpec("sv_fro", 2, 1.0), sq) == 2               # the maximum caps it
    assert choose_rank(torch.zeros(3), RankSpec("sv_fro", 9, 0.5), 0.0) == 1


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=-3), dict(rank=2.5), dict(mode="sv_ratio", param=0.5),
                                 dict(mode="sv_fro", param=0.0), dict(mode="sv_cumulative", param=1.5),
                                 dict(mode="nope")])
def test_bad_rank_specs_raise(bad):
    with pytest.raises(RankError):
        RankSpec(**{"mode": "fixed", "rank": 4, "param": 1.0, **bad})


def test_rank_above_layer_size_strict_and_capped():
    a = torch.randn(6, 10)
    with pytest.raises(RankError, match="above the size"):
        factorize(a, RankSpec("fixed", 7), strict=True)
    f = factorize(a, RankSpec("fixed", 7))
    assert f.rank == 6 and f.capped and f.rel_error < 1e-5
    assert torch.allclose(f.up @ f.down, a, atol=1e-5)
    with pytest.raises(RankError):
        randomized_svd(a, 0)
    with pytest.raises(RankError):
        truncated_svd(a, 7, SVDOptions())


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])     # tall and wide (transposed sketch)
def test_randomized_svd_recovers_low_rank_and_is_deterministic(shape):
    s = [10.0, 5.0, 3.0, 1.0, 0.5]
    a = spectrum_matrix(*shape, s)
    u, sv, vh = randomized_svd(a, 5, oversample=5, power_iters=1, seed=3)
    assert torch.allclose(sv, torch.tensor(s), rtol=1e-4)
    assert torch.allclose((u * sv) @ vh, a, atol=1e-4)
    assert torch.allclose(u.t() @ u, torch.eye(5), atol=1e-5)
    u2, s2, vh2 = randomized_svd(a, 5, oversample=5, power_iters=1, seed=3)
    assert torch.equal(u, u2) and torch.equal(s2, sv) and torch.equal(vh, vh2)


def test_randomized_error_within_two_percent_of_optimum_on_slow_decay():
    s = [(i + 1) ** -0.5 for i in range(200)]
    a = spectrum_matrix(400, 300, s, seed=1)
    for r in (8, 32):
        f = factorize(a, RankSpec("fixed", r), SVDOptions("randomized", 16, 2), seed=0)
        opt = optimal_rank_error(a, r)
        assert opt <= f.rel_error <= 1.02 * opt
        # the reported error is the real one
        real = float(torch.linalg.norm(a - f.up @ f.down) / torch.linalg.norm(a))
        assert f.rel_error == pytest.approx(real, rel=1e-3)
        full = factorize(a, RankSpec("fixed", r), SVDOptions("full"))
        assert full.rel_error == pytest.approx(opt, rel=1e-4)


def test_factors_split_singular_values_evenly():
    a = spectrum_matrix(50, 40, [9.0, 4.0, 1.0])
    f = factorize(a, RankSpec("fixed", 3), SVDOptions("full"))
    # up = U√S, down = √S·Vh: column norms of up = row norms of down = √S
    assert torch.allclose(f.up.norm(dim=0), torch.tensor([3.0, 2.0, 1.0]), atol=1e-4)
    assert torch.allclose(f.down.norm(dim=1), torch.tensor([3.0, 2.0, 1.0]), atol=1e-4)


def test_dynamic_modes_on_known_spectrum():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    a = spectrum_matrix(60, 50, s)
    total = sum(x * x for x in s)
    f = factorize(a, RankSpec("sv_fro", 6, 0.99))
    kept = math.sqrt(sum(x * x for x in s[:f.rank]) / total)
    assert kept >= 0.99 and math.sqrt(sum(x * x for x in s[:f.rank - 1]) / total) < 0.99
    assert factorize(a, RankSpec("sv_ratio", 6, 10.0)).rank == 4          # S ≥ 0.8
    assert factorize(a, RankSpec("sv_cumulative", 6, 0.9)).rank == 4      # 14/15.75 = 0.889 < 0.9 ≤ 15/15.75
    assert factorize(a, RankSpec("sv_fro", 2, 0.999)).rank == 2


def test_product_svd_is_exact_and_factorize_product_truncates_optimally():
    g = torch.Generator().manual_seed(0)
    up = torch.randn(70, 9, generator=g)
    down = torch.randn(9, 40, generator=g)
    w = up @ down
    u, s, vh = product_svd(up, down)
    assert torch.allclose((u * s) @ vh, w, atol=1e-4)
    assert torch.allclose(s, torch.linalg.svdvals(w)[:9], rtol=1e-4)
    full = factorize_product(up, down, RankSpec("fixed", 9))
    assert full.rel_error < 1e-6 and torch.allclose(full.up @ full.down, w, atol=1e-4)
    f4 = factorize_product(up, down, RankSpec("fixed", 4))
    assert f4.rank == 4
    assert f4.rel_error == pytest.approx(optimal_rank_error(w, 4), rel=1e-4)
    real = float(torch.linalg.norm(w - f4.up @ f4.down) / torch.linalg.norm(w))
    assert real == pytest.approx(f4.rel_error, rel=1e-4)


def test_exact_quantile_matches_torch_and_works_past_16m():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=g)
    for q in (0.0, 0.01, 0.5, 0.99, 0.999, 1.0):
        # torch rounds q·(n−1) in fp32; we do it in double: equal to ~1e-6
        assert float(exact_quantile(x, q)) == pytest.approx(float(torch.quantile(x, q)), abs=1e-5)
    big = torch.arange(17_000_001, dtype=torch.float32).flip(0)      # torch.quantile refuses > 16M elements
    assert float(exact_quantile(big, 0.5)) == 8_500_000.0
    assert float(exact_quantile(big, 0.99)) == pytest.approx(0.99 * 17_000_000, rel=1e-7)


def test_clamp_bounds_factors_and_reports_its_error():
    a = spectrum_matrix(80, 60, [5.0, 1.0, 0.2])
    a[0, 0] += 3.0                                          # an outlier the clamp will cut
    f = factorize(a, RankSpec("fixed", 3), clamp_quantile=0.9)
    hi = exact_quantile(torch.cat([factorize(a, RankSpec("fixed", 3)).up.flatten(),
                                   factorize(a, RankSpec("fixed", 3)).down.flatten()]), 0.9)
    assert float(f.up.max()) <= float(hi) + 1e-6 and float(f.down.min()) >= -float(hi) - 1e-6
    real = float(torch.linalg.norm(a - f.up @ f.down) / torch.linalg.norm(a))
    assert f.rel_error == pytest.approx(real, rel=1e-5)
    assert f.rel_error > factorize(a, RankSpec("fixed", 3)).rel_error
