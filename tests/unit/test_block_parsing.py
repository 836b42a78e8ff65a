"""engine.blocks without ComfyUI: block derivation, MBW names, strings, presets, rules, BlockWeights."""
import json

import pytest

from engine import blocks as B

P = "diffusion_model."


# -- block derivation ------------------------------------------------------------------------------
@pytest.mark.parametrize("key, block", [
    ("diffusion_model.input_blocks.1.1.proj_in.weight", "input_blocks.1."),
    ("diffusion_model.input_blocks.10.0.emb_layers.1.weight", "input_blocks.10."),
    ("input_blocks.4.0.in_layers.0.weight", "input_blocks.4."),          # prefix optional
    ("diffusion_model.middle_block.1.proj_out.bias", "middle_block.1."),
    ("diffusion_model.time_embed.0.weight", "time_embed."),               # nn.Sequential layers: one block
    ("diffusion_model.time_embed.2.bias", "time_embed."),
    ("diffusion_model.out.2.weight", "out."),
    ("diffusion_model.label_emb.0.0.weight", "label_emb."),
    ("diffusion_model.double_blocks.12.img_attn.qkv.weight", "double_blocks.12."),
    ("diffusion_model.single_blocks.37.linear1.weight", "single_blocks.37."),
    ("diffusion_model.blocks.block7.blocks.0.block.attn.to_q.0.weight", "blocks.block7."),
    ("diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "joint_blocks.0."),
    ("diffusion_model.transformer_blocks.59.attn.to_q.weight", "transformer_blocks.59."),
    ("diffusion_model.layers.3.attention.qkv.weight", "layers.3."),
    ("diffusion_model.t_block.1.weight", "t_block."),
    ("diffusion_model.img_in.weight", "img_in."),
    ("diffusion_model.final_layer.linear.weight", "final_layer."),
    ("diffusion_model.scale_shift_table", "scale_shift_table"),
    ("diffusion_model.pos_embed", "pos_embed"),
    ("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "clip_l."),
    ("t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight", "t5xxl."),
])
def test_block_of(key, block):
    assert B.block_of(key) == block
    assert B.BlockWeights.block_of(key) == block


def test_exact_matching_no_prefix_confusion():
    keys = [P + "input_blocks.1.0.x.weight", P + "input_blocks.10.0.x.weight", P + "input_blocks.11.1.y.bias"]
    assert B.derive_blocks(keys) == ["input_blocks.1.", "input_blocks.10.", "input_blocks.11."]
    bw = B.BlockWeights((B.Entry(arch=None, blocks=(("input_blocks.1.", 0.25),)),))
    assert bw.factors(keys[0], 1) == {"weight": [0.25]}
    assert bw.factors(keys[1], 1) == {"weight": [1.0]}
    assert bw.factors(keys[2], 1) == {"weight": [1.0]}


def test_derive_blocks_first_appearance_order_and_counts():
    keys = [P + "img_in.weight", P + "double_blocks.0.a", P + "double_blocks.0.b", P + "single_blocks.0.a",
            P + "double_blocks.1.a", P + "final_layer.w", P + "img_in.bias"]
    assert B.derive_blocks(keys) == ["img_in.", "double_blocks.0.", "single_blocks.0.", "double_blocks.1.",
                                     "final_layer."]
    assert B.block_counts(keys)["img_in."] == 2 and sum(B.block_counts(keys).values()) == len(keys)


def test_union_blocks_keeps_order():
    assert B.union_blocks([["a", "b1", "b2", "head"], ["a", "b1", "head", "img"], ["a", "b1", "b2", "b3", "head"]]) \
        == ["a", "b1", "b2", "b3", "head", "img"]


# -- architectures and MBW names (from the committed block table) ------------------------------------
def test_supermerger_counts_and_names():
    assert len(B.mbw_names("SD1")) == 26 and len(B.mbw_names("SD2")) == 26
    assert B.mbw_names("SD1") == list(B.SD1_LAYOUT)
    assert B.mbw_names("SDXL") == ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + \
        [f"OUT{i:02d}" for i in range(9)]
    flux = B.mbw_names("Flux")
    assert len(flux) == 61
    assert flux == ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
    assert B.mbw_names("SD3") == ["IN"] + [f"J{i:02d}" for i in range(38)] + ["OUT"]


def test_mbw_block_mapping_follows_supermerger():
    sd1 = B.mbw_name_of_block("SD1")
    assert sd1["time_embed."] == "IN00" and sd1["input_blocks.0."] == "IN00"     # supermerger, not sd-mecha
    assert sd1["out."] == "OUT11" and sd1["output_blocks.11."] == "OUT11"
    assert {sd1[f"middle_block.{i}."] for i in range(3)} == {"M00"}
    assert sd1["clip_l."] == "BASE"
    sdxl = B.mbw_name_of_block("SDXL")
    assert sdxl["label_emb."] == "IN00" and sdxl["out."] == "OUT08" and sdxl["input_blocks.8."] == "IN08"
    assert sdxl["clip_l."] == sdxl["clip_g."] == "BASE"
    flux = B.mbw_name_of_block("Flux")
    assert {flux[b] for b in ("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.")} == {"IN"}
    assert flux["double_blocks.18."] == "D18" and flux["single_blocks.0."] == "S00"
    assert flux["final_layer."] == "OUT" and flux["clip_l."] == "CLIP" and flux["t5xxl."] == "T5"


@pytest.mark.parametrize("arch", B.architectures())
def test_every_block_has_exactly_one_mbw_name(arch):
    layout = B.mbw_layout(arch)
    names = [n for n, _ in layout]
    assert len(names) == len(set(names)), names
    covered = [b for _, ids in layout for b in ids]
    assert len(covered) == len(set(covered))
    assert set(B.block_list(arch)) <= set(covered)
    assert all(B.block_of(P + b + "x.weight") == b or B.block_of(P + b) == b for b in B.block_list(arch))


def test_arch_of_config_family_table():
    assert B.arch_of_config("SD15") == "SD1" and B.arch_of_config("SD21UnclipL") == "SD2"
    assert B.arch_of_config("FluxSchnell") == "Flux" and B.arch_of_config("WAN21_I2V") == "Wan"
    assert B.arch_of_config("SomethingNew") == "SomethingNew"


# -- MBW strings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, n", [("SD1", 26), ("SD2", 26), ("SDXL", 20), ("Flux", 61)])
def test_positional_counts(arch, n):
    vals = B.parse_mbw(",".join(str(i / 100) for i in range(n)), arch)
    assert list(vals.values()) == [i / 100 for i in range(n)]
    with pytest.raises(ValueError) as e:
        B.parse_mbw(",".join(["1"] * (n - 1)), arch)
    msg = str(e.value)
    assert f"needs {n} values" in msg and arch in msg and f"got {n - 1}" in msg


def test_sd1_string_on_sdxl_is_an_error_naming_both_counts():
    with pytest.raises(ValueError, match=r"SDXL.*needs 20 values \(BASE, IN00-IN08, M00, OUT00-OUT08\), got 26"):
        B.parse_mbw(",".join(["0.5"] * 26), "SDXL")


def test_named_values_ranges_and_defaults():
    v = B.parse_mbw("IN00:0.3, m00=1.5, OUT05-OUT03:0 ; BASE:-2", "SD1")
    assert v["IN00"] == 0.3 and v["M00"] == 1.5 and v["BASE"] == -2.0       # case-insensitive, = or :
    assert v["OUT03"] == v["OUT04"] == v["OUT05"] == 0.0                    # reversed range accepted
    assert v["OUT02"] == v["OUT06"] == v["IN01"] == 1.0                     # others keep 1
    v = B.parse_mbw("IN08-OUT01:0.5", "SDXL")                               # ranges span groups in MBW order
    assert v["IN08"] == v["M00"] == v["OUT00"] == v["OUT01"] == 0.5 and v["OUT02"] == 1.0
    assert set(B.parse_mbw("0.25", "Flux").values()) == {0.25}              # one value for all


@pytest.mark.parametrize("text, match", [
    ("IN12:0", "unknown block name 'IN12'"),
    ("IN00:abc", "not a number"),
    ("IN00 0.5", "cannot read"),
    ("IN00:nan", "not a number"),
    ("1,1,x", r"value 3 of 3, 'x', is not a number"),          # a typo in a list names the typo
    ("GRAD_V, 1, 0.5x", r"value 3 of 3, '0.5x', is not a number"),
])
def test_mbw_errors(text, match):
    with pytest.raises(ValueError, match=match):
        B.parse_mbw(text, "SD1")


def test_preset_with_overrides():
    v = B.parse_mbw("GRAD_V, M00:0.5", "SD1")
    assert v["IN00"] == 1.0 and v["M00"] == 0.5 and v["OUT11"] == 1.0 and v["IN06"] == pytest.approx(0.5)
    v2 = B.parse_mbw("M00:0.5", "SD1", preset="GRAD_V")
    assert v == v2
    with pytest.raises(ValueError, match="either a preset or a full list"):
        B.parse_mbw(",".join(["1"] * 26), "SD1", preset="GRAD_V")


# -- presets -----------------------------------------------------------------------------------------
EXPECTED_NAMES = ["GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75", "WRAP08", "WRAP12", "WRAP14", "WRAP16", "MID12_50",
                  "OUT07", "OUT12", "OUT12_5", "RING08_SOFT", "RING08_5", "RING10_5", "RING10_3", "SMOOTHSTEP",
                  "REVERSE_SMOOTHSTEP", "SMOOTHSTEP*2", "R_SMOOTHSTEP*2", "SMOOTHSTEP/2", "R_SMOOTHSTEP/4",
                  "COSINE", "REVERSE_COSINE", "TRUE_CUBIC_HERMITE", "FAKE_REVERSE_CUBIC_HERMITE", "ALL_A", "ALL_B"]


def test_preset_table():
    for name in EXPECTED_NAMES:
        assert name in B.PRESETS
    assert all(len(v) == 26 for v in B.PRESETS.values())
    assert all(v[0] == 0.0 for k, v in B.PRESETS.items() if k != "ALL_B") and B.PRESETS["ALL_B"][0] == 1.0


@pytest.mark.parametrize("name, index, value", [     # spot values of supermerger's / sd-meh's tables
    ("GRAD_V", 2, 0.9166666667), ("GRAD_A", 13, 1.0), ("WRAP08", 4, 1), ("WRAP08", 5, 0), ("MID12_50", 6, 0.5),
    ("OUT12_5", 13, 0.5), ("RING08_SOFT", 6, 0.5),
    ("SMOOTHSTEP", 2, 0.00506365740740741), ("SMOOTHSTEP", 20, 0.887876157407408),
    ("REVERSE_SMOOTHSTEP", 8, 0.794415509259259),
    ("SMOOTHSTEP*2", 14, 0.875289351851852), ("SMOOTHSTEP*3", 11, 0.871527777777778),
    ("SMOOTHSTEP*3", 16, 0.0507812500000004), ("R_SMOOTHSTEP*4", 9, 0.0370370370370372),
    ("SMOOTHSTEP/2", 2, 0.0196759259259259), ("SMOOTHSTEP/3", 2, 0.04296875), ("SMOOTHSTEP/4", 7, 1.0),
    ("R_SMOOTHSTEP/4", 4, 0.5), ("COSINE", 2, 0.995722430686905), ("REVERSE_COSINE", 10, 0.308658283817455),
    ("FAKE_CUBIC_HERMITE", 2, 0.157576195987654), ("FAKE_REVERSE_CUBIC_HERMITE", 24, 0.157576195987653),
    ("TRUE_CUBIC_HERMITE", 14, 0.49438777970679), ("TRUE_REVERSE_CUBIC_HERMITE", 2, 0.800968123070988),
])
def test_curve_presets_match_supermerger(name, index, value):
    assert B.PRESETS[name][index] == pytest.approx(value, abs=1e-9)


def test_preset_aliases_and_case():
    assert B.preset_name("2SMOOTHSTEP") == "SMOOTHSTEP*2"
    assert B.preset_name("half_r_smoothstep") == "R_SMOOTHSTEP/2"
    assert B.preset_name("REVERSE-SMOOTHSTEP") == "REVERSE_SMOOTHSTEP"
    assert B.preset_name("nope") is None
    with pytest.raises(ValueError, match="unknown MBW preset"):
        B.preset_values("nope", "SD1")


@pytest.mark.parametrize("arch", B.architectures())
def test_every_preset_resolves_for_every_arch(arch):
    names = B.mbw_names(arch)
    for p in B.preset_names():
        vals = B.preset_values(p, arch)
        assert list(vals) == names
        assert all(isinstance(x, float) for x in vals.values())


def test_preset_conversion_rules():
    sd1 = B.PRESETS["GRAD_V"]
    assert list(B.preset_values("GRAD_V", "SD1").values()) == list(sd1)
    # weighttoxl: BASE, IN00-IN08 = w[1:10], M00 = w[13], OUT00-OUT08 = w[14:23]
    assert list(B.preset_values("GRAD_V", "SDXL").values()) == [sd1[0], *sd1[1:10], sd1[13], *sd1[14:23]]
    flux = B.preset_values("GRAD_V", "Flux")
    assert flux["CLIP"] == flux["T5"] == sd1[0]
    assert flux["IN"] == sd1[1] and flux["OUT"] == sd1[25]                 # resampled end to end
    assert min(flux.values()) >= 0.0
    sd3 = B.preset_values("WRAP08", "SD3")
    assert sd3["IN"] == 1.0 and sd3["OUT"] == 1.0 and sd3["J18"] == 0.0


# -- rules -------------------------------------------------------------------------------------------
def test_rules_last_match_wins_and_syntax():
    rules = B.parse_rules("# comment\n\nre:.*attn.*=0.5\nglob:input_blocks.*=0\noutput_blocks.1.*=2\n"
                          "re:proj_(in|out)=-1\n")
    assert [r.kind for r in rules] == ["re", "glob", "glob", "re"]
    bw = B.BlockWeights.from_rules("re:.*attn.*=0.5\nglob:input_blocks.*=0\n")
    assert bw.factors(P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 1) == {"weight": [0.0]}
    assert bw.factors(P + "output_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 1) == {"weight": [0.5]}
    assert bw.factors(P + "output_blocks.1.0.in_layers.0.weight", 1) == {"weight": [1.0]}
    bw2 = B.BlockWeights.from_rules("glob:input_blocks.*=0\nre:attn=0.5\n")        # order reversed: attn wins
    assert bw2.factors(P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 1) == {"weight": [0.5]}


def test_rules_override_block_values_in_one_entry():
    e = B.Entry(arch=None, blocks=(("input_blocks.1.", 0.2),), rules=(B.Rule("re", "proj_in", 3.0),))
    bw = B.BlockWeights((e,))
    assert bw.factors(P + "input_blocks.1.1.proj_in.weight", 1)["weight"] == [3.0]
    assert bw.factors(P + "input_blocks.1.1.proj_out.weight", 1)["weight"] == [0.2]


@pytest.mark.parametrize("text, match", [
    ("re:.*attn.*", "line 1"),
    ("x\nre:(unclosed=1", "line 1"),
    ("ok=1\nre:(unclosed=1", "line 2.*bad regular expression"),
    ("glob:=1", "empty pattern"),
    ("re:a=b", "not a number"),
])
def test_rule_errors(text, match):
    with pytest.raises(ValueError, match=match):
        B.parse_rules(text)


def test_parse_models():
    assert B.parse_models("all") is None and B.parse_models("") is None and B.parse_models(None) is None
    assert B.parse_models("1,3") == (1, 3) and B.parse_models(" 2-4 ") == (2, 3, 4)
    assert B.parse_models([3, 1]) == (1, 3)
    for bad in ("0", "a", "3-1", "1,,x"):
        with pytest.raises(ValueError, match="models"):
            B.parse_models(bad)


# -- BlockWeights ------------------------------------------------------------------------------------
def test_factors_per_model_param_and_multiplication():
    a = B.BlockWeights.from_blocks("SD1", {"input_blocks.4.": 0.5, "OUT11": 2.0}, param="weight")
    b = B.BlockWeights.from_blocks("SD1", {"input_blocks.4.": -1.5}, param="weight", models="2")
    c = B.BlockWeights.from_rules("re:.*=0.3", param="density", models="1")
    bw = B.combine(a, b, None, c)
    k4 = P + "input_blocks.4.1.proj_in.weight"
    assert bw.factors(k4, 3) == {"weight": [0.5, -0.75, 0.5], "density": [0.3, 1.0, 1.0]}
    assert bw.factors(P + "out.2.weight", 3)["weight"] == [2.0, 2.0, 2.0]           # out. is OUT11
    assert bw.factors(P + "output_blocks.11.0.skip_connection.weight", 3)["weight"] == [2.0, 2.0, 2.0]
    assert a.factors(k4, 2) == {"weight": [0.5, 0.5]}                                # density absent
    assert bw.params() == ["weight", "density"]
    with pytest.raises(ValueError, match="apply to model 2, but only 1 model"):
        b.factors(k4, 1)


def test_factors_cache_returns_fresh_lists():
    bw = B.BlockWeights.from_blocks("SD1", {"input_blocks.4.": 0.5})
    f = bw.factors(P + "input_blocks.4.0.x", 2)
    f["weight"][0] = 99
    assert bw.factors(P + "input_blocks.4.1.y", 2) == {"weight": [0.5, 0.5]}


def test_from_blocks_rejects_unknown_blocks():
    with pytest.raises(ValueError, match="unknown block 'double_blocks.0.'"):
        B.BlockWeights.from_blocks("SD1", {"double_blocks.0.": 1})
    with pytest.raises(ValueError, match="unknown architecture"):
        B.BlockWeights.from_blocks("NoSuchArch", {})


def test_hashable_frozen_json_roundtrip():
    bw = B.combine(B.BlockWeights.from_mbw("SDXL", "IN00:0.5", preset="SMOOTHSTEP", models="1,2"),
                   B.BlockWeights.from_rules("glob:*attn2*=0\n", param="t"))
    same = B.combine(B.BlockWeights.from_mbw("SDXL", "IN00:0.5", preset="SMOOTHSTEP", models="1,2"),
                     B.BlockWeights.from_rules("glob:*attn2*=0\n", param="t"))
    assert bw == same and hash(bw) == hash(same) and len({bw, same}) == 1
    d = json.loads(json.dumps(bw.to_dict()))
    back = B.BlockWeights.from_dict(d)
    assert back == bw and back.to_dict() == bw.to_dict()
    with pytest.raises(Exception):
        bw.entries = ()
    with pytest.raises(ValueError, match="not a block-weights dict"):
        B.BlockWeights.from_dict({"entries": []})


def test_check_architecture():
    bw = B.BlockWeights.from_mbw("SDXL", preset="GRAD_V")
    assert bw.check("SDXL") == []
    with pytest.raises(ValueError, match=r"made for SDXL, but the model is SD 1.x \(SD1\)"):
        bw.check("SD1")
    B.BlockWeights.from_rules("re:x=0").check("Flux")          # rules fit any architecture
    bw.check(None)                                              # unknown model: nothing to compare


def test_check_with_keys():
    keys = [P + "time_embed.0.weight", P + "input_blocks.0.0.weight", P + "out.2.weight"]
    bw = B.BlockWeights.from_blocks("SD1", {"input_blocks.11.": 0.5})
    warnings = bw.check("SD1", keys)
    assert any("input_blocks.11." in w for w in warnings)
    assert B.BlockWeights.from_blocks("SD1", {"time_embed.": 0.5}).check("SD1", keys) == []
    with pytest.raises(ValueError, match="none of their blocks"):
        bw.check(None, [P + "double_blocks.0.x"])
    r = B.BlockWeights.from_rules("re:attn=0")
    assert any("matches no key" in w for w in r.check("SD1", keys))
    # a CLIP merge: only the text-encoder blocks matter
    clip_keys = ["clip_l.transformer.text_model.embeddings.token_embedding.weight"]
    assert B.BlockWeights.from_mbw("SD1", "BASE:0").check("SD1", clip_keys) == []
    assert B.BlockWeights.from_mbw("SD1", "BASE:0").factors(clip_keys[0], 1) == {"weight": [0.0]}


def test_values_outside_unit_interval_and_non_finite():
    bw = B.BlockWeights.from_blocks("Flux", {"D00": -3.5, "S37": 7.25})
    assert bw.factors(P + "double_blocks.0.img_attn.qkv.weight", 1) == {"weight": [-3.5]}
    assert bw.factors(P + "single_blocks.37.linear1.weight", 1) == {"weight": [7.25]}
    with pytest.raises(ValueError, match="finite"):
        B.BlockWeights.from_blocks("Flux", {"D00": float("inf")})
