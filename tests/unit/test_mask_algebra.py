"""engine.masks without ComfyUI: bit packing, set algebra laws, the exact magnitude selection, the random
masker, the mask/model contract (selection, layout checks) and bad input."""
import importlib.util
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = "mergelab_pack_unit"


def _pack():
    """The repository imported as a package (engine modules use relative imports)."""
    if PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(PKG, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PKG] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PKG}.engine.masks")


M = _pack()

SHAPES = [(50, 30), (7,), (3, 3, 3), (1000,), (4097,), (1,), (20, 20), (0,)]
BLOCKS = ["input_blocks.1", "input_blocks.1", "middle_block.0", "middle_block.0", "out", "out", "time_embed",
          "time_embed"]
KEYS = [f"diffusion_model.{b}.p{i}.weight" for i, b in enumerate(BLOCKS)]


@pytest.fixture(scope="module")
def layout():
    return M.MaskLayout("SDXL:SDXL", KEYS, SHAPES)


def _values(seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in zip(KEYS, SHAPES):
        x = torch.randn(s, generator=g)
        out[k] = torch.round(x * 3) / 3 if ties else x      # ties: many equal |A - B| values
    return out


def _bits_mask(layout, seed, p):
    """A mask with explicit random bits (stored as packed bits or constants)."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for k, s in zip(layout.keys, layout.shapes):
        sel = torch.rand(s, generator=g) < p
        parts[k] = M._part_from_selection(sel)
    return M.ModelMask(layout, parts, f"bits{seed}")


def _dense(mask):
    return {k: mask.dense(k) for k in mask.layout.keys}


def _masks(layout):
    """A variety: packed bits, lazy random, constants, block masks, and mixtures."""
    return [_bits_mask(layout, 1, 0.3), _bits_mask(layout, 2, 0.7), M.random_mask(layout, 0.4, 7),
            M.random_mask(layout, 0.5, 8), M.constant_mask(layout, True), M.constant_mask(layout, False),
            M.block_mask(layout, ["middle_block.0", "out"]),
            _bits_mask(layout, 3, 0.5).union(M.block_mask(layout, ["time_embed"]))]


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 12345])
def test_pack_roundtrip_and_popcount(n):
    sel = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.37
    bits = M.pack_bits(sel)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(M.unpack_bits(bits, n, torch.device("cpu")), sel)
    assert M.popcount(bits) == int(sel.sum())
    # bit j of byte i is element 8i + j
    if n >= 9:
        assert bool(bits[1] >> 0 & 1) == bool(sel[8])


def test_invert_clears_padding_bits(layout):
    m = _bits_mask(layout, 5, 0.5)
    inv = m.invert()
    for k, n in zip(layout.keys, layout.numels):
        assert inv.count(k) == n - m.count(k)
        assert torch.equal(inv.dense(k), ~m.dense(k))


# -- set algebra laws ------------------------------------------------------------------------------
def test_set_algebra_laws(layout):
    ms = _masks(layout)
    for a in ms:
        da = _dense(a)
        na = a.invert()
        for k in layout.keys:
            assert torch.equal(na.invert().dense(k), da[k])                      # involution
        for b in ms:
            db = _dense(b)
            u, i, d, x = a.union(b), a.intersection(b), a.difference(b), a.xor(b)
            nu, ni = u.invert(), i.invert()
            nb = b.invert()
            dmu, dmi = na.intersection(nb), na.union(nb)          # De Morgan's right-hand sides
            xor_alt = u.difference(i)                              # xor = union - intersection
            diff_alt = a.intersection(nb)                          # A - B = A and not B
            for k in layout.keys:
                assert torch.equal(u.dense(k), da[k] | db[k])
                assert torch.equal(i.dense(k), da[k] & db[k])
                assert torch.equal(nu.dense(k), dmu.dense(k))      # not(A or B) = not A and not B
                assert torch.equal(ni.dense(k), dmi.dense(k))      # not(A and B) = not A or not B
                assert torch.equal(d.dense(k), diff_alt.dense(k))
                assert torch.equal(d.dense(k), da[k] & ~db[k])
                assert torch.equal(x.dense(k), xor_alt.dense(k))
                assert torch.equal(x.dense(k), da[k] ^ db[k])
                assert u.count(k) + i.count(k) == a.count(k) + b.count(k)   # inclusion-exclusion


def test_operations_by_name_and_self_laws(layout):
    a, b = _bits_mask(layout, 11, 0.4), M.random_mask(layout, 0.3, 3)
    for name, expect in (("union", a.union(b)), ("intersection", a.intersection(b)),
                         ("difference", a.difference(b)), ("xor", a.xor(b)), ("invert", a.invert())):
        got = a.apply(name, b)
        for k in layout.keys:
            assert torch.equal(got.dense(k), expect.dense(k)), name
    for k in layout.keys:
        assert a.xor(a).count(k) == 0 and a.difference(a).count(k) == 0
        assert torch.equal(a.union(a).dense(k), a.dense(k))
    with pytest.raises(M.MaskError, match="needs two masks"):
        a.apply("union", None)
    with pytest.raises(M.MaskError, match="unknown mask operation"):
        a.apply("nand", b)


def test_masks_are_immutable(layout):
    a = _bits_mask(layout, 1, 0.5)
    before = {k: a.dense(k).clone() for k in layout.keys}
    a.union(M.constant_mask(layout, True)); a.invert(); a.xor(a)
    b = a.bits(KEYS[0]); b.zero_()                       # a copy
    for k in layout.keys:
        assert torch.equal(a.dense(k), before[k])
    with pytest.raises(AttributeError):
        a.label = "x"
    with pytest.raises(AttributeError):
        a.layout.family = "x"


# -- storage -------------------------------------------------------------------------------------
def test_storage_is_bits_or_nothing(layout):
    total = layout.total
    assert M.random_mask(layout, 0.3, 1).nbytes() == 0
    assert M.constant_mask(layout, True).nbytes() == 0
    assert M.block_mask(layout, ["out"]).nbytes() == 0
    b = _bits_mask(layout, 1, 0.5)
    assert b.nbytes() <= sum((n + 7) // 8 for n in layout.numels) <= total / 8 + len(layout.keys)
    mag = M.magnitude_mask(layout, _reader(_values(1)), _reader(_values(2)), 0.5, "above", "model")
    assert mag.nbytes() <= total / 8 + len(layout.keys)


# -- random masker -------------------------------------------------------------------------------
def test_random_mask_is_seeded_per_key():
    keys = ["diffusion_model.a.weight", "diffusion_model.b.weight"]
    shapes = [(300, 200), (256, 256)]
    m1 = M.random_mask(M.MaskLayout("X:X", keys, shapes), 0.25, 42)
    m2 = M.random_mask(M.MaskLayout("X:X", keys[::-1], shapes[::-1]), 0.25, 42)   # another key order
    for k in keys:
        assert torch.equal(m1.dense(k), m2.dense(k))
        frac = m1.count(k) / m1.dense(k).numel()
        assert abs(frac - 0.25) < 0.01            # 60000+ Bernoulli(0.25) draws: sd 0.0018
    assert not torch.equal(m1.dense(keys[0]).reshape(-1)[:65536], m1.dense(keys[1]).reshape(-1)[:65536])
    m3 = M.random_mask(M.MaskLayout("X:X", keys, shapes), 0.25, 43)
    assert not torch.equal(m1.dense(keys[0]), m3.dense(keys[0]))
    assert M.random_mask(M.MaskLayout("X:X", keys, shapes), 0.0, 1).count(keys[0]) == 0
    assert M.random_mask(M.MaskLayout("X:X", keys, shapes), 1.0, 1).count(keys[0]) == 60000


# -- magnitude masker: exact -----------------------------------------------------------------------
def _reader(vals):
    return lambda k: vals[k].clone()


def _reference(vals, q, select, scope):
    """Brute force: stable sort of each group's values (ties by key order, then flat index)."""
    groups = {}
    for k in KEYS:
        name = {"tensor": k, "model": "", "block": M.default_block_of(k)}[scope]
        groups.setdefault(name, []).append(k)
    out = {}
    for ks in groups.values():
        v = torch.cat([vals[k].reshape(-1) for k in ks])
        n = v.numel()
        order = torch.sort(v, stable=True).indices
        if select == "below":
            sel = torch.zeros(n, dtype=torch.bool)
            sel[order[:min(n, math.floor(q * n + 0.5))]] = True
        else:
            sel = torch.ones(n, dtype=torch.bool)
            sel[order[:n - min(n, math.floor((1 - q) * n + 0.5))]] = False
        off = 0
        for k in ks:
            c = vals[k].numel()
            out[k] = sel[off:off + c].view(vals[k].shape)
            off += c
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "block", "model"])
def test_magnitude_mask_is_exact(layout, ties, scope, monkeypatch):
    # small sort/chunk limits so the radix-select and chunked paths run on these small tensors too
    monkeypatch.setattr(M, "_SORT_MAX", 64)
    monkeypatch.setattr(M, "_CHUNK", 1 << 12)
    A, B = _values(1, ties), _values(2, ties)
    for use_b in (True, False):
        v = {k: (A[k] - B[k]).abs() if use_b else A[k].abs() for k in KEYS}
        for select in ("above", "below"):
            for q in (0.0, 0.013, 0.25, 0.5, 0.9, 0.999, 1.0):
                m = M.magnitude_mask(layout, _reader(A), _reader(B) if use_b else None, q, select, scope)
                ref = _reference(v, q, select, scope)
                for k in KEYS:
                    assert torch.equal(m.dense(k), ref[k]), (use_b, select, q, k)


