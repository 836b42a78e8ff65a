"""Models loaded by ComfyUI-GGUF (through a stand-in: see ``fake_gguf``).  Every MergeLab node failed on them
with "'Linear' object has no attribute 'temp'" (a fake state_dict entry ComfyUI-GGUF adds; ComfyUI's own
ModelMergeSimple fails the same way, city96/ComfyUI-GGUF#193); past that, the quantized weights (uint8
blocks) were not merged at all, and a LoRA did not fit them (their placeholders are shaped as bytes)."""
import importlib

import pytest
import torch

import fake_gguf as fg  # noqa: E402  (the ComfyUI-GGUF stand-in)


def pack(harness, sub):
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")


@pytest.fixture(scope="module")
def gguf_models(harness):
    base = fg.fake_gguf_model("Flux")
    ins = [fg.fake_gguf_model("Flux", delta_seed=i, delta_scale=0.02) for i in (1, 2)]
    return base, ins


def _check_ties_merge(harness, base, ins, keys, quantized, seed, density=None):
    """TIES of ``ins`` onto ``base`` through the engine, loaded as for sampling: every weight of ``keys`` (what
    the model computes with) is the method on the inputs' weights, those of ``quantized`` kept as bf16 (as fp8
    results are; ComfyUI-GGUF applies them).  Returns the inputs' weights ({key: (base, [models])})."""
    import comfy.model_management as mm
    eng, mmeth = pack(harness, "engine.merge"), pack(harness, "merge_methods")
    refs = {k: (fg.weights(base, [k])[k], [fg.weights(m, [k])[k] for m in ins]) for k in keys}
    params = {} if density is None else {"density": density}
    method = mmeth.create("ties")
    out = eng.merge_models(base, [eng.MergeInput(m, dict(params), f"m{i}") for i, m in enumerate(ins)], method,
                           eng.MergeOptions(seed=seed, device="cpu"))
    mm.load_models_gpu([out], force_full_load=True)
    try:
        got = fg.weights(out, keys)
    finally:
        mm.unload_all_models()
    per_model = {k: [v] * len(ins) for k, v in params.items()}
    for k in keys:
        exp = method.merge(refs[k][0], refs[k][1], key=k, seed=seed, **per_model)
        if k in quantized:
            exp = exp.bfloat16().float()
        assert torch.equal(got[k], exp), k
    return refs


def test_a_merge_of_gguf_models_merges_every_weight_including_the_quantized_ones(harness, gguf_models):
    base, ins = gguf_models
    keys = fg.param_keys(base)
    quantized = [k for k in keys if fg.is_q8(fg.stored(base, k))]
    assert len(quantized) > 100
    refs = _check_ties_merge(harness, base, ins, keys, quantized, seed=7)
    # the inputs are untouched: nothing attached to their shared quantized tensors
    assert torch.equal(fg.weights(base, quantized[:1])[quantized[0]], refs[quantized[0]][0])


def test_a_lora_on_a_gguf_model_through_merge_lab_gives_lora_loaders_weights(harness, gguf_models):
    """Load LoRA / Apply LoRA compared the LoRA's shapes with the byte-shaped placeholders and refused it."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    lw, lio = pack(harness, "engine.lora"), pack(harness, "engine.lora_io")
    base, _ = gguf_models
    keys = [k for k in fg.param_keys(base) if fg.is_q8(fg.stored(base, k))][:6]
    g = torch.Generator().manual_seed(3)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    inv = {v: k for k, v in key_map.items() if isinstance(v, str)}
    sd = {}
    for k in keys:
        o, i = base.model.get_submodule(k.rpartition(".")[0]).weight.shape
        name = inv[k]
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.1
        sd[f"{name}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    ref, _ = comfy.sd.load_lora_for_models(base, None, sd, 0.7, 0.0)
    lora = lio.lora_from_state_dict(sd, base, None, name="test", source={"kind": "test"})
    ours = lw.apply_lora(lora, base, None, 0.7, 0.0)[0]
    outs = []
    for m in (ref, ours):
        mm.load_models_gpu([m], force_full_load=True)
        try:
            outs.append(fg.weights(m, keys))
        finally:
            mm.unload_all_models()
    for k in keys:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("gguf_is_base", [False, True])
def test_gguf_and_plain_models_merge_together(harness, gguf_models, gguf_is_base):
    """A GGUF fine-tune merged with plain checkpoints of the same architecture (and the other way round): every
    weight is the method applied to what each model computes with, kept in the base's storage (a GGUF base's
    quantized weights as bf16)."""
    from mergelab import fixtures
    gguf_base, gguf_ins = gguf_models
    plain_base = fixtures.small_model("Flux")
    plain = fixtures.small_model("Flux", delta_seed=7, delta_scale=0.02)
    base, ins = (gguf_base, [plain, gguf_ins[0]]) if gguf_is_base else (plain_base, [gguf_ins[0], plain])
    keys = fg.param_keys(gguf_base)
    quantized = [k for k in keys if fg.is_q8(fg.stored(gguf_base, k))]
    _check_ties_merge(harness, base, ins, keys, quantized if gguf_is_base else [], seed=3, density=0.5)
