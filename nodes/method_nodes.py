"""One node per merge method, generated from the method's parameter spec.

Each node shows the method's global parameters as widgets and outputs a ``MERGE_METHOD`` (an
immutable :class:`merge_methods.MergeMethod`).  Per-model parameters (weight, density, ...) are set
where the models are given, on the merger side.
"""
from __future__ import annotations

from .. import merge_methods
from ..merge_methods import MergeError
from .comfy_api_compat import io
from .types import MergeMethodType
from .widgets import method_title, widget_input

CATEGORY = "MergeLab/methods"


def node_id_for(method_name: str) -> str:
    return f"MergeLab_Method_{method_name}"


def _description(spec) -> str:
    base = {"required": "needs a base model", "optional": "base model optional", "none": "takes no base model"}
    per_model = ", ".join(p.name for p in spec.per_model_params)
    lines = [spec.help, "", f"Source: {spec.source}. Models: {spec.models_text()}; {base[spec.base]}."]
    if per_model:
        lines.append(f"Per-model parameters (set on each model input): {per_model}.")
    if spec.randomized:
        lines.append("Random: masks are seeded per key from the merger's seed.")
    return "\n".join(lines)


def make_method_node(spec) -> type:
    """Build the V3 node class for one method spec."""
    node_id = node_id_for(spec.name)
    globals_ = spec.global_params

    def define_schema(cls):
        return io.Schema(
            node_id=node_id,
            display_name=f"{method_title(spec.name)} (merge method)",
            category=CATEGORY,
            description=_description(spec),
            inputs=[widget_input(p) for p in globals_],
            outputs=[MergeMethodType.Output(display_name="method",
                                            tooltip=f"The {spec.name} merge method, for the MergeLab mergers.")],
        )

    def execute(cls, **kwargs):
        try:
            method = merge_methods.create(spec.name, **{p.name: kwargs[p.name] for p in globals_ if p.name in kwargs})
        except MergeError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(method)

    return type(f"MergeLabMethod_{spec.name}", (io.ComfyNode,), {
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "__doc__": f"Merge method node for '{spec.name}' (generated from its spec).",
    })


METHOD_NODES = [make_method_node(s) for s in merge_methods.all_specs()]
