"""The merge_methods API: names, create/merge for every method, recipes, specs as the one source."""
import json

import pytest
import torch

import merge_methods as mm

EXPECTED = {
    # mergekit
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
    "breadcrumbs_ties", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "nearswap",
    "arcee_fusion", "passthrough", "ram", "ramplus_tl",
    # sd-optim / sd-mecha
    "ties_sum_with_dropout", "ties_sum_extended", "multi_domain_alignment", "lowrank_orthogonal_projection",
    "geometric_median",
    # ComfyUI
    "weighted_sum", "add_difference",
    # supermerger / sd-mecha
    "train_difference", "add_perpendicular", "add_opposite", "add_strict_opposite",
    # sd-mecha
    "rotate", "crossover", "add_cosine_a", "add_cosine_b", "tensor_sum", "geometric_sum", "clamp", "truncate_rank",
    "truncate_kronecker", "multiply_quotient", "dropout",
    # supermerger / meh
    "triple_sum", "sum_twice", "weighted_subtraction", "euclidean_add_difference", "multiply_difference",
    "similarity_add_difference", "distribution_crossover", "ties_add_difference", "top_k_tensor_sum",
}


def n_models(spec):
    return spec.max_models if spec.max_models is not None and spec.max_models < 3 else max(3, spec.min_models)


def test_names_cover_every_method():
    assert EXPECTED <= set(mm.names())
    assert mm.names() == sorted(mm.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_create_merge_roundtrip(name):
    spec = mm.get_spec(name)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.1 * torch.randn(6, 5, generator=g)).to(torch.bfloat16) for _ in range(n_models(spec))]
    method = mm.create(name)
    out = method.merge(None if spec.base == "none" else base, models, key="k.weight", seed=3)
    assert out.shape == base.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    again = method.merge(None if spec.base == "none" else base, models, key="k.weight", seed=3)
    assert torch.equal(out, again)
    # a recipe: plain JSON, equal and equally hashed after the round trip
    d = json.loads(json.dumps(method.to_dict()))
    back = mm.from_dict(d)
    assert back == method and hash(back) == hash(method)
    # a shape mismatch is a clear error naming the method
    bad = [torch.randn(2, 2)] * n_models(spec)
    if spec.base == "none":
        bad = [models[0]] + bad[1:]
    if len(bad) > 1 or spec.base != "none":
        with pytest.raises(mm.MergeError, match=f"{name}.*shape mismatch"):
            method.merge(None if spec.base == "none" else base, bad)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_never_writes_into_its_inputs(name, dtype):
    """The engine hands merge() the models' own stored tensors (no copy): no method may modify them,
    whatever their dtype (fp32 inputs are not copied by the dtype conversion)."""
    spec = mm.get_spec(name)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 6, generator=g).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(8, 6, generator=g)).to(dtype) for _ in range(n_models(spec))]
    use_base = spec.base != "none"
    snapshot = [t.clone() for t in [base] + models]
    versions = [t._version for t in [base] + models]
    out = mm.create(name).merge(base if use_base else None, models, key="k.weight", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [base] + models))
    assert [t._version for t in [base] + models] == versions
    assert all(out.data_ptr() != t.data_ptr() for t in [base] + models)


def test_reused_buffers_give_the_same_results_and_never_alias_a_result():
    """merge() inside reuse_buffers() stacks into one buffer reused from call to call: every method gives
    bit-identical results, and a result that was a view of the buffer (passthrough) survives later calls."""
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 6), (3, 4, 2, 2), (5,), (8, 6)]
    cases = []
    for name in sorted(EXPECTED):
        spec = mm.get_spec(name)
        for i, shape in enumerate(shapes):
            base = torch.randn(shape, generator=g)
            models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n_models(spec))]
            cases.append((mm.create(name), None if spec.base == "none" else base, models, f"k{i}"))
    plain = [m.merge(b, xs, key=k, seed=1) for m, b, xs, k in cases]
    with mm.reuse_buffers():
        reused = [m.merge(b, xs, key=k, seed=1) for m, b, xs, k in cases]
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
    assert len({r.untyped_storage().data_ptr() for r in reused}) == len(reused)


