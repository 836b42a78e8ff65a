"""MODEL_MASK: one boolean selection per parameter key, and the maskers that build them.

A mask is immutable and light:

* every key holds one *part*: a constant (``all selected`` / ``none selected``: no memory), packed bits
  (1 bit per parameter, on the CPU), or a seeded random selection (no memory: regenerated from
  ``(seed, key)`` when asked for);
* a mask knows the layout it was made for (architecture family, keys and shapes), so using it on
  another model, or combining masks of different models, is a clear error.

Semantics of a selection: ``True`` = this parameter may change (the merge result is used), ``False`` =
it keeps the base (or model 1 when there is no base).  :meth:`ModelMask.selection` is what
``engine.merge.merge_models`` calls per key.

Exact quantiles without holding all values (:func:`magnitude_mask`)
-------------------------------------------------------------------
The values ranked are ``v = |A - B|`` (or ``|A|``), non-negative fp32.  For non-negative IEEE floats the
bit pattern read as an int32 is monotone in the value (NaN patterns sort above +inf), so the k-th
smallest value is found exactly by a radix select on the bit patterns with counting passes:

1. count the top 16 bits of every value (``bincount``, 32768 bins) -> the bin ``b`` that holds the
   k-th smallest value and the number of values below it;
2. count the low 16 bits of the values whose top bits are ``b`` -> the exact bit pattern ``T`` of the
   k-th smallest value, the number ``L`` of values strictly below it;
3. select ``v < T`` plus the first ``k - L`` values equal to ``T`` (ties broken by key order, then by
   flat index), so exactly ``k`` entries are selected.

Counts are integers, so the result is exact and deterministic on any device.  With scope ``tensor``
one read of each key does all three steps; with scope ``block`` or ``model`` each step is one streaming
pass over the keys (three reads of each model, one key at a time), with one histogram per group;
keys whose value range lies entirely below / above ``T`` become constant parts without a third read.
``below q`` selects the ``round(q*n)`` smallest values of each group, ``above q`` the
``round((1-q)*n)`` largest (the two are complements up to that rounding).
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..merge_methods import MergeError, key_seed

SCOPES = ("tensor", "block", "model")
SELECTS = ("above", "below")
OPERATIONS = ("union", "intersection", "difference", "xor", "invert")

_CHUNK = 1 << 22          # elements per chunk in streaming loops (bounded temporaries)
_RAND_CHUNK = 1 << 20     # random draws per generator call (fixed: part of the random stream)


class MaskError(MergeError):
    """A mask does not fit the model or the other mask, or a masker got a bad argument."""


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------
def pack_bits(sel: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, any device) into ``ceil(n/8)`` uint8 on the CPU; bit ``j`` of
    byte ``i`` is element ``8*i + j`` of the flattened tensor; padding bits are 0."""
    flat = sel.reshape(-1)
    if flat.device.type == "cpu":       # numpy's packbits: one pass, 10-20x the bit loop below
        if flat.dtype != torch.bool:
            flat = flat != 0
        return torch.from_numpy(np.packbits(flat.contiguous().numpy(), bitorder="little"))
    n = flat.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    step = _CHUNK  # multiple of 8
    for start in range(0, n, step):
        part = flat[start:start + step]
        m = part.numel()
        pad = (-m) % 8
        if pad:
            part = torch.cat([part, part.new_zeros(pad)])
        v = part.view(-1, 8).to(torch.uint8)
        acc = v[:, 0].clone()
        for j in range(1, 8):
            acc |= v[:, j] << j
        out[start // 8:start // 8 + acc.numel()] = acc.cpu()
    return out


def unpack_bits(bits: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``n`` elements on ``device``."""
    if torch.device(device).type == "cpu":
        flat = np.unpackbits(bits.contiguous().numpy(), count=n, bitorder="little")
        return torch.from_numpy(flat.view(np.bool_))
    b = bits.to(device)
    out = torch.empty(b.numel() * 8, dtype=torch.bool, device=device)
    view = out.view(-1, 8)
    for j in range(8):
        view[:, j] = (b >> j) & 1
    return out[:n]


def popcount(bits: torch.Tensor) -> int:
    """Set bits of a uint8 tensor (SWAR bit counting per byte, in chunks; one host sync)."""
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHUNK):
        x = bits[start:start + _CHUNK]
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        total += ((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64)
    return int(total)


def _pad_fix(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Clear the padding bits of the last byte (in place) so counts and comparisons stay exact."""
    r = n % 8
    if r:
        bits[-1] &= (1 << r) - 1
    return bits


# ---------------------------------------------------------------------------------------------
# per-key parts
# ---------------------------------------------------------------------------------------------
class _Part:
    __slots__ = ()
    const: Optional[bool] = None

    def nbytes(self) -> int:
        return 0


class _Const(_Part):
    __slots__ = ("value",)

    def __init__(self, value: bool):
        object.__setattr__(self, "value", bool(value))

    @property
    def const(self):  # type: ignore[override]
        return self.value

    def __setattr__(self, *a):
        raise AttributeError("mask parts are immutable")


ALL = _Const(True)
NONE = _Const(False)


class _Bits(_Part):
    __slots__ = ("bits",)

    def __init__(self, bits: torch.Tensor):
        object.__setattr__(self, "bits", bits)

    def nbytes(self) -> int:
        return self.bits.numel()

    def __setattr__(self, *a):
        raise AttributeError("mask parts are immutable")


class _Random(_Part):
    """Each entry selected with probability ``density`` (``u < density`` for uniform ``u`` drawn from a
    CPU generator seeded by ``(seed, key)``); ``inverted`` selects the complement (``u >= density``)."""

    __slots__ = ("seed", "density", "inverted")

    def __init__(self, seed: int, density: float, inverted: bool = False):
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "density", float(density))
        object.__setattr__(self, "inverted", bool(inverted))

    def __setattr__(self, *a):
        raise AttributeError("mask parts are immutable")

    def dense_cpu(self, key: str, n: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(key_seed(self.seed, key))
        out = torch.empty(n, dtype=torch.bool)
        for start in range(0, n, _RAND_CHUNK):
            m = min(_RAND_CHUNK, n - start)
            u = torch.rand(m, generator=gen, dtype=torch.float32)
            if self.inverted:
                torch.ge(u, self.density, out=out[start:start + m])
            else:
                torch.lt(u, self.density, out=out[start:start + m])
        return out


def _part_from_selection(sel: torch.Tensor) -> _Part:
    bits = pack_bits(sel)
    count = popcount(bits)          # (a bool tensor's sum is ~50x slower than counting its packed bits)
    if count == sel.numel():
        return ALL
    if count == 0:
        return NONE
    return _Bits(bits)


# ---------------------------------------------------------------------------------------------
# layout: what a mask was made for
# ---------------------------------------------------------------------------------------------
class MaskLayout:
    """The architecture family, keys and shapes a mask was made for (immutable)."""

    __slots__ = ("family", "keys", "shapes", "numels", "index", "fingerprint")

    def __init__(self, family: str, keys: Sequence[str], shapes: Sequence[Sequence[int]]):
        keys = tuple(keys)
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        if len(keys) != len(shapes):
            raise ValueError("keys and shapes differ in length")
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys in a mask layout")
        h = hashlib.blake2b(digest_size=16)
        h.update(family.encode())
        for k, s in zip(keys, shapes):
            h.update(b"\x00" + k.encode() + b"\x01" + ",".join(map(str, s)).encode())
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "numels", tuple(math.prod(s) for s in shapes))
        object.__setattr__(self, "index", {k: i for i, k in enumerate(keys)})
        object.__setattr__(self, "fingerprint", h.hexdigest())

    def __setattr__(self, *a):
        raise AttributeError("MaskLayout is immutable")

    @classmethod
    def of(cls, obj) -> "MaskLayout":
        """The layout of a MODEL patcher or CLIP (the keys a merge would walk)."""
        from .weights import KeySource, model_family

        src = KeySource.of(obj)
        keys = src.keys()
        return cls(model_family(obj), keys, [tuple(src.shape(k)) for k in keys])

    def __eq__(self, other):
        return isinstance(other, MaskLayout) and other.fingerprint == self.fingerprint

    def __hash__(self):
        return hash(self.fingerprint)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def describe(self) -> str:
        return f"{self.family} ({len(self.keys)} keys, {self.total:,} parameters)"

    def diff_text(self, other: "MaskLayout", mine: str = "the mask", theirs: str = "the model") -> str:
        """Why two layouts differ, in words."""
        parts = []
        if self.family.split(":")[0] != other.family.split(":")[0]:
            parts.append(f"{mine} was made for {self.family}, {theirs} is {other.family}")
        missing = [k for k in other.keys if k not in self.index]
        extra = [k for k in self.keys if k not in other.index]
        shape_bad = [f"{k} {self.shapes[self.index[k]]} vs {other.shapes[i]}"
                     for i, k in enumerate(other.keys) if k in self.index and self.shapes[self.index[k]] != other.shapes[i]]
        if missing:
            parts.append(f"{len(missing)} key(s) of {theirs} missing in {mine}: {_preview(missing)}")
        if extra:
            parts.append(f"{len(extra)} key(s) of {mine} not in {theirs}: {_preview(extra)}")
        if shape_bad:
            parts.append(f"{len(shape_bad)} key(s) with other shapes: {_preview(shape_bad)}")
        if not parts:
            parts.append(f"{mine} was made for {self.family}, {theirs} is {other.family}")
        return "; ".join(parts)


def _preview(items: List[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# the mask
# ---------------------------------------------------------------------------------------------
class ModelMask:
    """An immutable boolean selection per parameter key (the value of a MODEL_MASK socket)."""

    __slots__ = ("layout", "_parts", "label")

    def __init__(self, layout: MaskLayout, parts: Mapping[str, _Part], label: str = ""):
        missing = [k for k in layout.keys if k not in parts]
        if missing:
            raise ValueError(f"mask parts missing for {_preview(missing)}")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "_parts", {k: parts[k] for k in layout.keys})
        object.__setattr__(self, "label", label)

    def __setattr__(self, *a):
        raise AttributeError("ModelMask is immutable; mask operations return new masks")

    def __repr__(self) -> str:
        return f"ModelMask({self.label or 'mask'} on {self.layout.describe()})"

    # -- checks -----------------------------------------------------------------------------
    def check(self, obj_or_layout, keys: Optional[Iterable[str]] = None, what: str = "the model") -> None:
        """Raise MaskError unless this mask was made for ``obj_or_layout`` (a MODEL, CLIP or layout).
        ``keys``: the keys a merge will walk (must all be in the mask with the model's shapes)."""
        other = obj_or_layout if isinstance(obj_or_layout, MaskLayout) else MaskLayout.of(obj_or_layout)
        if other == self.layout and keys is None:
            return
        if other != self.layout:
            raise MaskError(f"this mask does not fit {what}: {self.layout.diff_text(other, theirs=what)}. "
                            f"Make the mask from {what} (or a model of the same architecture and keys).")
        bad = [k for k in keys if k not in self.layout.index]
        if bad:
            raise MaskError(f"the mask has no entry for {len(bad)} key(s): {_preview(bad)}")

    def _index(self, key: str) -> int:
        i = self.layout.index.get(key)
        if i is None:
            raise MaskError(f"the mask has no entry for key '{key}': it was made for {self.layout.describe()}. "
                            "Make the mask from the model you merge (same architecture and keys).")
        return i

    def check_compatible(self, other: "ModelMask") -> None:
        if not isinstance(other, ModelMask):
            raise MaskError(f"expected a MODEL_MASK, got {type(other).__name__}")
        if other.layout != self.layout:
            raise MaskError("the two masks were made for different models: "
                            + self.layout.diff_text(other.layout, "mask A", "mask B")
                            + ". Combine only masks made from models with the same keys and shapes.")

    # -- per-key access ---------------------------------------------------------------------
    def state(self, key: str) -> str:
        """``"all"``, ``"none"`` or ``"some"``: lets a merger skip keys that nothing selects."""
        self._index(key)
        part = self._parts[key]
        if part.const is True:
            return "all"
        if part.const is False:
            return "none"
        if isinstance(part, _Random) and part.density <= 0.0:
            return "all" if part.inverted else "none"
        if isinstance(part, _Random) and part.density > 1.0 - 2 ** -25:   # u < 1 always
            return "none" if part.inverted else "all"
        if isinstance(part, _Bits):         # a magnitude mask may select nothing (or all) of a key
            c = popcount(part.bits)
            if c == 0:
                return "none"
            if c == self.layout.numels[self.layout.index[key]]:
                return "all"
        return "some"

    def dense(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The selection of ``key`` as a bool tensor of the key's shape on ``device`` (always a tensor)."""
        i = self._index(key)
        shape, n = self.layout.shapes[i], self.layout.numels[i]
        device = torch.device(device)
        part = self._parts[key]
        if part.const is not None:
            return torch.full(shape, part.const, dtype=torch.bool, device=device)
        if isinstance(part, _Bits):
            return unpack_bits(part.bits, n, device).view(shape)
        if isinstance(part, _Random):
            return part.dense_cpu(key, n).to(device).view(shape)
        raise AssertionError(type(part))

    def shape(self, key: str) -> Tuple[int, ...]:
        """The shape of ``key``'s tensor in the model the mask was made for."""
        return self.layout.shapes[self._index(key)]

    def selection(self, key: str, shape: Sequence[int], device: torch.device | str) -> Optional[torch.Tensor]:
        """What ``engine.merge.merge_models`` asks per key: a bool tensor of ``shape`` on ``device``
        (True = take the merge result, False = keep the base / model 1), or ``None`` when every entry of
        the key is selected (nothing to mask).  Raises MaskError for a key the mask was not made for or
        a shape that differs from the one it was made for."""
        i = self._index(key)
        if tuple(int(d) for d in shape) != self.layout.shapes[i]:
            raise MaskError(f"the mask's entry for '{key}' has shape {self.layout.shapes[i]}, the model's tensor has "
                            f"{tuple(shape)}: the mask was made for another model ({self.layout.family})")
        if self.state(key) == "all":
            return None
        return self.dense(key, device)

    def count(self, key: str) -> int:
        """Number of selected entries of ``key``."""
        i = self._index(key)
        part = self._parts[key]
        if part.const is not None:
            return self.layout.numels[i] if part.const else 0
        if isinstance(part, _Bits):
            return popcount(part.bits)
        return int(self.dense(key).sum())

    def bits(self, key: str) -> torch.Tensor:
        """A copy of the packed bits of ``key`` (see :func:`pack_bits`)."""
        return self._bits(key).clone()

    def _bits(self, key: str) -> torch.Tensor:
        i = self._index(key)
        part = self._parts[key]
        n = self.layout.numels[i]
        if isinstance(part, _Bits):
            return part.bits
        if part.const is not None:
            out = torch.full(((n + 7) // 8,), 0xFF if part.const else 0, dtype=torch.uint8)
            return _pad_fix(out, n)
        return pack_bits(part.dense_cpu(key, n))

    def kind(self, key: str) -> str:
        """Storage of ``key``: const, bits or random."""
        part = self._parts[self.layout.keys[self._index(key)]]
        return "const" if part.const is not None else ("bits" if isinstance(part, _Bits) else "random")

    def nbytes(self) -> int:
        """Bytes of mask storage (packed bits; constants and random parts take none)."""
        return sum(p.nbytes() for p in self._parts.values())

    def selected_total(self, progress: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int]:
        sel = 0
        for i, k in enumerate(self.layout.keys):
            sel += self.count(k)
            if progress:
                progress(i + 1, len(self.layout.keys))
        return sel, self.layout.total

    # -- set algebra --------------------------------------------------------------------------
    def invert(self, label: str = "") -> "ModelMask":
        parts = {k: _not(p, k, n) for k, n, p in self._items()}
        return ModelMask(self.layout, parts, label or f"not ({self.label})")

    def union(self, other: "ModelMask", label: str = "") -> "ModelMask":
        return self._binary(other, "or", label or f"({self.label}) or ({other.label})")

    def intersection(self, other: "ModelMask", label: str = "") -> "ModelMask":
        return self._binary(other, "and", label or f"({self.label}) and ({other.label})")

    def difference(self, other: "ModelMask", label: str = "") -> "ModelMask":
        """A minus B = A ∧ ¬B."""
        return self._binary(other, "andnot", label or f"({self.label}) minus ({other.label})")

    def xor(self, other: "ModelMask", label: str = "") -> "ModelMask":
        """Symmetric difference."""
        return self._binary(other, "xor", label or f"({self.label}) xor ({other.label})")

    def _items(self):
        for k, n in zip(self.layout.keys, self.layout.numels):
            yield k, n, self._parts[k]

    def _binary(self, other: "ModelMask", op: str, label: str,
                progress: Optional[Callable[[int, int], None]] = None) -> "ModelMask":
        self.check_compatible(other)
        parts = {}
        total = len(self.layout.keys)
        for i, (k, n, pa) in enumerate(self._items()):
            parts[k] = _combine(op, pa, other._parts[k], k, n)
            if progress:
                progress(i + 1, total)
        return ModelMask(self.layout, parts, label)

    def apply(self, operation: str, other: Optional["ModelMask"] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> "ModelMask":
        """``operation`` in :data:`OPERATIONS`; ``other`` is required except for invert."""
        if operation not in OPERATIONS:
            raise MaskError(f"unknown mask operation {operation!r}; choose one of {', '.join(OPERATIONS)}")
        if operation == "invert":
            return self.invert()
        if other is None:
            raise MaskError(f"mask operation '{operation}' needs two masks: connect mask_b")
        op = {"union": "or", "intersection": "and", "difference": "andnot", "xor": "xor"}[operation]
        name = {"or": "or", "and": "and", "andnot": "minus", "xor": "xor"}[op]
        return self._binary(other, op, f"({self.label}) {name} ({other.label})", progress)

    # -- reports ------------------------------------------------------------------------------
    def block_counts(self, block_of: Optional[Callable[[str], str]] = None,
                     progress: Optional[Callable[[int, int], None]] = None) -> List[Tuple[str, int, int]]:
        """``[(block, selected, total)]`` in first-appearance order of the blocks."""
        block_of = block_of or default_block_of
        rows: Dict[str, List[int]] = {}
        total = len(self.layout.keys)
        for i, (k, n, _) in enumerate(self._items()):
            r = rows.setdefault(block_of(k), [0, 0])
            r[0] += self.count(k)
            r[1] += n
            if progress:
                progress(i + 1, total)
        return [(b, s, t) for b, (s, t) in rows.items()]


def _not(p: _Part, key: str, n: int) -> _Part:
    if p.const is not None:
        return NONE if p.const else ALL
    if isinstance(p, _Random):
        return _Random(p.seed, p.density, not p.inverted)
    return _Bits(_pad_fix(torch.bitwise_not(p.bits), n))


def _combine(op: str, a: _Part, b: _Part, key: str, n: int) -> _Part:
    ca, cb = a.const, b.const
    if a is b and op in ("and", "or"):
        return a
    if a is b and op in ("andnot", "xor"):
        return NONE
    if op == "and":
        if ca is False or cb is False:
            return NONE
        if ca is True:
            return b
        if cb is True:
            return a
    elif op == "or":
        if ca is True or cb is True:
            return ALL
        if ca is False:
            return b
        if cb is False:
            return a
    elif op == "andnot":
        if ca is False or cb is True:
            return NONE
        if cb is False:
            return a
        if ca is True:
            return _not(b, key, n)
    elif op == "xor":
        if ca is False:
            return b
        if cb is False:
            return a
        if ca is True:
            return _not(b, key, n)
        if cb is True:
            return _not(a, key, n)
    else:
        raise ValueError(op)
    ba = a.bits if isinstance(a, _Bits) else pack_bits(a.dense_cpu(key, n))
    bb = b.bits if isinstance(b, _Bits) else pack_bits(b.dense_cpu(key, n))
    if op == "and":
        out = ba & bb
    elif op == "or":
        out = ba | bb
    elif op == "andnot":
        out = ba & torch.bitwise_not(bb)
    else:
        out = ba ^ bb
    _pad_fix(out, n)
    c = popcount(out)
    if c == 0:
        return NONE
    if c == n:
        return ALL
    return _Bits(out)


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^([A-Za-z_]+)\.(block)?(\d+)\.")


def generic_block_of(key: str) -> str:
    """Fallback block id (comfyui-internals.md §4) when ``engine.blocks`` is not available:
    ``input_blocks.4.``, ``double_blocks.12.``, ``blocks.block7.``, ``time_embed.``, ``scale_shift_table``."""
    k = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
    m = _BLOCK_RE.match(k)
    if m:
        return m.group(0)
    i = k.find(".")
    return k[:i + 1] if i >= 0 else k


def default_block_of(key: str) -> str:
    """The block id of ``key``: ``engine.blocks.block_of`` (the pack's one block derivation, shared with
    block weights), or :func:`generic_block_of` when that module cannot be imported."""
    fn = _engine_block_of()
    return fn(key) if fn is not None else generic_block_of(key)


_BLOCKS_FN: List[Any] = []


def _engine_block_of():
    if not _BLOCKS_FN:
        try:
            from .blocks import block_of as fn
        except ImportError:  # pragma: no cover - only without engine/blocks.py
            fn = None
        _BLOCKS_FN.append(fn)
    return _BLOCKS_FN[0]


def _block_name_matches(block: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(block.rstrip("."), pattern.rstrip("."))


def block_names(layout: MaskLayout, block_of: Optional[Callable[[str], str]] = None) -> List[str]:
    block_of = block_of or default_block_of
    seen: Dict[str, None] = {}
    for k in layout.keys:
        seen.setdefault(block_of(k), None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# maskers
# ---------------------------------------------------------------------------------------------
def constant_mask(layout: MaskLayout, value: bool) -> ModelMask:
    return ModelMask(layout, {k: (ALL if value else NONE) for k in layout.keys}, "all" if value else "none")


def random_mask(layout: MaskLayout, density: float, seed: int) -> ModelMask:
    """Each parameter selected with probability ``density``, drawn per key from ``(seed, key)``: the
    same on CPU and GPU, whatever the key order.  Stores nothing (regenerated when asked for)."""
    density = _check_fraction(density, "density")
    if density == 0.0:
        return ModelMask(layout, {k: NONE for k in layout.keys}, f"random density 0 seed {seed}")
    if density == 1.0:
        return ModelMask(layout, {k: ALL for k in layout.keys}, f"random density 1 seed {seed}")
    part = _Random(seed, density)
    return ModelMask(layout, {k: part for k in layout.keys}, f"random density {density:g} seed {seed}")


def block_mask(layout: MaskLayout, patterns: Iterable[str], block_of: Optional[Callable[[str], str]] = None,
               label: str = "") -> ModelMask:
    """Select whole blocks.  ``patterns``: block names (``input_blocks.4``, ``middle_block``,
    ``double_blocks.*``; fnmatch wildcards); each must match at least one block of the model."""
    block_of = block_of or default_block_of
    pats = [p.strip() for p in patterns if p and p.strip()]
    names = block_names(layout, block_of)
    chosen = set()
    for p in pats:
        hit = [b for b in names if _block_name_matches(b, p)]
        if not hit:
            raise MaskError(f"block '{p}' matches no block of this model ({layout.family}); its blocks are: "
                            + ", ".join(names))
        chosen.update(hit)
    parts = {k: (ALL if block_of(k) in chosen else NONE) for k in layout.keys}
    return ModelMask(layout, parts, label or ("blocks " + ", ".join(pats) if pats else "no blocks"))


def _check_fraction(q, name: str) -> float:
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise MaskError(f"{name} must be a number within [0, 1], got {q!r}") from None
    if not (0.0 <= q <= 1.0):   # also rejects NaN
        raise MaskError(f"{name} must be within [0, 1], got {q!r}")
    return q


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


_TOP_BINS = 1 << 15   # non-negative int32 >> 16
_LOW_BINS = 1 << 16
_SORT_MAX = 1 << 16   # tensors up to this size are ranked by a stable sort (faster for small keys)


def _as_bits(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1).contiguous().view(torch.int32)


class _Counter:
    """A histogram of small non-negative ints, fed in pieces; pieces are batched so that many small
    tensors cost one ``bincount`` per ~4M values."""

    def __init__(self, bins: int):
        self.bins = bins
        self.hist: Optional[torch.Tensor] = None
        self._pending: List[torch.Tensor] = []
        self._n = 0

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        if values.numel() >= _CHUNK:
            self._count(values)
            return
        self._pending.append(values)
        self._n += values.numel()
        if self._n >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._count(torch.cat([p.to(self._pending[0].device) for p in self._pending]))
            self._pending, self._n = [], 0

    def _count(self, values: torch.Tensor) -> None:
        for s in range(0, values.numel(), _CHUNK):
            h = torch.bincount(values[s:s + _CHUNK], minlength=self.bins).cpu()
            self.hist = h if self.hist is None else self.hist.add_(h)

    def result(self) -> torch.Tensor:
        self._flush()
        return self.hist if self.hist is not None else torch.zeros(self.bins, dtype=torch.int64)


def _low_bits_in(bits: torch.Tensor, top: int) -> torch.Tensor:
    """The low 16 bits of the values whose top 16 bits are ``top``."""
    parts = []
    for s in range(0, bits.numel(), _CHUNK):
        c = bits[s:s + _CHUNK]
        sel = c[(c >> 16) == top]
        if sel.numel():
            parts.append(sel & 0xFFFF)
    if not parts:
        return bits.new_empty(0)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _kth_bin(hist: torch.Tensor, k: int) -> Tuple[int, int]:
    """(index of the bin holding the k-th smallest value, number of values in lower bins); k >= 1."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    return b, (int(cum[b - 1]) if b > 0 else 0)


def _threshold(g: "_Group") -> None:
    """From the two histograms: the exact bit pattern T of the k-th smallest value and how many values
    equal to T belong to the selection."""
    lo, below = _kth_bin(g.low.result(), g.k - g.below_top)
    g.T = (g.top << 16) | lo
    g.ties_left = g.k - g.below_top - below
    g.low = None


@dataclass
class _Group:
    n: int = 0
    k: int = 0                       # how many of the smallest values to select
    hist: Optional[_Counter] = None
    top: int = -1                    # bin of the k-th smallest (top 16 bits)
    below_top: int = 0               # values with a smaller top bin
    low: Optional[_Counter] = None
    T: int = -1                      # exact bit pattern of the k-th smallest value
    ties_left: int = 0               # values equal to T still to select (in key order)


def _select_smallest(bits: torch.Tensor, g: _Group) -> torch.Tensor:
    """``bits < T`` plus the next ``g.ties_left`` entries equal to ``T`` (flat order); updates ties_left."""
    sel = torch.empty(bits.numel(), dtype=torch.bool, device=bits.device)
    for s in range(0, bits.numel(), _CHUNK):
        c = bits[s:s + _CHUNK]
        out = sel[s:s + c.numel()]
        torch.lt(c, g.T, out=out)
        if g.ties_left > 0:
            eq = c == g.T
            n_eq = int(eq.sum())
            if n_eq:
                if n_eq <= g.ties_left:
                    out |= eq
                    g.ties_left -= n_eq
                else:
                    rank = torch.cumsum(eq, 0, dtype=torch.int32)
                    out |= eq & (rank <= g.ties_left)
                    g.ties_left = 0
    return sel


def _smallest_in_tensor(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest entries of one tensor (ties by flat index), exactly; 0 < k < n."""
    n = bits.numel()
    if n <= _SORT_MAX:
        order = torch.sort(bits, stable=True).indices[:k]
        sel = torch.zeros(n, dtype=torch.bool, device=bits.device)
        sel[order] = True
        return sel
    g = _Group(n=n, k=k)
    top = _Counter(_TOP_BINS)
    for s in range(0, n, _CHUNK):
        top.add(bits[s:s + _CHUNK] >> 16)
    g.top, g.below_top = _kth_bin(top.result(), k)
    g.low = _Counter(_LOW_BINS)
    g.low.add(_low_bits_in(bits, g.top))
    _threshold(g)
    return _select_smallest(bits, g)


def magnitude_mask(layout: MaskLayout, read_a: Callable[[str], torch.Tensor],
                   read_b: Optional[Callable[[str], torch.Tensor]], quantile: float, select: str = "above",
                   scope: str = "tensor", block_of: Optional[Callable[[str], str]] = None,
                   progress: Optional[Callable[[int, int], None]] = None, label: str = "") -> ModelMask:
    """Select parameters by the size of ``|A - B|`` (``|A|`` when ``read_b`` is None), exactly.

    ``read_a(key)`` / ``read_b(key)`` return the key's values as an fp32 tensor (on the compute device).
    ``select="below"``: the ``round(q*n)`` smallest values of each group; ``"above"``: the
    ``round((1-q)*n)`` largest, where a group is one tensor, one block or the whole model (``scope``).
    Ties at the threshold are broken by key order, then flat index.  See the module docstring.
    """
    q = _check_fraction(quantile, "quantile")
    if select not in SELECTS:
        raise MaskError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
    if scope not in SCOPES:
        raise MaskError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    block_of = block_of or default_block_of
    what = "|A - B|" if read_b is not None else "|A|"
    label = label or f"{what} {select} quantile {q:g} per {scope}"
    keys, numels = layout.keys, layout.numels

    def values(key: str) -> torch.Tensor:
        a = read_a(key)
        if a.dtype != torch.float32:
            a = a.float()
        if read_b is not None:
            b = read_b(key)
            a = a - b if a.data_ptr() == b.data_ptr() else a.sub_(b)
            del b
        return a.abs_()

    def k_of(n: int) -> int:
        """How many of the smallest values the selection for a group of n values is built from."""
        if select == "below":
            return min(n, round_half_up(q * n))
        return n - min(n, round_half_up((1.0 - q) * n))

    def finish(sel_smallest: Optional[torch.Tensor], const_smallest: Optional[bool]) -> _Part:
        if const_smallest is not None:
            value = const_smallest if select == "below" else not const_smallest
            return ALL if value else NONE
        sel = sel_smallest if select == "below" else ~sel_smallest
        return _part_from_selection(sel)

    parts: Dict[str, _Part] = {}
    if scope == "tensor":
        for i, (key, n) in enumerate(zip(keys, numels)):
            _interrupt()
            k = k_of(n)
            if k == 0 or k == n:
                parts[key] = finish(None, k == n)
            else:
                bits = _as_bits(values(key))
                parts[key] = finish(_smallest_in_tensor(bits, k), None)
                del bits
            if progress:
                progress(i + 1, len(keys))
        return ModelMask(layout, parts, label)

    group_of = (lambda k: "") if scope == "model" else block_of
    groups: Dict[str, _Group] = {}
    for key, n in zip(keys, numels):
        g = groups.setdefault(group_of(key), _Group())
        g.n += n
    for g in groups.values():
        g.k = k_of(g.n)
        if 0 < g.k < g.n:
            g.hist = _Counter(_TOP_BINS)
    active = {name for name, g in groups.items() if 0 < g.k < g.n}
    steps = 3 * len(keys)
    done = 0
    # pass 1: histograms of the top 16 bits; remember each key's value range
    ranges: Dict[str, Tuple[int, int]] = {}
    for key in keys:
        _interrupt()
        name = group_of(key)
        if name in active:
            bits = _as_bits(values(key))
            if bits.numel():
                lo, hi = torch.aminmax(bits)
                ranges[key] = (int(lo), int(hi))
                groups[name].hist.add(bits >> 16)
            del bits
        done += 1
        if progress:
            progress(done, steps)
    for name in active:
        g = groups[name]
        g.top, g.below_top = _kth_bin(g.hist.result(), g.k)
        g.hist = None
        g.low = _Counter(_LOW_BINS)
    # pass 2: histograms of the low 16 bits inside each group's top bin
    for key in keys:
        _interrupt()
        name = group_of(key)
        if name in active and key in ranges:
            g = groups[name]
            lo, hi = ranges[key]
            if (lo >> 16) <= g.top <= (hi >> 16):
                g.low.add(_low_bits_in(_as_bits(values(key)), g.top))
        done += 1
        if progress:
            progress(done, steps)
    for name in active:
        _threshold(groups[name])
    # pass 3: the selections, ties taken in key order
    for key in keys:
        _interrupt()
        name = group_of(key)
        g = groups[name]
        if name not in active:
            parts[key] = finish(None, g.k == g.n)
        elif key not in ranges:
            parts[key] = NONE           # an empty tensor
        else:
            lo, hi = ranges[key]
            if hi < g.T:
                parts[key] = finish(None, True)
            elif lo > g.T:
                parts[key] = finish(None, False)
            else:
                bits = _as_bits(values(key))
                parts[key] = finish(_select_smallest(bits, g), None)
                del bits
        done += 1
        if progress:
            progress(done, steps)
    return ModelMask(layout, parts, label)


def _interrupt() -> None:
    """ComfyUI's Cancel, when running inside ComfyUI."""
    import sys

    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------
# ComfyUI-side helpers (MODEL patchers)
# ---------------------------------------------------------------------------------------------
def model_reader(obj, device: torch.device) -> Callable[[str], torch.Tensor]:
    """``key -> fp32 effective weight on device`` for a MODEL or CLIP (its patches applied)."""
    from .weights import KeySource

    src = KeySource.of(obj)
    return lambda key: src.read(key, device, torch.float32)


def check_same_model_layout(layout_a: MaskLayout, layout_b: MaskLayout, name_a: str = "model_a",
                            name_b: str = "model_b") -> None:
    if layout_a != layout_b:
        raise MaskError(f"{name_a} and {name_b} do not have the same architecture, keys and shapes: "
                        + layout_a.diff_text(layout_b, name_a, name_b))