@pytest.mark.parametrize("select", ["above", "below"])
def test_magnitude_fraction_per_tensor(layout, select):
    """Exactly the requested fraction of every tensor (within one entry), whatever the ties."""
    A, B = _values(3, ties=True), _values(4, ties=True)
    for q in (0.1, 0.33, 0.5, 0.75):
        m = M.magnitude_mask(layout, _reader(A), _reader(B), q, select, "tensor")
        for k, n in zip(KEYS, layout.numels):
            want = q * n if select == "below" else (1 - q) * n
            assert abs(m.count(k) - want) <= 0.5 + 1e-9, (q, k)
            if 0 < m.count(k) < n:      # every selected value is >= (above) / <= (below) every other
                d = (A[k] - B[k]).abs()
                s = m.dense(k)
                if select == "above":
                    assert d[s].min() >= d[~s].max()
                else:
                    assert d[s].max() <= d[~s].min()


def test_magnitude_whole_model_fraction(layout):
    A, B = _values(5), _values(6)
    m = M.magnitude_mask(layout, _reader(A), _reader(B), 0.8, "above", "model")
    sel, total = m.selected_total()
    assert sel == round(0.2 * total)


@pytest.mark.parametrize("q", [-0.01, 1.01, float("nan"), "abc", None])
def test_bad_quantile_is_a_clear_error(layout, q):
    with pytest.raises(M.MaskError, match=r"quantile must be .*\[0, 1\]"):
        M.magnitude_mask(layout, _reader(_values(1)), None, q)
    with pytest.raises(M.MaskError, match=r"density must be .*\[0, 1\]"):
        M.random_mask(layout, q, 0)


