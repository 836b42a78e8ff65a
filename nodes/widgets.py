"""Node widgets derived from merge-method parameter specs (never written by hand per method)."""
from __future__ import annotations

from ..merge_methods import spec as mspec
from .comfy_api_compat import io

_ACRONYMS = {"ties": "TIES", "dare": "DARE", "della": "DELLA", "sce": "SCE", "slerp": "SLERP",
             "nuslerp": "NuSLERP", "multislerp": "Multi-SLERP", "lowrank": "Low-rank"}


def method_title(name: str) -> str:
    """'dare_ties' -> 'DARE TIES'; 'weighted_sum' -> 'Weighted Sum'."""
    return " ".join(_ACRONYMS.get(part, part.capitalize()) for part in name.split("_"))


def tooltip(param: mspec.Param) -> str:
    extra = ""
    if param.kind in (mspec.FLOAT, mspec.INT) and (param.min is not None or param.max is not None):
        extra = f" Range {param.range_text()}."
    return f"{param.help}{extra} Default {param.default!r}."


def widget_input(param: mspec.Param, name: str | None = None, optional: bool = False):
    """A V3 input for ``param`` with its default, range, step and tooltip."""
    name = name or param.name
    tip = tooltip(param)
    if param.kind == mspec.FLOAT:
        step = param.step or 0.001
        lo = -1e9 if param.min is None else param.min
        hi = 1e9 if param.max is None else param.max
        # the widget's bounds are inclusive: an excluded bound moves in by one step, so the widget never
        # offers a value the method refuses
        if param.min is not None and param.min_exclusive:
            lo = param.min + step
        if param.max is not None and param.max_exclusive:
            hi = param.max - step
        return io.Float.Input(name, default=float(param.default), min=lo, max=hi,
                              step=step, round=False, tooltip=tip, optional=optional)
    if param.kind == mspec.INT:
        lo = -(2**31) if param.min is None else int(param.min)
        hi = 2**31 - 1 if param.max is None else int(param.max)
        return io.Int.Input(name, default=int(param.default), min=lo, max=hi, step=int(param.step or 1),
                            tooltip=tip, optional=optional)
    if param.kind == mspec.BOOL:
        return io.Boolean.Input(name, default=bool(param.default), tooltip=tip, optional=optional)
    if param.kind == mspec.CHOICE:
        return io.Combo.Input(name, options=list(param.choices), default=param.default, tooltip=tip,
                              optional=optional)
    raise ValueError(f"no widget for parameter kind {param.kind!r}")
