"""linear: weighted average, normalization, edge cases."""
import pytest
import torch

import merge_methods as mm
from merge_methods import MergeError


def lin(models, normalize=True, **pm):
    return mm.create("linear", normalize=normalize).merge(None, models, **pm)


def test_weighted_average_by_hand():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(lin([a, b, c], weight=[1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(lin([a, b, c], normalize=False, weight=[1.0, 1.0, 2.0]), torch.tensor([4.0, 8.0]))
    torch.testing.assert_close(lin([a, b]), torch.tensor([2.0, 0.0]))  # default weights 1, normalize on
    # normalization makes the result invariant to a common scale of the weights
    torch.testing.assert_close(lin([a, b, c], weight=[0.5, 0.5, 1.0]), lin([a, b, c], weight=[2.0, 2.0, 4.0]))


def test_weights_summing_to_zero_are_left_undivided():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    out = lin([a, b], weight=[1.0, -1.0])
    torch.testing.assert_close(out, a - b)


@pytest.mark.parametrize("shape", [(), (7,), (4, 3, 3, 3)])
def test_shapes_and_one_model(shape):
    g = torch.Generator().manual_seed(1)
    ms = [torch.randn(shape, generator=g) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    torch.testing.assert_close(lin(ms, weight=w), sum(x * m for x, m in zip(w, ms)))
    torch.testing.assert_close(lin(ms[:1], weight=[0.4]), ms[0])
    torch.testing.assert_close(lin(ms[:1], normalize=False, weight=[0.4]), ms[0] * 0.4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    g = torch.Generator().manual_seed(2)
    ms = [torch.randn(16, generator=g).to(dtype) for _ in range(2)]
    out = lin(ms, weight=[0.3, 0.7])
    assert out.dtype == dtype
    torch.testing.assert_close(out, (ms[0].float() * 0.3 + ms[1].float() * 0.7).to(dtype))


def test_bad_input():
    a, b = torch.ones(3), torch.zeros(3)
    with pytest.raises(MergeError, match="base"):
        mm.create("linear").merge(a, [a, b])
    with pytest.raises(MergeError, match="shape"):
        lin([a, torch.zeros(4)])
    with pytest.raises(MergeError, match="model"):
        lin([])
    with pytest.raises(MergeError, match="weight"):
        lin([a, b], weight=[1.0])
    with pytest.raises(MergeError, match="weight"):
        lin([a, b], weight=[1.0, 20.0])
    bad = a.clone()
    bad[0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        lin([bad, b])
