"""Collects every node class of the pack, in menu order."""


def all_nodes():
    from .block_nodes import BLOCK_NODES
    from .mask_nodes import MASK_NODES
    from .method_nodes import METHOD_NODES
    from .merger_nodes import MERGER_NODES
    from .lora_nodes import LORA_NODES
    from .save_nodes import SAVE_NODES

    return [*MERGER_NODES, *METHOD_NODES, *LORA_NODES, *SAVE_NODES, *BLOCK_NODES, *MASK_NODES]
