"""MergeLab's engine: walks the keys of ComfyUI patchers, resolves block weights and masks, moves
tensors to the compute device and back, and returns patched clones.  The nodes are thin wrappers
around it; the math itself lives in ``merge_methods``.
"""
