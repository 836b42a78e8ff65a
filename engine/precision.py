"""Full fp32 matrix products while MergeLab computes, whatever TF32 setting the user or another custom
node chose for sampling (``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision``
or the newer ``torch.backends.cuda.matmul.fp32_precision``).  TF32 keeps 10 mantissa bits: Karcher's
Gram matrix, the projections of the sd-optim methods and every SVD and factor product of the LoRA tools
would lose about three decimal digits on the GPU.  The setting is restored afterwards.

PyTorch refuses to read the legacy flags once the new API set a different value, so the block changes
the setting through the API that set it: the legacy one (which also updates the new one) when its
flags read consistently, else the new one."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _legacy_tf32() -> "bool | None":
    """The legacy TF32 flag of CUDA matmuls; None when PyTorch refuses to read it (new API in use)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return None


@contextmanager
def full_fp32_matmul():
    """Within the block, fp32 matmuls on CUDA run in full precision (IEEE, no TF32); usable as a
    decorator too.  A no-op when that is already the setting."""
    matmul = torch.backends.cuda.matmul
    legacy = _legacy_tf32()
    if legacy is None:
        prev = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = prev
        return
    prev = torch.get_float32_matmul_precision()
    if not legacy and prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
