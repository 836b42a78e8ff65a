"""MergeLab: merge diffusion models and LoRAs in ComfyUI.

ComfyUI loads this folder as a custom node pack.  Nodes are registered through the V3 schema only
(``comfy_entrypoint``); there is deliberately no ``NODE_CLASS_MAPPINGS`` (ComfyUI would ignore the
entrypoint if both existed).  The frontend extension lives in ``js/``.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import MergeLabExtension

    return MergeLabExtension()
