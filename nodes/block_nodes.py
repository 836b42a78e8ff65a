"""Block-weight nodes.  Each outputs a ``BLOCK_WEIGHTS``: an immutable :class:`engine.blocks.BlockWeights`
of multiplicative factors on one merge-method parameter, for the mergers' ``block_weights`` input.

* one node per architecture (generated from the block table: one float per block);
* an MBW-string node (supermerger's ``BASE,IN00,...`` strings, named values, ranges, presets);
* a rules node (regular expressions and globs on key names);
* a combine node (several BLOCK_WEIGHTS at once; factors on the same parameter multiply).

Every producing node also takes an optional ``combine_with`` input, so they chain.
"""
from __future__ import annotations

from typing import List

from .. import merge_methods
from ..engine import blocks
from ..merge_methods import spec as mspec
from .comfy_api_compat import io
from .types import BlockWeightsType

CATEGORY = "MergeLab/block weights"
FACTOR_MIN, FACTOR_MAX, FACTOR_STEP = -10.0, 10.0, 0.01


def scalable_params() -> List[str]:
    """Names of the float parameters any merge method declares ("weight" first): what block weights
    may scale."""
    names = {p.name for s in merge_methods.all_specs() for p in s.params if p.kind == mspec.FLOAT}
    names.add("weight")
    return ["weight"] + sorted(names - {"weight"})


def _param_input():
    return io.Combo.Input(
        "param", options=scalable_params(), default="weight",
        tooltip="The merge-method parameter these factors multiply, per key: weight, density, t, ... "
                "A parameter the connected method does not have is an error at merge time.")


def _models_input():
    return io.String.Input(
        "models", default="all",
        tooltip="Which merged models the factors apply to: 'all', or model numbers like '1,3' or '2-4' "
                "(1 = the first model input of the merger; the base is never scaled).  A 'weight' factor alike "
                "for all models cancels out where the method divides by the summed weights (normalize on: "
                "linear, TIES, DARE, ...); the merge report says so.")


def _combine_input():
    return BlockWeightsType.Input(
        "combine_with", optional=True,
        tooltip="Optional block weights to keep as well (entries on the same parameter multiply).")


def _output():
    return BlockWeightsType.Output(display_name="block_weights",
                                   tooltip="Per-key factors for the block_weights input of a MergeLab merger.")


def _with(bw: blocks.BlockWeights, combine_with) -> blocks.BlockWeights:
    return combine_with.combine(bw) if combine_with is not None else bw


def _node(class_name: str, define_schema, execute, doc: str, validate=None) -> type:
    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": doc}
    if validate is not None:
        attrs["validate_inputs"] = classmethod(validate)
    return type(class_name, (io.ComfyNode,), attrs)


# ---------------------------------------------------------------------------------------------
# one node per architecture
# ---------------------------------------------------------------------------------------------
def node_id_for(arch: str) -> str:
    return f"MergeLab_BlockWeights_{arch}"


def _block_tooltip(block: str, mbw: str, keys: int, lacking: List[str]) -> str:
    tip = (f"Factor for the keys under diffusion_model.{block} ({keys} keys; MBW name {mbw}). "
           f"The chosen parameter is multiplied by it for these keys: 1 = unchanged, 0 = zeroed; any value "
           f"from {FACTOR_MIN:g} to {FACTOR_MAX:g}.")
    if lacking:
        tip += f" Not present in: {', '.join(lacking)}."
    return tip


def make_arch_node(arch: str) -> type:
    info = blocks.arch_info(arch)
    title = info["title"]
    names = blocks.mbw_name_of_block(arch)
    block_ids = list(info["blocks"])
    variants = [v["name"] for v in info["variants"]]
    lacking = {b: [v["name"] for v in info["variants"] if b in v["missing"]] for b in block_ids}
    description = (
        f"Per-block factors for {title} models ({', '.join(dict.fromkeys(v['config_class'] for v in info['variants']))}). "
        f"One value per block of diffusion_model (the union over {', '.join(variants)}; a model without a "
        f"block ignores its value). The factors multiply the chosen merge-method parameter for every key "
        f"of the block. MBW order: {blocks._layout_text(arch)}. See docs/blocks.md.")
    cached = {}

    def define_schema(cls):
        if "inputs" not in cached:     # define_schema runs on every validation: build the widgets once
            cached["inputs"] = [
                io.Float.Input(b, display_name=f"{names.get(b, '')} {b}".strip(), default=1.0, min=FACTOR_MIN,
                               max=FACTOR_MAX, step=FACTOR_STEP, round=False,
                               tooltip=_block_tooltip(b, names.get(b, ""), k, lacking[b]))
                for b, k in zip(block_ids, info["keys"])]
        return io.Schema(
            node_id=node_id_for(arch), display_name=f"Block Weights ({title})", category=CATEGORY,
            description=description,
            inputs=[_param_input(), _models_input(), *cached["inputs"], _combine_input()],
            outputs=[_output()])

    def execute(cls, param="weight", models="all", combine_with=None, **values):
        bw = blocks.BlockWeights.from_blocks(arch, {b: values[b] for b in block_ids if b in values}, param=param,
                                             models=models, label=f"{arch} blocks")
        return io.NodeOutput(_with(bw, combine_with))

    def validate(cls, models=None):     # naming only 'models': ComfyUI still checks the others' ranges
        try:
            blocks.parse_models(models if models is not None else "all")
        except ValueError as e:
            return str(e)
        return True

    return _node(f"MergeLabBlockWeights_{arch}", define_schema, execute,
                 f"Block-weights node for {title} (generated from the block table).", validate)


