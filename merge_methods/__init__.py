"""MergeLab's merge methods: pure torch, no ComfyUI import, usable on its own.

    import merge_methods
    merge_methods.names()                       # every method name
    m = merge_methods.create("ties", normalize=True)
    out = m.merge(base, [a, b], key="x.weight", seed=0, weight=[1.0, 0.5], density=0.2)
    m2 = merge_methods.from_dict(m.to_dict())   # recipes

Every method is declared once (see ``spec.merge_method``); its parameter spec drives validation,
node widgets, tooltips and the docs.
"""
from .errors import MergeError
from .context import MergeContext, key_seed
from .spec import (BASE_NONE, BASE_OPTIONAL, BASE_REQUIRED, MergeMethod, MethodSpec, Param, all_specs, create,
                   from_dict, get_spec, merge_method, names, reuse_buffers, slices, SpanInputs)

# importing the method modules registers them
from . import linear, task_arithmetic, sce, model_stock  # noqa: E402,F401  (mergekit's linear family)
from . import ram  # noqa: E402,F401  (mergekit's RAM and RAM+ for sparse fine-tunes)
from . import spherical, simple  # noqa: E402,F401  (slerp family, nearswap, fusion, ComfyUI's own)
from . import sd_optim  # noqa: E402,F401  (sd-optim / sd-mecha methods, geometric median)
from . import rotate  # noqa: E402,F401  (sd-mecha's orthogonal Procrustes alignment)
from . import sd_mecha_methods  # noqa: E402,F401  (sd-mecha: crossover, add_cosine_a/b, tensor_sum, geometric_sum)
from . import meh  # noqa: E402,F401  (supermerger's triple / twice sums, meh's add-difference family)

__all__ = ["MergeError", "MergeContext", "MergeMethod", "MethodSpec", "Param", "create", "from_dict", "names",
           "get_spec", "all_specs", "merge_method", "key_seed", "reuse_buffers", "slices", "SpanInputs",
           "BASE_NONE", "BASE_OPTIONAL", "BASE_REQUIRED"]
