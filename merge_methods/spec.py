"""Parameter specs, the method registry and the immutable MergeMethod object.

A merge method is declared once, with :func:`merge_method`: a small function plus a tuple of
:class:`Param`.  Validation, node widgets, tooltips and the README's method table are all derived
from that declaration; nothing else describes a method.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import MergeError
from .context import MergeContext

FLOAT, INT, BOOL, CHOICE = "float", "int", "bool", "choice"
BASE_REQUIRED, BASE_OPTIONAL, BASE_NONE = "required", "optional", "none"


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters take one value per input model (a list aligned with ``models``; a
    scalar means the same value for all).  ``scalable`` marks per-model numeric parameters that
    block weights may scale (weight, density, t, ...).
    """

    name: str
    kind: str
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    choices: Tuple[str, ...] = ()
    per_model: bool = False
    min_exclusive: bool = False
    max_exclusive: bool = False

    def coerce(self, value: Any, where: str) -> Any:
        """Convert ``value`` to this parameter's type and check its range; raise MergeError."""
        if self.kind == BOOL:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise MergeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
            if isinstance(value, (bool, int, float)) and not isinstance(value, torch.Tensor):
                return bool(value)
            raise MergeError(f"{where}: parameter '{self.name}' must be a boolean, got {value!r}")
        if self.kind == CHOICE:
            if value not in self.choices:
                raise MergeError(
                    f"{where}: parameter '{self.name}' must be one of {list(self.choices)}, got {value!r}")
            return value
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise MergeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}") from None
        if not math.isfinite(num):
            raise MergeError(f"{where}: parameter '{self.name}' must be finite, got {value!r}")
        if self.kind == INT:
            if num != int(num):
                raise MergeError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}")
            num = int(num)
        lo_bad = self.min is not None and (num <= self.min if self.min_exclusive else num < self.min)
        hi_bad = self.max is not None and (num >= self.max if self.max_exclusive else num > self.max)
        if lo_bad or hi_bad:
            raise MergeError(f"{where}: parameter '{self.name}' = {value!r} is outside its range {self.range_text()}")
        return num

    def range_text(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"{'(' if self.min_exclusive else '['}{lo}, {hi}{')' if self.max_exclusive else ']'}"

    def describe(self) -> Dict[str, Any]:
        """A plain-JSON description (used for docs, tooltips and the frontend)."""
        d = {"name": self.name, "type": self.kind, "default": self.default, "per_model": self.per_model,
             "help": self.help}
        if self.kind in (FLOAT, INT):
            d.update(min=self.min, max=self.max, step=self.step)
        if self.kind == CHOICE:
            d["choices"] = list(self.choices)
        return d


@dataclass(frozen=True)
class MethodSpec:
    """Everything known about one method: its function, parameters and structural needs."""

    name: str
    fn: Callable[..., torch.Tensor] = field(compare=False)
    params: Tuple[Param, ...]
    base: str
    min_models: int
    max_models: Optional[int]
    help: str
    source: str
    randomized: bool = False
    #: the result at each element depends only on the inputs at that element (no whole-tensor norms,
    #: ranks or random draws), so the CPU path may merge a large tensor slice by slice
    elementwise: bool = False
    #: optional CPU implementation for large tensors that reads the inputs span by span (see
    #: :func:`merge_method`); compared by identity like ``fn``
    streamed: Optional[Callable[..., Optional[torch.Tensor]]] = field(default=None, compare=False)
    check: Optional[Callable[[Mapping[str, Any], Mapping[str, List[Any]]], Optional[str]]] = field(
        default=None, compare=False)
    #: the result is model 1 changed (A + ...: add_difference and its kin), not the base changed: a model
    #: merger returns a copy of model 1, with its settings and its layers (an inpainting A stays one)
    result_is_model1: bool = False

    @property
    def global_params(self) -> Tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def per_model_params(self) -> Tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MergeError(f"merge method '{self.name}' has no parameter '{name}' "
                         f"(its parameters: {', '.join(p.name for p in self.params) or 'none'})")

    def models_text(self) -> str:
        if self.max_models is None:
            return f"{self.min_models}+"
        if self.max_models == self.min_models:
            return str(self.min_models)
        return f"{self.min_models}-{self.max_models}"

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "help": self.help, "source": self.source, "base": self.base,
                "models": self.models_text(), "randomized": self.randomized,
                "result": "model 1" if self.result_is_model1 else "base",
                "params": [p.describe() for p in self.params]}


