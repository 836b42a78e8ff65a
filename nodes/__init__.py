"""MergeLab's ComfyUI nodes (V3 schema).  Thin: they translate widgets into engine calls.

Never import this package as plain ``nodes``: that is ComfyUI's own top-level module.
"""
from .comfy_api_compat import ComfyExtension
from .registry import all_nodes


class MergeLabExtension(ComfyExtension):
    async def get_node_list(self):
        return all_nodes()


__all__ = ["MergeLabExtension", "all_nodes"]
