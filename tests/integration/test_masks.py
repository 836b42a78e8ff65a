"""MODEL_MASK nodes through ComfyUI's executor: maskers, operations, the report, masked merges (the Model
Merger's mask input and the Masked Model Merger), and bad input."""
import importlib

import pytest
import torch

from mergelab import fixtures
from mergelab.harness import api_node

DELTA = 0.02
CPU = torch.device("cpu")


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def small(arch="SD15", delta_seed=0, seed=0):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": arch, "seed": seed, "delta_seed": delta_seed,
                       "delta_scale": DELTA if delta_seed else 0.0, "dtype": "fp32"}}


def cap(src, name, index=0):
    return {"class_type": "MergeLabTest_Capture", "inputs": {"value": [src, index], "name": name}}


_SOURCES = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_sources():
    """Let go of the models read by :func:`read` with this module: held until interpreter exit, ComfyUI's
    ``ModelPatcher.__del__`` runs when its modules are already torn down and prints tracebacks."""
    yield
    _SOURCES.clear()


def read(harness, obj, key):
    """The effective weight of ``key`` (one KeySource per model object: building one walks every key)."""
    src = _SOURCES.get(id(obj))
    if src is None or src[0] is not obj:
        src = _SOURCES[id(obj)] = (obj, pack(harness, "engine.weights").KeySource.of(obj))
    return src[1].read(key, CPU)


def test_mask_nodes_registered(harness):
    import nodes
    ids = ("MergeLab_MagnitudeMasker", "MergeLab_RandomMasker", "MergeLab_BlockMasker", "MergeLab_MaskOperations",
           "MergeLab_MaskReport", "MergeLab_MaskedModelMerger", "MergeLab_NormalizeModel")
    for i in ids:
        assert i in harness.pack_node_ids
        inputs = nodes.NODE_CLASS_MAPPINGS[i].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                assert spec[1].get("tooltip"), (i, name)


def _merge_graph(mask_nodes, with_mask=True):
    """base + two tuned SD1.5 models merged with task arithmetic, optionally through a mask."""
    g = {"base": small(), "m1": small(delta_seed=1), "m2": small(delta_seed=2),
         "in1": api_node("MergeLab_MergeInput", model=["m1", 0]),
         "in2": api_node("MergeLab_MergeInput", model=["m2", 0], models=["in1", 0], weight=0.7),
         "method": api_node("MergeLab_Method_task_arithmetic"),
         **mask_nodes}
    merger = api_node("MergeLab_ModelMerger", base=["base", 0], method=["method", 0], models=["in2", 0], seed=3)
    if with_mask:
        merger["inputs"]["mask"] = ["mask", 0]
    g["merge"] = merger
    g["cap_out"] = cap("merge", "out")
    if with_mask:
        g["cap_mask"] = cap("mask", "mask")
    return g


def test_masked_merge_changes_exactly_the_masked_entries(harness):
    """Model Merger + mask = where(mask, unmasked merge, base), entry by entry; unselected keys = base."""
    masks = {"rand": api_node("MergeLab_RandomMasker", model=["base", 0], density=0.3, seed=11),
             "blocks": api_node("MergeLab_BlockMasker", model=["base", 0], blocks="middle_block.*\nout"),
             "mask": api_node("MergeLab_MaskOperations", mask_a=["rand", 0], mask_b=["blocks", 0], operation="difference")}
    res = harness.run_ok(_merge_graph(masks))
    masked, mask = res.captured["out"], res.captured["mask"]
    plain = harness.run_ok(_merge_graph({}, with_mask=False)).captured["out"]
    base = fixtures.small_model("SD15")
    keys = pack(harness, "engine.weights").KeySource.of(base).keys()
    n_sel = n_changed = 0
    for key in keys:
        sel = mask.dense(key)
        b, m, p = read(harness, base, key), read(harness, masked, key), read(harness, plain, key)
        assert torch.equal(m[sel], p[sel]), key           # the merge result where selected
        assert torch.equal(m[~sel], b[~sel]), key         # exactly the base elsewhere
        n_sel += int(sel.sum())
        n_changed += int((m != b).sum())
        if ".middle_block." in key or key.startswith("diffusion_model.out."):
            assert mask.state(key) == "none" and torch.equal(m, b)   # difference removed those blocks
            # ... and the result holds no patch (no copy, no computation) for a key nothing selects
            assert key not in masked.patches, key
    total = sum(read(harness, base, k).numel() for k in keys)
    assert 0.2 * total < n_sel < 0.3 * total and n_changed > 0.9 * n_sel