_REGISTRY: Dict[str, MethodSpec] = {}

#: appended to the help of every ``result_is_model1`` method
RESULT_IS_MODEL1_HELP = (" The Model / CLIP Merger returns a copy of model 1 (A) with its settings; an inpainting or "
                         "instruct-pix2pix A (more input channels than the others) stays one: its first input layer "
                         "is merged on the channels all share and keeps its extra ones.")


def merge_method(name: str, *, params: Sequence[Param] = (), base: str = BASE_REQUIRED, min_models: int = 1,
                 max_models: Optional[int] = None, help: str, source: str, randomized: bool = False,
                 elementwise: bool = False, streamed: Optional[Callable] = None,
                 check: Optional[Callable] = None, result_is_model1: bool = False):
    """Register ``fn(base, models, ctx, **params)`` as a merge method.

    ``models`` reaches ``fn`` as one fp32 tensor stacked over models (shape ``(N, *shape)``),
    ``base`` as an fp32 tensor or None, each per-model parameter as an fp32 tensor of shape ``(N,)``
    (bools and choices as tuples), each global one as a Python scalar.  ``fn`` returns an fp32
    tensor of the input shape; dtype and device of the result are handled by :class:`MergeMethod`.
    ``check(global_values, per_model_values)`` returns an error text for cross-parameter rules.
    ``elementwise``: ``fn`` of a slice of the flattened inputs is that slice of ``fn``'s result (such
    methods are merged in cache-sized slices on the CPU).
    ``streamed(inputs, ctx, **params)``: for a method that is not elementwise, an optional CPU
    implementation for tensors longer than one slice, reading the inputs span by span from a
    :class:`SpanInputs` (several passes, no whole-tensor stack); it returns the merged tensor
    (``inputs.new_output()``), bit-identical to ``fn``'s, or None to leave settings it does not cover
    to ``fn``.
    ``result_is_model1``: the method computes model 1 plus something (it needs a base); mergers then return
    a changed copy of model 1 instead of the base.
    """
    if base not in (BASE_REQUIRED, BASE_OPTIONAL, BASE_NONE):
        raise ValueError(f"bad base requirement {base!r}")
    if elementwise and randomized:
        raise ValueError(f"merge method {name!r}: a randomized method cannot be elementwise (its draws "
                         f"would depend on the slicing)")
    if result_is_model1 and base != BASE_REQUIRED:
        raise ValueError(f"merge method {name!r}: result_is_model1 is for methods that take a base")
    if elementwise and streamed is not None:
        raise ValueError(f"merge method {name!r}: an elementwise method is already merged span by span; "
                         f"it takes no streamed implementation")

    def register(fn):
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"merge method {name!r} declares a parameter twice")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, params=tuple(params), base=base, min_models=min_models,
                                     max_models=max_models,
                                     help=help + (RESULT_IS_MODEL1_HELP if result_is_model1 else ""), source=source, randomized=randomized,
                                     elementwise=elementwise, streamed=streamed, check=check,
                                     result_is_model1=result_is_model1)
        return fn

    return register


