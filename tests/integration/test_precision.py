"""Merges and LoRA tools compute with full fp32 matmuls even where the user turned TF32 on (legacy or new
PyTorch API), and give the user's setting back afterwards."""
import importlib

import pytest
import torch

MATMUL = torch.backends.cuda.matmul


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


def small(delta_seed=0):
    return {"class_type": "MergeLabTest_SmallModel",
            "inputs": {"arch": "SD15", "seed": 0, "delta_seed": delta_seed,
                       "delta_scale": 0.02 if delta_seed else 0.0, "dtype": "fp32"}}


def graph():
    return {"base": small(), "a": small(1), "b": small(2),
            "ia": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["a", 0]}},
            "ib": {"class_type": "MergeLab_MergeInput", "inputs": {"model": ["b", 0], "models": ["ia", 0]}},
            "method": {"class_type": "MergeLab_Method_karcher", "inputs": {}},
            "merge": {"class_type": "MergeLab_ModelMerger", "inputs": {"method": ["method", 0], "models": ["ib", 0]}},
            "x": {"class_type": "MergeLab_ExtractLoRA",
                  "inputs": {"tuned_model": ["merge", 0], "base_model": ["base", 0], "rank_mode": "fixed", "rank": 4}},
            "c": {"class_type": "MergeLabTest_Capture", "inputs": {"value": ["x", 0], "name": "lora"}}}


def _set_tf32(api):
    if api == "legacy":
        MATMUL.allow_tf32 = True
    else:
        MATMUL.fp32_precision = "tf32"


def _user_setting(api):
    return MATMUL.allow_tf32 if api == "legacy" else MATMUL.fp32_precision


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_merge_and_extract_without_tf32_then_setting_restored(harness, monkeypatch, api):
    seen = []
    mm = pack(harness, "merge_methods")
    lora_ops = pack(harness, "engine.lora_ops")
    merge, extract_one = mm.MergeMethod.merge, lora_ops._extract_one

    def spy_merge(self, *a, **kw):
        seen.append(("merge", MATMUL.fp32_precision))
        return merge(self, *a, **kw)

    def spy_extract(*a, **kw):
        seen.append(("extract", MATMUL.fp32_precision))
        return extract_one(*a, **kw)

    monkeypatch.setattr(mm.MergeMethod, "merge", spy_merge)
    monkeypatch.setattr(lora_ops, "_extract_one", spy_extract)
    before = (torch.get_float32_matmul_precision(), MATMUL.fp32_precision)
    try:
        _set_tf32(api)
        want = _user_setting(api)
        harness.run_ok(harness.with_defaults(graph()))
        assert _user_setting(api) == want                       # the user's TF32 is back
        assert {w for w, _ in seen} == {"merge", "extract"}
        assert all(p == "ieee" for _, p in seen), seen           # full fp32 while computing
    finally:
        # back to the start: the legacy setter (which also sets the new API's value), then the new one's
        torch.set_float32_matmul_precision(before[0])
        MATMUL.fp32_precision = before[1]
    assert torch.get_float32_matmul_precision() == before[0]


def test_already_full_precision_is_left_alone(harness):
    full = pack(harness, "engine.precision").full_fp32_matmul
    state = (torch.get_float32_matmul_precision(), MATMUL.fp32_precision)
    assert state[0] == "highest"
    with full():
        assert (torch.get_float32_matmul_precision(), MATMUL.fp32_precision) == state
    assert (torch.get_float32_matmul_precision(), MATMUL.fp32_precision) == state