def test_masked_merge_of_one_block_patches_only_that_block(harness):
    """A Block Masker selecting `out.` and the Masked Model Merger: the result holds patches for the 4 keys
    of `out.` only (it held a full copy of all 686), with the values of where(mask, merge, A); the merge
    report still covers every block.  A magnitude mask that selects nothing in a key (bits all 0) is
    skipped too."""
    g = {"a": small(), "b": small(delta_seed=3),
         "bm": api_node("MergeLab_BlockMasker", model=["a", 0], blocks="out"),
         "mm": api_node("MergeLab_MaskedModelMerger", model_a=["a", 0], model_b=["b", 0], mask=["bm", 0], ratio=0.25),
         "c1": cap("mm", "out")}
    out = harness.run_ok(g).captured["out"]
    a, b = fixtures.small_model("SD15"), fixtures.small_model("SD15", delta_seed=3, delta_scale=DELTA)
    keys = pack(harness, "engine.weights").KeySource.of(a).keys()
    outs = [k for k in keys if k.startswith("diffusion_model.out.")]
    assert sorted(out.patches) == sorted(outs) and len(outs) == 4
    for key in outs:
        torch.testing.assert_close(read(harness, out, key), 0.25 * read(harness, a, key) + 0.75 * read(harness, b, key))
    masks = pack(harness, "engine.masks")
    eng = pack(harness, "engine.merge")
    mm = pack(harness, "merge_methods")
    rep = pack(harness, "engine.report")
    mask = masks.ModelMask(masks.MaskLayout.of(a), {k: masks._Bits(masks.pack_bits(
        torch.zeros(int(read(harness, a, k).numel()), dtype=torch.bool)) if k not in outs else
        masks.pack_bits(torch.ones(int(read(harness, a, k).numel()), dtype=torch.bool))) for k in keys})
    assert mask.state(keys[0]) == "none" and mask.state(outs[0]) == "all"
    stats = rep.MergeStats(lambda k: k.split(".")[1], ["model 1"], has_base=True)
    res = eng.merge_models(a, [eng.MergeInput(b, {})], mm.create("task_arithmetic"),
                           eng.MergeOptions(device="cpu", mask=mask, stats=stats))
    assert sorted(res.patches) == sorted(outs)
    rows = {r["block"]: r for r in stats.summary()}
    assert rows["input_blocks"]["rel_change_base"] == 0.0 and rows["out"]["rel_change_base"] > 0


def test_masked_model_merger(harness):
    """where(mask, ratio·A + (1 - ratio)·B, A) with a magnitude mask made from the two models."""
    g = {"a": small(), "b": small(delta_seed=3),
         "mask": api_node("MergeLab_MagnitudeMasker", model_a=["b", 0], model_b=["a", 0], quantile=0.8, select="above"),
         "mm": api_node("MergeLab_MaskedModelMerger", model_a=["a", 0], model_b=["b", 0], mask=["mask", 0], ratio=0.25),
         "c1": cap("mm", "out"), "c2": cap("mask", "mask")}
    res = harness.run_ok(g)
    out, mask = res.captured["out"], res.captured["mask"]
    a, b = fixtures.small_model("SD15"), fixtures.small_model("SD15", delta_seed=3, delta_scale=DELTA)
    for key in pack(harness, "engine.weights").KeySource.of(a).keys():
        ta, tb, to = read(harness, a, key), read(harness, b, key), read(harness, out, key)
        sel = mask.dense(key)
        assert torch.equal(to[~sel], ta[~sel]), key
        assert torch.allclose(to[sel], 0.25 * ta[sel] + 0.75 * tb[sel], rtol=1e-6, atol=1e-7), key
        n = ta.numel()
        assert abs(int(sel.sum()) - 0.2 * n) <= 0.5, key          # top 20% of |A - B| in every tensor
    # a ratio outside [0, 1] extrapolates: 1.5·A − 0.5·B inside the mask
    g["mm"]["inputs"]["ratio"] = 1.5
    out = harness.run_ok(g).captured["out"]
    key = next(k for k in out.patches if k.endswith(".weight"))
    ta, tb, to, sel = read(harness, a, key), read(harness, b, key), read(harness, out, key), mask.dense(key)
    assert torch.allclose(to[sel], 1.5 * ta[sel] - 0.5 * tb[sel], rtol=1e-6, atol=1e-7) and sel.any()


