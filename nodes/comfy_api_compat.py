"""The one place that imports ComfyUI's node API.

``comfy_api.v0_0_2`` exists in ComfyUI 0.3.64 and 0.3.75 (and newer); we use only Schema fields that
both have (no ``search_aliases``).
"""
from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401

__all__ = ["ComfyExtension", "io"]
