"""Helpers shared by the LoRA integration tests."""
import importlib

VALUES = {}


class LoraValueNode:
    """Test node (``MergeLabTest_LoraValue``): hands a LORA prepared by the test into the graph."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("LORA",)
    FUNCTION = "get"
    CATEGORY = "testing"

    def get(self, key):
        return (VALUES[key],)


def pack(harness, sub):
    """A module of the pack as ComfyUI's loader imported it."""
    return importlib.import_module(f"{harness.pack_module_name}.{sub}")