@pytest.mark.parametrize("arch", ["SD15", "Flux"])
def test_magnitude_masker_selects_the_requested_fraction(harness, arch):
    q = 0.3
    g = {"a": small(arch), "b": small(arch, delta_seed=4), "c_above": cap("above", "above"), "c_below": cap("below", "below")}
    for select in ("above", "below"):
        g[select] = api_node("MergeLab_MagnitudeMasker", model_a=["b", 0], model_b=["a", 0], quantile=q, select=select,
                         scope="tensor")
    res = harness.run_ok(g)
    a, b = fixtures.small_model(arch), fixtures.small_model(arch, delta_seed=4, delta_scale=DELTA)
    for select in ("above", "below"):
        mask = res.captured[select]
        assert mask.nbytes() <= mask.layout.total / 8 + len(mask.layout.keys)       # bits, not bytes
        for key in mask.layout.keys:
            sel = mask.dense(key)
            n = sel.numel()
            want = q * n if select == "below" else (1 - q) * n
            assert abs(int(sel.sum()) - want) <= 0.5, key             # exact, within one entry
            if 0 < int(sel.sum()) < n:
                d = (read(harness, b, key) - read(harness, a, key)).abs()
                if select == "above":
                    assert float(d[sel].min()) >= float(d[~sel].max()), key
                else:
                    assert float(d[sel].max()) <= float(d[~sel].min()), key


def test_magnitude_masker_whole_model_and_block_scopes(harness):
    g = {"a": small(), "b": small(delta_seed=5),
         "mm": api_node("MergeLab_MagnitudeMasker", model_a=["b", 0], model_b=["a", 0], quantile=0.9, scope="model"),
         "mb": api_node("MergeLab_MagnitudeMasker", model_a=["b", 0], quantile=0.5, select="below", scope="block"),
         "c1": cap("mm", "model"), "c2": cap("mb", "block")}
    res = harness.run_ok(g)
    whole, per_block = res.captured["model"], res.captured["block"]
    sel, total = whole.selected_total()
    assert sel == round(0.1 * total)
    # the 10% largest |A - B| of the whole model: every selected value >= every unselected one
    a, b = fixtures.small_model("SD15"), fixtures.small_model("SD15", delta_seed=5, delta_scale=DELTA)
    lo_sel, hi_unsel = float("inf"), 0.0
    for key in whole.layout.keys:
        d = (read(harness, b, key) - read(harness, a, key)).abs()
        s = whole.dense(key)
        if s.any():
            lo_sel = min(lo_sel, float(d[s].min()))
        if (~s).any():
            hi_unsel = max(hi_unsel, float(d[~s].max()))
    assert lo_sel >= hi_unsel
    for block, s, t in per_block.block_counts():          # |A| below its block's median: half of each block
        assert abs(s - 0.5 * t) <= 0.5, block


def test_mask_report_text_and_image(harness):
    g = {"a": small(),
         "bm": api_node("MergeLab_BlockMasker", model=["a", 0], blocks="input_blocks.4, output_blocks.1*"),
         "rep": api_node("MergeLab_MaskReport", mask=["bm", 0]),
         "c1": cap("rep", "text", 0), "c2": cap("rep", "image", 1), "c3": cap("bm", "names", 1)}
    res = harness.run_ok(g)
    text, image, names = res.captured["text"], res.captured["image"], res.captured["names"]
    assert isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert float(image.std()) > 0.01                                     # something is drawn
    rows = {line.split()[0]: line for line in text.splitlines() if "/" in line and "(" in line}
    assert rows["input_blocks.4."].endswith("(1.0000)") and rows["output_blocks.10."].endswith("(1.0000)")
    assert rows["output_blocks.2."].endswith("(0.0000)") and rows["middle_block.1."].endswith("(0.0000)")
    assert "storage: 0 bytes" in text                                    # whole blocks: constants only
    assert names.splitlines()[0] == "time_embed." and "output_blocks.11." in names.splitlines()
    assert res.outputs["rep"]["text"] == [text]                       # shown on the node too