def test_transient_random_draws_reuse_one_buffer_and_give_the_same_numbers():
    """Inside reuse_buffers() a transient draw (one the caller is done with before it draws again) fills a
    reused CPU buffer instead of new memory; the numbers are those of a plain draw.  Every randomized method
    gives the same bits inside and outside the block, also on tensors large enough for the sliced and
    streamed paths (over 2**20 entries)."""
    from merge_methods.context import MergeContext
    from merge_methods.spec import _uniform_buffer

    plain = MergeContext(key="a.weight", seed=3).uniform((7, 5))
    with mm.reuse_buffers():
        ctx = MergeContext(key="a.weight", seed=3, workspace=_uniform_buffer)
        first = ctx.uniform((7, 5), transient=True)
        assert torch.equal(first, plain)
        second = ctx.uniform((3, 4), transient=True)
        assert second.data_ptr() == first.data_ptr()                # the same memory, drawn over
        kept = ctx.uniform((3, 4))                                  # not transient: its own tensor
        assert kept.data_ptr() != first.data_ptr()
        again = MergeContext(key="a.weight", seed=3, workspace=_uniform_buffer)
        assert torch.equal(again.uniform((7, 5), transient=True), plain)
    outside = MergeContext(key="a.weight", seed=3, workspace=_uniform_buffer)
    assert torch.equal(outside.uniform((7, 5), transient=True), plain)
    assert outside.uniform((7, 5), transient=True).data_ptr() != first.data_ptr()

    g = torch.Generator().manual_seed(6)
    base = torch.randn(1100, 1000, generator=g)
    models = [base + 0.1 * torch.randn(1100, 1000, generator=g) for _ in range(3)]
    randomized = [s.name for s in mm.all_specs() if s.randomized]
    assert {"dare_ties", "della", "dropout", "ties_sum_with_dropout"} <= set(randomized)
    for name in randomized:
        spec = mm.get_spec(name)
        m, b, xs = mm.create(name), None if spec.base == "none" else base, models[:n_models(spec)]
        kw = {"density": 0.5} if any(p.name == "density" for p in spec.per_model_params) else {}
        ref = [m.merge(b, xs, key=k, seed=2, **kw) for k in ("x.weight", "y.weight")]
        with mm.reuse_buffers():
            got = [m.merge(b, xs, key=k, seed=2, **kw) for k in ("x.weight", "y.weight")]
        assert all(torch.equal(r, o) for r, o in zip(ref, got)), name
        assert not torch.equal(ref[0], ref[1]), name       # each key draws its own numbers


#: methods whose result is not k times their result for inputs scaled by k, by their definition
NOT_HOMOGENEOUS = {
    "arcee_fusion": "a softmax of the squared differences",
    "nearswap": "t is an absolute distance",
    "ram": "epsilon is an absolute magnitude", "ramplus_tl": "epsilon is an absolute magnitude",
}
#: and those that are, but for absolute thresholds that tiny inputs (about 1e-20) fall under
TINY_THRESHOLDS = {
    "slerp": "mergekit's eps on norms", "nuslerp": "mergekit's eps on norms", "multislerp": "mergekit's eps",
    "karcher": "mergekit's tolerance", "geometric_median": "Weiszfeld's eps",
    "crossover": "sd-mecha's allclose (atol 1e-8) lerp rule",
    "rotate": "sd-mecha's fp16 allclose lerp rule",
}


@pytest.mark.parametrize("k", [2.0 ** 64, 2.0 ** -66], ids=["huge", "tiny"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_methods_work_at_any_magnitude(name, k):
    """Scaling every input by k scales the result by k (but for the methods listed with the reason): norms,
    dot products and spectra neither overflow (entries of 2^64 ≈ 1.8e19: their fp32 squares do) nor underflow
    (2^-66 ≈ 1.4e-20)."""
    if name in NOT_HOMOGENEOUS or (k < 1 and name in TINY_THRESHOLDS):
        pytest.skip(NOT_HOMOGENEOUS.get(name) or TINY_THRESHOLDS[name])
    spec = mm.get_spec(name)
    g = torch.Generator().manual_seed(12)
    base = torch.randn(64, 80, generator=g)
    models = [base + 0.3 * torch.randn(64, 80, generator=g) for _ in range(n_models(spec))]
    b = None if spec.base == "none" else base
    m = mm.create(name)
    ref = m.merge(b, models, key="k.weight", seed=1)
    out = m.merge(None if b is None else b * k, [x * k for x in models], key="k.weight", seed=1)
    assert out.isfinite().all()
    # multiply_quotient works in logarithms, whose rounding grows with ln k
    torch.testing.assert_close(out / k, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_immutable_and_validated():
    m = mm.create("ties", **{"lambda": 0.5})
    with pytest.raises(Exception):
        m.name = "linear"
    with pytest.raises(mm.MergeError, match="lambda"):
        mm.create("ties", **{"lambda": "x"})
    with pytest.raises(mm.MergeError, match="density"):
        mm.create("ties").merge(torch.zeros(3), [torch.ones(3)], density=1.5)
    with pytest.raises(mm.MergeError, match="no parameter 'nope'"):
        mm.create("ties", nope=1)
    with pytest.raises(mm.MergeError, match="unknown merge method"):
        mm.create("no_such_method")
    with pytest.raises(mm.MergeError, match="needs a base"):
        mm.create("ties").merge(None, [torch.ones(3)])
    with pytest.raises(mm.MergeError, match="NaN or Inf"):
        mm.create("ties").merge(torch.zeros(3), [torch.tensor([1.0, float("nan"), 0.0])])


def test_per_model_parameters_agree_across_methods():
    """The Merge Input node shows one widget per per-model parameter name: the specs must agree on it."""
    seen = {}
    for spec in mm.all_specs():
        for p in spec.per_model_params:
            if p.name in seen:
                q = seen[p.name]
                assert (p.kind, p.default) == (q.kind, q.default), (spec.name, p.name)
            seen[p.name] = p
    assert {"weight", "density"} <= set(seen)


def test_every_parameter_has_help_and_a_valid_default():
    for spec in mm.all_specs():
        assert spec.help.strip(), spec.name
        for p in spec.params:
            assert p.help.strip(), (spec.name, p.name)
            assert p.coerce(p.default, spec.name) == p.default or p.kind == "int"
