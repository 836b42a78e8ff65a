"""Values an API prompt (or a script) can give that the widgets would not: refused with a message that
names the input, before anything upstream runs where the value alone says it is wrong.  Through ComfyUI's
validate_prompt and executor."""
import pytest

from mergelab.harness import api_node


def small(delta_seed=0):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": "SD15", "seed": 0, "delta_seed": delta_seed, "delta_scale": 0.02 if delta_seed else 0.0,
                       "dtype": "fp32"}}


def merge_graph(method="MergeLab_Method_linear", method_inputs=None, merger=None, per_model=None):
    per_model = per_model or [{}, {}]
    g = {"b": small(), "x1": small(1), "x2": small(2),
         "i1": api_node("MergeLab_MergeInput", model=["x1", 0], **per_model[0]),
         "i2": api_node("MergeLab_MergeInput", model=["x2", 0], models=["i1", 0], **per_model[1]),
         "m": api_node(method, **(method_inputs or {})),
         "merge": api_node("MergeLab_ModelMerger", method=["m", 0], models=["i2", 0], base=["b", 0], **(merger or {})),
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["merge", 0], "name": "out"}}}
    return g


@pytest.mark.parametrize("field,value", [("device", "cuda"), ("device", "GPU"), ("compute_dtype", "float64"),
                                         ("on_mismatch", "Skip")])
def test_a_combo_value_that_is_not_an_option_is_an_error(harness, field, value):
    """ComfyUI 0.3.75 does not check V3 combo values: 'cuda' ran on the CPU, 'float64' in fp32 and 'Skip' as
    'error', silently."""
    res = harness.run(merge_graph(merger={field: value}))
    assert not res.success
    assert f"{field} must be one of" in res.error_text() and repr(value) in res.error_text()


def test_della_density_epsilon_rule_is_checked_before_the_first_key(harness, monkeypatch):
    """della's density ± epsilon ∈ [0, 1] was checked per key, so the merge failed only when it reached the
    first key (after loading and reading); now before any key is read."""
    eng = __import__(f"{harness.pack_module_name}.engine.weights", fromlist=["KeySource"])
    reads = []
    real = eng.KeySource.read
    monkeypatch.setattr(eng.KeySource, "read", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    res = harness.run(merge_graph("MergeLab_Method_della", per_model=[{"density": 0.2, "epsilon": 0.3},
                                                                       {"density": 0.5, "epsilon": 0.1}]))
    assert not res.success
    assert "density ± epsilon must lie in [0, 1] (model 1: density 0.2, epsilon 0.3)" in res.error_text()
    assert reads == []


@pytest.mark.parametrize("node", ["MergeLab_BlockWeights_SD1", "MergeLab_BlockWeightsMBW", "MergeLab_BlockRules"])
@pytest.mark.parametrize("models,message", [("1.5", "is not a model number"),
                                            ("1-99999999999999", "a merger takes at most 64 models")])
def test_block_weights_models_are_checked_at_validation(harness, node, models, message):
    """A bad 'models' on the per-architecture nodes failed only at execution (after the merge's inputs had
    run), and a huge range ran out of memory (MemoryError with no message) or took GBs."""
    inputs = {"arch": "SD1", "mbw": "0.5"} if node == "MergeLab_BlockWeightsMBW" else {}
    g = merge_graph()
    g["bw"] = api_node(node, models=models, **inputs)
    g["merge"]["inputs"]["block_weights"] = ["bw", 0]
    res = harness.run(g)
    assert not res.success
    assert res.node_errors, "refused at validation, before anything ran"
    assert message in res.error_text()


@pytest.mark.parametrize("mode,param,message", [("sv_ratio", 0.9, "sv_ratio needs a ratio ≥ 1"),
                                                ("sv_fro", 1000.0, "sv_fro needs a fraction in (0, 1]")])
def test_rank_param_out_of_its_modes_range_is_refused_at_validation(harness, mode, param, message):
    g = {"a": small(1), "b": small(),
         "x": api_node("MergeLab_ExtractLoRA", tuned_model=["a", 0], base_model=["b", 0], rank_mode=mode,
                       rank_param=param),
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "lora"}}}
    res = harness.run(g)
    assert not res.success and res.node_errors
    assert message in res.error_text()


def test_range_checks_stay_on_for_nodes_with_their_own_validation(harness):
    """A validate_inputs that takes **kwargs (or names an input) switches off ComfyUI's own min / max / option
    checks for those inputs: clamp_quantile 3, oversample -5 or a block factor of 1e6 went through validation.
    Ours name only the inputs they check, so ComfyUI still checks the rest."""
    g = {"a": small(1), "b": small(),
         "x": api_node("MergeLab_ExtractLoRA", tuned_model=["a", 0], base_model=["b", 0], clamp_quantile=3.0,
                       oversample=-5),
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "lora"}}}
    res = harness.run(g)
    assert not res.success and res.node_errors
    text = res.error_text()
    assert "bigger than max of 1.0" in text and "smaller than min of 0" in text
    g = merge_graph()
    g["bw"] = api_node("MergeLab_BlockWeights_SD1", **{"input_blocks.4.": 1e6})
    g["merge"]["inputs"]["block_weights"] = ["bw", 0]
    res = harness.run(g)
    assert not res.success and res.node_errors and "bigger than max" in res.error_text()


@pytest.mark.parametrize("q", [0.5, 0.7])
def test_a_clamp_quantile_that_clamps_everything_is_refused(harness, q):
    """kohya's clamp takes the quantile of the signed factors: at 0.5 about 0 (every factor clamped to ~0),
    lower often negative (every entry set to one value).  Refused at validation, and by the engine."""
    g = {"a": small(1), "b": small(),
         "x": api_node("MergeLab_ExtractLoRA", tuned_model=["a", 0], base_model=["b", 0], clamp_quantile=q),
         "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "lora"}}}
    res = harness.run(g)
    assert not res.success and res.node_errors and "smaller than min of 0.9" in res.error_text()
    ops = __import__(f"{harness.pack_module_name}.engine.lora_ops", fromlist=["ExtractOptions"])
    with pytest.raises(ops.LoraError, match=r"clamp_quantile must be in \[0.9, 1\]"):
        ops.resize_lora(None, None, clamp_quantile=q)


def test_the_clip_merger_has_no_mask_input(harness):
    """Every masker makes a mask of a MODEL's keys, so a mask on the CLIP Merger could only fail ('make the
    mask from the model you merge', which no node can do): the input is gone."""
    import nodes
    clip_inputs = nodes.NODE_CLASS_MAPPINGS["MergeLab_CLIPMerger"].INPUT_TYPES()
    model_inputs = nodes.NODE_CLASS_MAPPINGS["MergeLab_ModelMerger"].INPUT_TYPES()
    assert "mask" not in clip_inputs.get("optional", {}) and "mask" in model_inputs["optional"]
