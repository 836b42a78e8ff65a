"""A stand-in for ComfyUI-GGUF (city96), written for the tests (ComfyUI-GGUF is not on a package registry,
so CI cannot install it).  It has the interface MergeLab relies on and the quirks that broke it:

* ``FakeQ8Tensor``: a torch.Tensor subclass holding raw uint8 blocks in the Q8_0 layout (per 32 values an
  fp16 scale and 32 int8), with ``tensor_type`` / ``tensor_shape`` / ``patches``; ``.shape`` is the logical
  shape, ``detach()`` / ``clone()`` return the tensor itself and ``.to()`` keeps the attributes.
* ``Linear.get_weight(tensor, dtype)`` dequantizes and applies ``tensor.patches``;
  ``_save_to_state_dict`` writes meta placeholders shaped as the bytes, and a fake ``<layer>.temp.weight``
  for the largest quantized layer (its VRAM estimate), which no module attribute backs.
* ``FakeGGUFPatcher`` attaches a key's patch list to its quantized weight (``weight.patches``) instead of
  computing it, and always patches on load.
"""
import torch

Q8 = "FAKE_Q8_0"


def quantize(w: torch.Tensor) -> torch.Tensor:
    rows = w.reshape(-1, 32).float()
    d = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12).half()
    q = torch.round(rows / d.float()).clamp(-127, 127).to(torch.int8)
    raw = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], 1)         # (n_blocks, 34)
    return raw.reshape(w.shape[0], -1).contiguous()


def dequantize(raw: torch.Tensor, shape, dtype) -> torch.Tensor:
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16)
    q = blocks[:, 2:].contiguous().view(torch.int8)
    return (d * q).reshape(shape).to(dtype)


class FakeQ8Tensor(torch.Tensor):
    def __new__(cls, data, *, tensor_type, tensor_shape, patches=None):
        return torch.Tensor._make_subclass(cls, data, False)

    def __init__(self, data, *, tensor_type, tensor_shape, patches=None):
        self.tensor_type, self.tensor_shape, self.patches = tensor_type, tensor_shape, list(patches or [])

    def to(self, *args, **kwargs):
        new = super().to(*args, **kwargs)
        new.tensor_type = getattr(self, "tensor_type", None)
        new.tensor_shape = getattr(self, "tensor_shape", new.data.shape)
        new.patches = list(getattr(self, "patches", []))
        return new

    def detach(self, *a, **k):
        return self

    def clone(self, *a, **k):
        return self

    @property
    def shape(self):
        if not hasattr(self, "tensor_shape"):
            self.tensor_shape = self.size()
        return self.tensor_shape


def is_q8(t) -> bool:
    return getattr(t, "tensor_type", None) == Q8


def make_ops():
    import comfy.lora
    import comfy.ops

    class FakeOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            largest = False

            def _load_from_state_dict(self, sd, prefix, local_metadata, strict, missing, unexpected, errors):
                for name in ("weight", "bias"):
                    v = sd.get(prefix + name)
                    if v is not None:
                        setattr(self, name, torch.nn.Parameter(v, requires_grad=False))
                self.largest = bool(getattr(self.weight, "largest", False))

            def _save_to_state_dict(self, dest, prefix, keep_vars):
                if not is_q8(self.weight):
                    return super()._save_to_state_dict(dest, prefix, keep_vars)
                dest[prefix + "weight"] = torch.zeros_like(self.weight, device="meta")
                if self.bias is not None:
                    dest[prefix + "bias"] = torch.zeros_like(self.bias, device="meta")
                if self.largest:
                    dest[prefix + "temp.weight"] = torch.empty(self.weight.tensor_shape, device="meta")

            def get_weight(self, tensor, dtype):
                patches = [p for ps, _k in getattr(tensor, "patches", []) for p in ps]
                if is_q8(tensor):
                    w = dequantize(tensor.as_subclass(torch.Tensor), tensor.tensor_shape, dtype)
                else:
                    w = tensor.as_subclass(torch.Tensor).to(dtype)
                if patches:
                    w = comfy.lora.calculate_weight(patches, w, "")
                return w

            def forward_comfy_cast_weights(self, input):
                w = self.get_weight(self.weight.to(input.device), input.dtype)
                b = None if self.bias is None else self.bias.to(input.device, input.dtype)
                return torch.nn.functional.linear(input, w, b)
    return FakeOps


def make_patcher_class():
    import comfy.model_patcher
    import comfy.utils

    class FakeGGUFPatcher(comfy.model_patcher.ModelPatcher):
        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            if key not in self.patches:
                return
            w = comfy.utils.get_attr(self.model, key)
            if not is_q8(w):
                return super().patch_weight_to_device(key, device_to, inplace_update)
            out = w.to(device_to)
            out.patches = [(self.patches[key], key)]
            comfy.utils.set_attr_param(self.model, key, out)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for p in self.model.parameters():
                    if is_q8(p):
                        p.patches = []
            return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

        def load(self, *args, force_patch_weights=False, **kwargs):
            return super().load(*args, force_patch_weights=True, **kwargs)
    return FakeGGUFPatcher


def fake_gguf_model(arch: str, seed: int = 0, delta_seed=None, delta_scale: float = 0.0):
    """A small fixture model rebuilt with the fake ops, its large 2-D Linear weights stored as FakeQ8Tensor."""
    import comfy.model_management as mm
    from mergelab import fixtures
    src = fixtures.small_model(arch, seed=seed, delta_seed=delta_seed, delta_scale=delta_scale)
    sd = {k[len("diffusion_model."):]: v for k, v in src.model.state_dict().items() if k.startswith("diffusion_model.")}
    linear = {n + ".weight" for n, m in src.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}
    q = {}
    for k, v in sd.items():
        if k in linear and v.ndim == 2 and v.shape[1] % 32 == 0 and v.numel() > 1024:
            q[k] = FakeQ8Tensor(quantize(v), tensor_type=Q8, tensor_shape=v.shape)
        else:
            q[k] = v.clone()
    big = max((k for k in q if is_q8(q[k])), key=lambda k: q[k].numel())
    q[big].largest = True
    cls = fixtures.config_class(arch)
    cfg = fixtures.small_unet_config(arch)
    mc = cls(cfg)
    mc.unet_config.update(cfg)
    mc.custom_operations = make_ops()
    mc.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = fixtures._get_model(cls, mc, mm.unet_offload_device())
        model.diffusion_model.load_state_dict(q, strict=True)
    return make_patcher_class()(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def weights(m, keys):
    """The weights the fake's forward pass uses (dequantized, with the patches attached on load), fp32."""
    out = {}
    for k in keys:
        path, _, name = k.rpartition(".")
        mod = m.model.get_submodule(path)
        t = getattr(mod, name)
        out[k] = mod.get_weight(t, torch.float32) if is_q8(t) else t.as_subclass(torch.Tensor).float().clone()
    return out


def param_keys(m):
    return [n + "." + p for n, mod in m.model.named_modules() for p, _ in mod.named_parameters(recurse=False)
            if n.startswith("diffusion_model.")]


def stored(m, key):
    """The tensor the module holds for ``key`` (a FakeQ8Tensor for a quantized weight)."""
    path, _, name = key.rpartition(".")
    return getattr(m.model.get_submodule(path), name)