def test_bad_select_and_scope(layout):
    with pytest.raises(M.MaskError, match="select must be one of"):
        M.magnitude_mask(layout, _reader(_values(1)), None, 0.5, select="middle")
    with pytest.raises(M.MaskError, match="scope must be one of"):
        M.magnitude_mask(layout, _reader(_values(1)), None, 0.5, scope="layer")


# -- the mask / model contract ---------------------------------------------------------------------
def test_selection_contract(layout):
    m = M.block_mask(layout, ["out"]).union(_bits_mask(layout, 9, 0.5).intersection(M.block_mask(layout, ["time_embed"])))
    for k, s in zip(layout.keys, layout.shapes):
        sel = m.selection(k, s, torch.device("cpu"))
        state = m.state(k)
        if state == "all":
            assert sel is None                      # nothing to mask: the merge result is used as is
        else:
            assert sel.dtype == torch.bool and tuple(sel.shape) == s
            assert torch.equal(sel, m.dense(k))
            assert (state == "none") == (not bool(sel.any()))
    assert m.state(KEYS[4]) == "all" and m.state(KEYS[0]) == "none"
    with pytest.raises(M.MaskError, match="no entry for key 'diffusion_model.nope'"):
        m.selection("diffusion_model.nope", (1,), "cpu")
    with pytest.raises(M.MaskError, match=r"has shape \(50, 30\).*\(30, 50\)"):
        m.selection(KEYS[0], (30, 50), "cpu")


def test_masks_of_other_layouts_are_rejected(layout):
    other_arch = M.MaskLayout("BaseModel:SD15", KEYS, SHAPES)
    fewer = M.MaskLayout("SDXL:SDXL", KEYS[:-1], SHAPES[:-1])
    reshaped = M.MaskLayout("SDXL:SDXL", KEYS, [(30, 50)] + SHAPES[1:])
    a = M.random_mask(layout, 0.5, 1)
    with pytest.raises(M.MaskError, match="made for SDXL:SDXL, the model is BaseModel:SD15"):
        a.check(other_arch)
    with pytest.raises(M.MaskError, match="1 key\\(s\\) of the mask not in the model"):
        a.check(fewer)
    with pytest.raises(M.MaskError, match="other shapes"):
        a.check(reshaped)
    a.check(M.MaskLayout("SDXL:SDXL", KEYS, SHAPES))            # same layout: fine
    with pytest.raises(M.MaskError, match="different models"):
        a.union(M.random_mask(fewer, 0.5, 1))
    with pytest.raises(M.MaskError, match="different models"):
        a.xor(M.random_mask(other_arch, 0.5, 1))


def test_block_mask_names(layout):
    m = M.block_mask(layout, ["middle_block.*", "out."])
    for k in KEYS:
        expect = M.default_block_of(k).rstrip(".") in ("middle_block.0", "out")
        assert m.state(k) == ("all" if expect else "none")
    with pytest.raises(M.MaskError, match="matches no block.*input_blocks.1"):
        M.block_mask(layout, ["input_blocks.7"])
    assert all(M.block_mask(layout, []).count(k) == 0 for k in KEYS)


def test_block_counts(layout):
    m = _bits_mask(layout, 4, 0.5)
    rows = m.block_counts()
    assert [r[0].rstrip(".") for r in rows] == ["input_blocks.1", "middle_block.0", "out", "time_embed"]
    assert sum(r[2] for r in rows) == layout.total
    assert sum(r[1] for r in rows) == sum(m.count(k) for k in KEYS)