def get_spec(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def all_specs() -> List[MethodSpec]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class MergeMethod:
    """An immutable, hashable merge method with its global parameter values.

    Build with :func:`merge_methods.create`; apply with :meth:`merge`.  Per-model parameters may
    also be given here, as defaults that ``merge`` keyword arguments override.
    """

    name: str
    params: Tuple[Tuple[str, Any], ...]

    @property
    def spec(self) -> MethodSpec:
        return get_spec(self.name)

    def get(self, name: str) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        return self.spec.param(name).default

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.name,
                "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"MergeMethod({self.name}{', ' if args else ''}{args})"

    # -- merging ---------------------------------------------------------------------------
    def per_model_values(self, n_models: int, overrides: Mapping[str, Any], where: str = "") -> Dict[str, List[Any]]:
        """Resolve every per-model parameter to a validated list of ``n_models`` values."""
        spec = self.spec
        where = where or f"merge method '{self.name}'"
        unknown = [k for k in overrides if not spec.param(k).per_model]
        if unknown:
            raise MergeError(f"{where}: '{unknown[0]}' is a global parameter; set it in create(), not merge()")
        out: Dict[str, List[Any]] = {}
        for p in spec.per_model_params:
            raw = overrides[p.name] if p.name in overrides else self.get(p.name)
            if isinstance(raw, torch.Tensor):
                raw = raw.tolist()
            if isinstance(raw, (list, tuple)):
                if len(raw) != n_models:
                    raise MergeError(f"{where}: per-model parameter '{p.name}' has {len(raw)} values "
                                     f"for {n_models} models")
                vals = [p.coerce(v, where) for v in raw]
            else:
                vals = [p.coerce(raw, where)] * n_models
            out[p.name] = vals
        return out

    def check_values(self, n_models: int, overrides: Mapping[str, Any], where: str = "") -> Dict[str, List[Any]]:
        """:meth:`per_model_values`, with the method's own rule across parameters (such as della's
        density ± epsilon) checked too: what :meth:`merge` checks for every tensor, callable once up front."""
        where = where or f"merge method '{self.name}'"
        pm = self.per_model_values(n_models, overrides, where)
        if self.spec.check is not None:
            problem = self.spec.check({p.name: self.get(p.name) for p in self.spec.global_params}, pm)
            if problem:
                raise MergeError(f"{where}: {problem}")
        return pm

    @torch.no_grad()
    def merge(self, base: Optional[torch.Tensor], models: Sequence[torch.Tensor], *, key: str = "",
              seed: int = 0, check_finite: bool = True, **per_model_params: Any) -> torch.Tensor:
        """Merge one tensor.  Returns a tensor with base's dtype and device (models[0]'s without base).
        The math runs in fp32, or in fp64 when the base or a model is fp64 (a caller's choice of a wider
        compute dtype).  Runs without autograd: model weights are often parameters with requires_grad set,
        and the methods work in place on their buffers."""
        spec = self.spec
        where = f"merge method '{self.name}'" + (f", key '{key}'" if key else "")
        if isinstance(models, torch.Tensor):
            raise MergeError(f"{where}: 'models' must be a list of tensors, not one tensor")
        models = list(models)
        n = len(models)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            raise MergeError(f"{where}: takes {spec.models_text()} model(s) besides the base, got {n}")
        if spec.base == BASE_REQUIRED and base is None:
            raise MergeError(f"{where}: needs a base model")
        if spec.base == BASE_NONE and base is not None:
            raise MergeError(f"{where}: takes no base model; pass base=None")
        ref = base if base is not None else models[0]
        for i, m in enumerate(models):
            if not isinstance(m, torch.Tensor):
                raise MergeError(f"{where}: model {i + 1} is not a tensor ({type(m).__name__})")
            if m.shape != ref.shape:
                raise MergeError(f"{where}: shape mismatch: model {i + 1} has shape {tuple(m.shape)}, "
                                 f"{'base' if base is not None else 'model 1'} has {tuple(ref.shape)}")
        pm = self.check_values(n, per_model_params, where)
        glob = {p.name: self.get(p.name) for p in spec.global_params}

        if ref.numel() == 0:            # nothing to merge (some methods' 2-D views cannot take 0 columns)
            return torch.empty_like(ref)
        device = ref.device
        work_device = device
        work_dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in [base] + models) \
            else torch.float32
        pm_args: Dict[str, Any] = {}
        for p in spec.per_model_params:
            if p.kind in (FLOAT, INT):
                pm_args[p.name] = torch.tensor(pm[p.name], dtype=work_dtype, device=work_device)
            else:
                pm_args[p.name] = tuple(pm[p.name])
        ctx = MergeContext(key=key, seed=int(seed), device=work_device, host=pm, workspace=_uniform_buffer)
        if device.type == "cpu" and ref.numel() > SLICE and work_dtype == torch.float32:
            if spec.elementwise:
                return self._merge_sliced(SpanInputs(where, base, models, check_finite), ctx, glob, pm_args)
            if spec.streamed is not None:
                out = spec.streamed(SpanInputs(where, base, models, check_finite), ctx, **glob, **pm_args)
                if out is not None:
                    return out
        stacked = _stack_buffer((n,) + tuple(ref.shape), work_device, work_dtype)
        for i, m in enumerate(models):
            stacked[i].copy_(m)
        b32 = None
        if base is not None:
            b32 = base.to(device=work_device, dtype=work_dtype)
        if check_finite:
            _check_finite(where, b32, stacked)
        out = spec.fn(b32, stacked, ctx, **glob, **pm_args)
        if out.shape != ref.shape:
            raise AssertionError(f"{where}: method returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        out = out.to(device=device, dtype=ref.dtype)
        if _WS.buffers is not None and out.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr():
            out = out.clone()           # a view of the reused buffer (passthrough): the next merge overwrites it
        return out

    def _merge_sliced(self, inputs: "SpanInputs", ctx: MergeContext, glob: Dict[str, Any],
                      pm_args: Dict[str, Any]) -> torch.Tensor:
        """An elementwise method on the CPU, slice by slice of the flattened tensor: the stacked inputs
        and every temporary stay a few MiB (in cache, and recycled by the allocator instead of being
        mapped and faulted in anew for each key); the result is the same, bit for bit."""
        out = inputs.new_output()
        for j in range(len(inputs.spans)):
            b32, stacked = inputs.read(j, check=True)
            inputs.write(out, j, self.spec.fn(b32, stacked, ctx, **glob, **pm_args))
        return out


class SpanInputs:
    """The inputs of one merge, read span by span (:func:`slices`) as fp32 for the CPU paths that never
    stack whole tensors: elementwise methods and the ``streamed`` implementations of the others.

    :meth:`read` gives span ``j`` of the base and of the models stacked ``(N, span)``, in a buffer that
    the next :meth:`read` reuses (the base's fp32 span too, unless it is a view of the caller's fp32
    tensor); the caller may modify the stack in place but never the base slice."""

    def __init__(self, where: str, base: Optional[torch.Tensor], models: Sequence[torch.Tensor], check_finite: bool):
        self.where, self.check_finite = where, check_finite
        self.ref = base if base is not None else models[0]
        self._base, self._models = base, list(models)
        self.base = base.reshape(-1) if base is not None else None
        self.models = [m.reshape(-1) for m in models]
        self.numel = self.ref.numel()
        self.n_models = len(self.models)
        self.spans = slices(self.numel, self.ref.device)

    def read(self, j: int, check: bool = False) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Span ``j`` as ``(base fp32 or None, models stacked fp32)``; ``check`` also rejects NaN/Inf there
        (when the merge checks its inputs)."""
        stacked, b32 = self._buffers(j)
        s, e = self.spans[j]
        for i, m in enumerate(self.models):
            stacked[i].copy_(m[s:e])
        if check and self.check_finite:
            try:
                _check_finite(self.where, b32, stacked)
            except MergeError:
                # name the models the way a whole-tensor check does
                _check_finite(self.where, None if self._base is None else self._base.float(),
                              torch.stack([m.float() for m in self._models]))
                raise
        return b32, stacked

    def read_deltas(self, j: int, check: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Span ``j`` as ``(base fp32, models − base stacked fp32)``, the same bits as :meth:`read` and a
        subtraction.  Needs a base.  ``check``: NaN/Inf in the inputs make every
        difference they touch non-finite, so only spans with a non-finite difference get the inputs
        checked (differences of finite weights that overflow are no error, as in :meth:`read`)."""
        stacked, b32 = self._buffers(j)
        s, e = self.spans[j]
        for i, m in enumerate(self.models):
            if m.dtype == torch.float32:
                torch.sub(m[s:e], b32, out=stacked[i])
            else:       # convert, then subtract: a sub of mixed dtypes converts into a temporary on the CPU
                stacked[i].copy_(m[s:e]).sub_(b32)
        if check and self.check_finite and not _all_finite(stacked):
            self.read(j, check=True)        # raises for NaN/Inf in an input; else (it reused the buffer)
            return self.read_deltas(j)      # the differences again
        return b32, stacked

    def _buffers(self, j: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (N, span) stack to fill for span ``j``, and the span of the base as fp32 (None without a base):
        a view of the base when it is fp32, else converted into a row of the same reused buffer (a new
        tensor per span would be mapped and faulted in anew: such a conversion costs 2-3x a copy)."""
        s, e = self.spans[j]
        convert = self.base is not None and self.base.dtype != torch.float32
        buf = _stack_buffer((self.n_models + int(convert), e - s), self.ref.device)
        if self.base is None:
            return buf, None
        if not convert:
            return buf, self.base[s:e]
        return buf[:self.n_models], buf[self.n_models].copy_(self.base[s:e])

    def deltas_finite(self, j: int, stacked: torch.Tensor, rows) -> bool:
        """Whether ``rows`` of span ``j``'s differences (from :meth:`read_deltas`) are free of NaN/Inf, or the
        merge does not check its inputs."""
        return not self.check_finite or all(_all_finite(stacked[i]) for i in rows)

    def check_span(self, j: int) -> None:
        """Raise the merge's error when span ``j`` of an input holds NaN/Inf (and the merge checks its
        inputs); for a span whose differences were found non-finite.  Reuses the buffer of
        :meth:`read_deltas`."""
        if self.check_finite:
            self.read(j, check=True)

    def strided(self, stride: int) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Every ``stride``-th element, from 0: ``(base fp32 or None, models stacked fp32)`` (new tensors)."""
        b = self.base[::stride].to(torch.float32) if self.base is not None else None
        return b, torch.stack([m[::stride].to(torch.float32) for m in self.models])

    def new_output(self) -> torch.Tensor:
        """The result tensor: the base's (else the first model's) shape, dtype and device."""
        return torch.empty(self.ref.shape, dtype=self.ref.dtype, device=self.ref.device)

    def write(self, out: torch.Tensor, j: int, values: torch.Tensor) -> None:
        s, e = self.spans[j]
        out.view(-1)[s:e].copy_(values)


class _Workspace(threading.local):
    buffers: Optional[Dict[object, torch.Tensor]] = None     # {device: stack buffer, "uniform": draws}


_WS = _Workspace()


@contextlib.contextmanager
def reuse_buffers():
    """Within the block, :meth:`MergeMethod.merge` stacks its inputs into one fp32 buffer per device that
    is reused from call to call (per thread) instead of a new tensor each time.  Merging a model key by
    key, a fresh buffer per key costs more than copying into it (the memory must be faulted in anew);
    stacks over 256 MiB get their own tensor as outside the block (elementwise methods
    stack only slices, so this is for the methods that need whole tensors, e.g. TIES on 2 models of the
    largest SD1.5 and SDXL weights).  Transient random draws (:meth:`MergeContext.uniform`) get a second
    reused CPU buffer, up to 256 MiB too.  Both are freed when the outermost block ends."""
    outer = _WS.buffers is None
    if outer:
        _WS.buffers = {}
    try:
        yield
    finally:
        if outer:
            _WS.buffers = None


#: elements per slice when a tensor is merged slice by slice on the CPU (4 MiB of fp32: a few of them
#: fit the L2/L3 caches, and allocations this size are recycled instead of mapped anew)
SLICE = 1 << 20


def slices(n: int, device: torch.device, length: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[start, end)`` spans covering ``range(n)``: ``length`` (default :data:`SLICE`) long on the CPU, one
    span elsewhere (a GPU has no use for slicing: its caching allocator recycles memory and launches cost
    more)."""
    step = (length or SLICE) if device.type == "cpu" else max(n, 1)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


_BUFFER_MAX = 64 << 20     # elements (256 MiB): larger stacks get their own tensor, freed at once


def _reused(slot, numel: int, device: torch.device) -> Optional[torch.Tensor]:
    """Within :func:`reuse_buffers`, the fp32 buffer of ``slot`` (per thread), grown to at least ``numel``
    elements; None outside the block or over 256 MiB."""
    if _WS.buffers is None or numel > _BUFFER_MAX:
        return None
    buf = _WS.buffers.get(slot)
    if buf is None or buf.numel() < numel:
        _WS.buffers[slot] = None
        del buf
        buf = _WS.buffers[slot] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def _stack_buffer(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    numel = math.prod(shape)
    buf = _reused(device, numel, device) if dtype == torch.float32 else None
    return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf[:numel].view(shape)


def _uniform_buffer(numel: int) -> Optional[torch.Tensor]:
    """The CPU buffer that transient random draws reuse (:meth:`MergeContext.uniform`), or None."""
    return _reused("uniform", numel, torch.device("cpu"))


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``: one min/max reduction (NaN and ±Inf propagate into it)."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _check_finite(where: str, base: Optional[torch.Tensor], stacked: torch.Tensor) -> None:
    """One min/max reduction per input; the slow per-model search only runs when something is wrong."""
    if base is not None and not _all_finite(base):
        raise MergeError(f"{where}: the base tensor contains NaN or Inf")
    if not _all_finite(stacked):
        bad = ~torch.isfinite(stacked.reshape(stacked.shape[0], -1)).all(dim=1)
        idx = [i for i, b in enumerate(bad.tolist()) if b]
        named = ", ".join(f"model {i + 1}" for i in idx)        # as the nodes number them, from 1
        raise MergeError(f"{where}: {named} {'contains' if len(idx) == 1 else 'contain'} NaN or Inf")


def create(name: str, **params: Any) -> MergeMethod:
    """Create a MergeMethod, validating every given parameter against the spec."""
    spec = get_spec(name)
    where = f"merge method '{name}'"
    values = []
    # every global parameter is stored (defaults filled in), so equal settings compare and hash equal
    params = {**{p.name: p.default for p in spec.global_params}, **params}
    for k in sorted(params):
        p = spec.param(k)
        v = params[k]
        if p.per_model and isinstance(v, (list, tuple)):
            v = tuple(p.coerce(x, where) for x in v)
        else:
            v = p.coerce(v, where)
        values.append((k, _freeze(v)))
    method = MergeMethod(name=name, params=tuple(values))
    if spec.check is not None:
        glob = {p.name: method.get(p.name) for p in spec.global_params}
        # per-model values as given (a scalar default stands for every model)
        pm = {p.name: (list(method.get(p.name)) if isinstance(method.get(p.name), tuple) else [method.get(p.name)])
              for p in spec.per_model_params}
        problem = spec.check(glob, pm)
        if problem:
            raise MergeError(f"{where}: {problem}")
    return method


def from_dict(d: Mapping[str, Any]) -> MergeMethod:
    """Inverse of :meth:`MergeMethod.to_dict`."""
    if not isinstance(d, Mapping) or "method" not in d:
        raise MergeError(f"not a merge-method dict: {d!r}")
    params = d.get("params") or {}
    if not isinstance(params, Mapping):
        raise MergeError(f"merge-method dict has bad 'params': {params!r}")
    return create(d["method"], **dict(params))


def names() -> List[str]:
    return sorted(_REGISTRY)


def iter_specs() -> Iterable[MethodSpec]:
    return iter(all_specs())