def test_random_masker_report_fraction(harness):
    g = {"a": small(), "r": api_node("MergeLab_RandomMasker", model=["a", 0], density=0.25, seed=1),
         "rep": api_node("MergeLab_MaskReport", mask=["r", 0]), "c": cap("r", "mask"), "t": cap("rep", "text")}
    res = harness.run_ok(g)
    mask = res.captured["mask"]
    sel, total = mask.selected_total()
    assert abs(sel / total - 0.25) < 0.005 and mask.nbytes() == 0
    again = harness.run_ok(g).captured["mask"]                           # seeded: the same selection
    for key in mask.layout.keys[::50]:
        assert torch.equal(mask.dense(key), again.dense(key))


# -- bad input -----------------------------------------------------------------------------------------
def test_mask_from_another_architecture_is_an_error(harness):
    # through the Masked Model Merger: checked up front
    g = {"a": small("SD15"), "b": small("SD15", delta_seed=1), "x": small("SDXL"),
         "mask": api_node("MergeLab_RandomMasker", model=["x", 0]),
         "mm": api_node("MergeLab_MaskedModelMerger", model_a=["a", 0], model_b=["b", 0], mask=["mask", 0]),
         "c": cap("mm", "out")}
    res = harness.run(g)
    assert not res.success
    err = res.error_text()
    assert "does not fit model_a" in err and "SDXL" in err and "SD15" in err
    # through the Model Merger's mask input
    res = harness.run(_merge_graph({"x": small("SDXL"), "mask": api_node("MergeLab_RandomMasker", model=["x", 0])}))
    assert not res.success
    assert "mask" in res.error_text() and ("no entry for key" in res.error_text() or "shape" in res.error_text())


def test_mask_with_missing_keys_is_an_error(harness):
    """A mask made from FLUX schnell (no guidance_in) used on a FLUX dev merge."""
    g = {"base": small("Flux"), "m1": small("Flux", delta_seed=1),
         "s": small("FluxSchnell"),
         "mask": api_node("MergeLab_RandomMasker", model=["s", 0]),
         "in1": api_node("MergeLab_MergeInput", model=["m1", 0]),
         "method": api_node("MergeLab_Method_task_arithmetic"),
         "merge": api_node("MergeLab_ModelMerger", base=["base", 0], method=["method", 0], models=["in1", 0],
                       mask=["mask", 0]),
         "c": cap("merge", "out")}
    res = harness.run(g)
    assert not res.success
    assert "no entry for key 'diffusion_model.guidance_in" in res.error_text()


def test_mask_operation_between_different_models_is_an_error(harness):
    g = {"a": small("SD15"), "x": small("SDXL"),
         "m1": api_node("MergeLab_RandomMasker", model=["a", 0]), "m2": api_node("MergeLab_RandomMasker", model=["x", 0]),
         "op": api_node("MergeLab_MaskOperations", mask_a=["m1", 0], mask_b=["m2", 0], operation="union"),
         "c": cap("op", "m")}
    res = harness.run(g)
    assert not res.success and "made for different models" in res.error_text()
    g["op"] = api_node("MergeLab_MaskOperations", mask_a=["m1", 0], operation="xor")
    res = harness.run(g)
    assert not res.success and "needs two masks" in res.error_text()
    assert res.node_errors, "refused at validation, before the masks are computed"
    g["op"]["inputs"]["operation"] = "Union"
    res = harness.run(g)
    assert not res.success and res.node_errors and "'Union' is not one of" in res.error_text()
    g["op"]["inputs"]["operation"] = "invert"        # needs only mask_a
    harness.run_ok({k: g[k] for k in ("a", "m1", "op", "c")})


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_quantile_outside_unit_interval(harness, q):
    g = {"a": small(), "mask": api_node("MergeLab_MagnitudeMasker", model_a=["a", 0], quantile=q), "c": cap("mask", "m")}
    res = harness.run(g)
    assert not res.success and "quantile" in res.error_text()       # rejected by ComfyUI's validation
    M = pack(harness, "engine.masks")
    with pytest.raises(M.MaskError, match=r"quantile must be within \[0, 1\]"):
        M.magnitude_mask(M.MaskLayout.of(fixtures.small_model("SD15")),
                         M.model_reader(fixtures.small_model("SD15"), CPU), None, q)


