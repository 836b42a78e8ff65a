"""Custom socket types of the pack.  The type strings are an interface: other tools depend on them."""
from .comfy_api_compat import io

MergeMethodType = io.Custom("MERGE_METHOD")
BlockWeightsType = io.Custom("BLOCK_WEIGHTS")
ModelMaskType = io.Custom("MODEL_MASK")
LoraType = io.Custom("LORA")
ModelListType = io.Custom("MERGE_MODELS")
