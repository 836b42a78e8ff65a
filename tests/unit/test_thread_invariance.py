"""The same inputs and seed give bit-identical results with 1 and with several CPU threads.

A whole-tensor fp32 sum or dot product is split across threads, and the split changes its rounding: the
L1 rescale of dare / della / ties and model_stock's cosine moved by an ulp or more with the thread count.
They now reduce in fixed 4096-element chunks, added up in fp64.  (Methods built on QR / SVD / FFT are
not covered: their LAPACK / FFT kernels make no such promise.)"""
import pytest
import torch

import merge_methods as mm

CASES = [("dare_ties", {}), ("dare_linear", {}), ("della", {}), ("della_linear", {}), ("ties", {"rescale": "l1"}),
         ("ties", {}), ("model_stock", {}), ("sce", {}), ("task_arithmetic", {}), ("add_perpendicular", {}),
         ("ties_add_difference", {}), ("multiply_quotient", {}), ("dropout", {}), ("dropout", {"overlap": 0.4})]


def _inputs(n=3, size=(600, 700)):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(size, generator=g)
    return base, [base + 0.05 * torch.randn(size, generator=g) for _ in range(n)]


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_bit_identical_with_one_and_several_threads(name, params):
    method = mm.create(name, **params)
    base, models = _inputs()
    models = models[: method.spec.max_models or len(models)]
    kw = {}
    per_model = {p.name for p in method.spec.per_model_params}
    if "density" in per_model:
        kw["density"] = [0.3] * len(models)

    def run():
        return method.merge(base, models, key="diffusion_model.x.weight", seed=11, **kw)

    one = _with_threads(1, run)
    for threads in (2, 3, 4):
        other = _with_threads(threads, run)
        assert torch.equal(one, other), (name, threads, int((one != other).sum()))