# ---------------------------------------------------------------------------------------------
# MBW string + preset
# ---------------------------------------------------------------------------------------------
def _mbw_node() -> type:
    archs = blocks.architectures()
    presets = ["none"] + blocks.preset_names()

    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_BlockWeightsMBW", display_name="Block Weights (MBW string)", category=CATEGORY,
            description=(
                "supermerger-style block weights. SD1/SD2: 26 values BASE,IN00-IN11,M00,OUT00-OUT11; SDXL: 20 "
                "values BASE,IN00-IN08,M00,OUT00-OUT08; Flux: 61 values CLIP,T5,IN,D00-D18,S00-S37,OUT; other "
                "architectures: IN, one name per block (J00.., B00.., T00..), OUT (see docs/blocks.md). "
                "time_embed counts as IN00, like supermerger. Presets are supermerger's SD1 tables, converted "
                "for other architectures."),
            inputs=[
                io.Combo.Input("arch", options=archs, default="SD1" if "SD1" in archs else archs[0],
                               tooltip="The architecture of the models to merge; the merger checks it."),
                io.Combo.Input("preset", options=presets, default="none",
                               tooltip="A supermerger preset (26 SD1 values, first = BASE); SDXL uses "
                                       "supermerger's weighttoxl rule, other architectures a linear "
                                       "resampling in block order. Named values in the string below "
                                       "override single blocks of it; a full list or one value for all "
                                       "needs preset none."),
                io.String.Input("mbw", default="",
                                tooltip="Empty (preset only), one value per MBW name ('0,1,1,...'), one value "
                                        "for all (these two with preset none), or named values and ranges: "
                                        "'IN00:0.3, M00:1, OUT03-OUT05:0'. Names not given keep the preset's "
                                        "value (or 1)."),
                _param_input(), _models_input(), _combine_input()],
            outputs=[_output()])

    def validate(cls, arch=None, preset=None, mbw=None, models=None):     # no **kw: see the arch nodes
        if arch is None or preset is None or mbw is None:
            return True
        try:
            blocks.parse_mbw(mbw, arch, preset)
            blocks.parse_models(models if models is not None else "all")
        except ValueError as e:
            return str(e)
        return True

    def execute(cls, arch, preset, mbw, param="weight", models="all", combine_with=None):
        bw = blocks.BlockWeights.from_mbw(arch, mbw, preset=preset, param=param, models=models)
        return io.NodeOutput(_with(bw, combine_with))

    return _node("MergeLabBlockWeightsMBW", define_schema, execute, "MBW string / preset block weights.", validate)


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
RULES_HELP = ("# one rule per line: re:<regex>=<factor> or glob:<pattern>=<factor>\n"
              "# keys without 'diffusion_model.', e.g. input_blocks.4.1.proj_in.weight; the last matching rule wins\n")


def _rules_node() -> type:
    def define_schema(cls):
        return io.Schema(
            node_id="MergeLab_BlockRules", display_name="Block Weights (rules)", category=CATEGORY,
            description=(
                "Factors by key name, for any architecture. One rule per line: 're:<regex>=<factor>' (Python "
                "re.search) or 'glob:<pattern>=<factor>' (fnmatch on the whole key; 'glob:' may be left out). "
                "Keys are matched without 'diffusion_model.' (CLIP keys as they are: clip_l.transformer...). "
                "When several rules match a key the LAST one wins; keys no rule matches keep 1."),
            inputs=[io.String.Input("rules", multiline=True, default=RULES_HELP,
                                    tooltip="Rules, one per line; '#' starts a comment line. Example: "
                                            "re:.*attn2.*=0.5 / glob:output_blocks.*=0"),
                    _param_input(), _models_input(), _combine_input()],
            outputs=[_output()])

    def validate(cls, rules=None, models=None):
        if rules is None:
            return True
        try:
            blocks.parse_rules(rules)
            blocks.parse_models(models if models is not None else "all")
        except ValueError as e:
            return str(e)
        return True

    def execute(cls, rules, param="weight", models="all", combine_with=None):
        bw = blocks.BlockWeights.from_rules(rules, param=param, models=models)
        return io.NodeOutput(_with(bw, combine_with))

    return _node("MergeLabBlockRules", define_schema, execute, "Regex/glob block weights.", validate)


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
def _combine_node() -> type:
    def define_schema(cls):
        tip = "Block weights to combine (entries on the same parameter multiply)."
        return io.Schema(
            node_id="MergeLab_CombineBlockWeights", display_name="Combine Block Weights", category=CATEGORY,
            description="All entries of the inputs in one BLOCK_WEIGHTS: factors on the same parameter "
                        "multiply, factors on different parameters apply side by side.",
            inputs=[BlockWeightsType.Input("a", tooltip=tip), BlockWeightsType.Input("b", tooltip=tip),
                    BlockWeightsType.Input("c", optional=True, tooltip=tip),
                    BlockWeightsType.Input("d", optional=True, tooltip=tip)],
            outputs=[_output()])

    def execute(cls, a, b, c=None, d=None):
        return io.NodeOutput(blocks.combine(a, b, c, d))

    return _node("MergeLabCombineBlockWeights", define_schema, execute, "Combine block weights.")


def build_nodes() -> list:
    return [_mbw_node(), _rules_node(), _combine_node(), *[make_arch_node(a) for a in blocks.architectures()]]


BLOCK_NODES = build_nodes()