def test_block_masker_unknown_block(harness):
    g = {"a": small(), "bm": api_node("MergeLab_BlockMasker", model=["a", 0], blocks="input_blocks.40"),
         "c": cap("bm", "m")}
    res = harness.run(g)
    assert not res.success
    assert "matches no block" in res.error_text() and "middle_block.1." in res.error_text()


def test_sdxl_size_masks_stay_light(harness):
    """On the full-size SDXL key set (2.57 B parameters, meta shapes): random and block masks and every
    operation between them store nothing; packed bits are 1/8 byte per parameter (measured on real
    values by benchmarks/bench_masks.py)."""
    M = pack(harness, "engine.masks")
    shapes = fixtures.meta_unet_shapes("SDXL")
    layout = M.MaskLayout("SDXL:SDXL", list(shapes), [tuple(s) for s in shapes.values()])
    assert layout.total > 2.5e9
    r = M.random_mask(layout, 0.3, 1)
    b = M.block_mask(layout, ["output_blocks.*", "middle_block.*"])
    for m in (r, b, r.union(b), r.difference(b), r.intersection(b), r.xor(b), r.invert(), b.invert().xor(r)):
        assert m.nbytes() == 0
    k_out = next(k for k in layout.keys if ".output_blocks." in k and k.endswith(".weight"))
    k_in = next(k for k in layout.keys if ".input_blocks.4." in k and k.endswith(".weight"))
    assert r.union(b).state(k_out) == "all" and r.union(b).selection(k_out, shapes[k_out], CPU) is None
    assert torch.equal(r.union(b).dense(k_in), r.dense(k_in))
    assert torch.equal(r.xor(b).dense(k_out), ~r.dense(k_out))


def test_mask_chart_title_is_wrapped_not_cut(harness):
    """A chained mask's description (its chart title) was cut at 110 characters, so the title described
    another mask; it is now wrapped over as many lines as it needs."""
    mn = pack(harness, "nodes.mask_nodes")
    rows = [("input_blocks.1.", 3, 10), ("out.", 0, 4)]
    label = "(((blocks input_blocks.4) and (random density 0.3 seed 2)) or (|A - B| above quantile 0.9 per " \
            "tensor)) xor (random density 0.3 seed 1)"
    short, long_ = mn.bar_chart(rows, "a mask"), mn.bar_chart(rows, label)
    assert long_.shape[2] == short.shape[2] and long_.shape[1] >= short.shape[1] + 12     # one more line
    n_lines = (long_.shape[1] - short.shape[1]) // 12 + 1
    dark = long_[0].mean(dim=-1) < 0.5
    for i in range(n_lines):            # every title line holds text (a cut title leaves the last ones blank)
        assert int(dark[6 + 12 * i:6 + 12 * i + 11].sum()) > 20, i


def test_mask_nodes_check_cancel_themselves(harness):
    """Mask Operations (like the other mask nodes and Normalize Model) noticed Cancel only through the host's
    progress hook; under a host whose hook does not check it (the workflow runner's did not) it combined
    every key after Cancel.  Now each progress step checks it."""
    import comfy.model_management as mm
    import comfy.utils
    from comfy_execution.utils import get_executing_context
    seen = []

    def hook(value, total, preview, node_id=None, **kw):        # a host hook that does not check Cancel
        ctx = get_executing_context()
        if ctx is not None and ctx.node_id == "op":
            seen.append(value)
            if len(seen) == 1:
                mm.interrupt_current_processing(True)
    g = {"a": small(), "r1": api_node("MergeLab_RandomMasker", model=["a", 0], density=0.5, seed=1),
         "r2": api_node("MergeLab_RandomMasker", model=["a", 0], density=0.3, seed=2),
         "op": api_node("MergeLab_MaskOperations", mask_a=["r1", 0], mask_b=["r2", 0], operation="xor"),
         "c": cap("op", "m")}
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        res = harness.run(g)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert not res.success and any(e == "execution_interrupted" for e, _ in res.messages)
    assert len(seen) == 1
