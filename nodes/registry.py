"""Collects every node class of the pack, in menu order."""


def all_nodes():
    from .method_nodes import METHOD_NODES

    return [*METHOD_NODES]
