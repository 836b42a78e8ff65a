"""Fixture models for MergeLab's integration tests and benchmarks, built from ComfyUI's OWN classes.

Nothing can be downloaded here, so every model is made from ComfyUI's model classes
(``comfy.supported_models`` config classes -> ``comfy.model_base`` models, ``comfy.sd1_clip`` /
``comfy.sdxl_clip`` / ``comfy.text_encoders`` text encoders, ``comfy.ldm`` VAE): key names and shapes
are the real ones, weights are random but deterministic.

Three kinds of fixture:

1. **Full-size key lists on the meta device** for every architecture ComfyUI supports
   (:data:`ARCHITECTURES`, :func:`meta_model`, :func:`meta_unet_shapes`).  Building on
   ``torch.device("meta")`` allocates nothing and takes milliseconds.  Each architecture's
   ``unet_config`` is the *complete* config ComfyUI's own detection (``comfy.model_detection``)
   produces for the real checkpoint; :func:`detect_meta_arch` checks that round trip (ComfyUI detects
   the meta state dict as the same config class).
2. **Small models** with the SD1.5 / SDXL / Flux block structure (:func:`small_model`,
   :func:`small_clip`, the test node :class:`SmallModelLoader`): real ``ModelPatcher`` / ``comfy.sd.CLIP``
   objects, real module classes, the very same key names (so the same blocks and block counts) as the
   full-size models, few channels.  UNet/DiT sizes (fp32): SD15 5.5 M params / 22 MB, SDXL 14.4 M /
   57 MB (SDXL's 10-deep transformer stacks are kept so the key set equals real SDXL's; the widths are
   already the minimum that keeps every key), Flux 5.3 M / 21 MB (19 double + 38 single blocks).  Text
   encoders 1.7-3.6 M params, mostly the real 49408-token CLIP vocabulary (the real tokenizers work).
3. **A full-size SD1.5 checkpoint file** (:func:`full_sd15_checkpoint`, :func:`tuned_sd15_checkpoint`)
   with UNet + CLIP + VAE under the on-disk names, which ``CheckpointLoaderSimple`` detects as SD15.
   Written streaming (one tensor in memory at a time) to ``mergelab.CACHE_DIR/fixtures/`` and reused.

Weights: every tensor is drawn from its own ``torch.Generator`` seeded from ``(seed, key)`` (see
:func:`key_seed`), so a key's values do not depend on dtype, order or which other keys exist.
Rule (:func:`fill_value`): 1-D ``*.weight`` / ``*.scale`` (norms) = 1, other 1-D tensors (biases) =
N(0, 0.01), tensors with 2+ dims = N(0, std) with ``std = min(0.02, 1/sqrt(fan_in))``, 0-D tensors keep
the value the module gave them (e.g. ``logit_scale``).  A "fine-tuned" variant adds
``delta_scale * N(0, 1)`` drawn from ``(delta_seed, key)`` to every floating tensor.

Importing this module does not import ComfyUI; the first call that needs it boots ComfyUI with
:func:`mergelab.comfy_env.boot` unless something (e.g. a :class:`mergelab.harness.Harness`) already
did.  Create your Harness *before* calling these functions if you want its folders.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import CACHE_DIR

FORMAT_VERSION = 1
FIXTURE_DIR = os.path.join(CACHE_DIR, "fixtures")

_lock = threading.RLock()


# ---------------------------------------------------------------------------------------------
# ComfyUI access
# ---------------------------------------------------------------------------------------------
def _comfy():
    """Make sure ComfyUI is importable (boot it once if nobody did) and return torch."""
    import sys
    if "comfy.model_management" not in sys.modules:
        from . import comfy_env
        comfy_env.boot()
    import torch
    return torch


def _torch_dtype(dtype):
    torch = _comfy()
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


# ---------------------------------------------------------------------------------------------
# deterministic random values
# ---------------------------------------------------------------------------------------------
def key_seed(namespace: str, seed: int, key: str) -> int:
    """A stable 63-bit seed for one tensor (independent of Python's hash randomisation)."""
    h = hashlib.sha256(f"{namespace}:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _randn(shape, namespace: str, seed: int, key: str):
    torch = _comfy()
    g = torch.Generator(device="cpu")
    g.manual_seed(key_seed(namespace, seed, key))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def fill_value(key: str, shape, seed: int, delta_seed: Optional[int] = None, delta_scale: float = 0.0,
               current=None):
    """The float32 value of tensor ``key`` (see the module docstring for the rule)."""
    torch = _comfy()
    shape = tuple(shape)
    if len(shape) == 0:
        base = current.detach().float().cpu().clone() if current is not None else torch.zeros(())
    elif len(shape) == 1:
        if key.endswith(".weight") or key.endswith(".scale") or key.endswith("norm") or key.endswith(".gamma"):
            base = torch.ones(shape, dtype=torch.float32)
        else:
            base = _randn(shape, "base", seed, key).mul_(0.01)
    else:
        fan_in = max(1, math.prod(shape[1:]))
        std = min(0.02, 1.0 / math.sqrt(fan_in))
        base = _randn(shape, "base", seed, key).mul_(std)
    if delta_seed is not None and delta_scale:
        base.add_(_randn(shape, "delta", delta_seed, key), alpha=float(delta_scale))
    return base


class _quiet:
    """Silence ComfyUI's per-model log lines below ``level`` for a while."""

    def __init__(self, level=logging.INFO):
        self.level = level

    def __enter__(self):
        self.prev = logging.root.manager.disable
        logging.disable(max(self.level, self.prev))
        return self

    def __exit__(self, *exc):
        logging.disable(self.prev)
        return False


class _single_thread:
    """Run torch ops single-threaded for a while (restored after).  Filling is many small element-wise
    ops; with intra-op threads on a busy 2-core machine they spend most of their time waiting."""

    def __enter__(self):
        torch = _comfy()
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch = _comfy()
        if self.n != 1:
            torch.set_num_threads(self.n)
        return False


def _fill_module(module, seed: int, delta_seed: Optional[int], delta_scale: float,
                 prefix: str = "", only_prefix: Optional[str] = None) -> None:
    """Overwrite every floating parameter/buffer of ``module`` in place, deterministically."""
    torch = _comfy()
    with torch.no_grad(), _single_thread():
        for key, t in module.state_dict(keep_vars=True).items():
            if only_prefix is not None and not key.startswith(only_prefix):
                continue
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            if isinstance(t, torch.nn.Parameter) or t.ndim > 0:
                val = fill_value(prefix + key, t.shape, seed, delta_seed, delta_scale, current=t)
                t.data.copy_(val.to(t.dtype))


# ---------------------------------------------------------------------------------------------
# full-size architecture configs (as ComfyUI's detection produces them for the real checkpoints)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    name: str
    config_class: str                   # class name in comfy.supported_models
    unet_config: Dict[str, Any]
    description: str = ""
    verified_params: Optional[int] = None   # publicly known UNet/DiT parameter count, when one is
    extra: Dict[str, Any] = field(default_factory=dict)


def _unet(**kw):
    base = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "use_temporal_attention": False,
            "use_temporal_resblock": False}
    base.update(kw)
    return base


_SD15 = _unet(model_channels=320, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
              channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False,
              context_dim=768, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
_SD21 = dict(_SD15, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)
del _SD21["num_heads"]
_SDXL = _unet(num_classes="sequential", adm_in_channels=2816, model_channels=320, num_res_blocks=[2, 2, 2],
              transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
              use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
              transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
_SVD = _unet(num_classes="sequential", adm_in_channels=768, in_channels=8, model_channels=320,
             num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
             transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
             transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images",
             merge_factor=0.0, video_kernel_size=[3, 1, 1], use_temporal_resblock=True,
             use_temporal_attention=True, disable_temporal_crossattention=False)
_SD3_CTX = lambda out: {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": out}}  # noqa: E731
_SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "input_size": None, "adm_in_channels": 2048,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}
_FLUX = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
         "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
         "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38, "guidance_embed": True}
_CHROMA = {"image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
           "out_channels": 64, "qkv_bias": True, "in_channels": 64, "hidden_size": 3072, "context_in_dim": 4096,
           "patch_size": 2, "depth": 19, "depth_single_blocks": 38, "in_dim": 64, "out_dim": 3072,
           "hidden_dim": 5120, "n_layers": 5}
_HUNYUAN_VIDEO = {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2], "out_channels": 16,
                  "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": 4096,
                  "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 20, "depth_single_blocks": 40,
                  "theta": 256, "qkv_bias": True, "byt5": False, "guidance_embed": True,
                  "use_cond_type_embedding": False, "vision_in_dim": None}
_COSMOS = {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
           "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 4096,
           "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d",
           "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
           "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 256, "num_blocks": 28,
           "num_heads": 32, "extra_per_block_abs_pos_emb": True, "rope_h_extrapolation_ratio": 1.0,
           "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0,
           "extra_per_block_abs_pos_emb_type": "learnable"}
_COSMOS_14B = dict(_COSMOS, model_channels=5120, num_blocks=36, num_heads=40, rope_h_extrapolation_ratio=2.0,
                   rope_w_extrapolation_ratio=2.0, rope_t_extrapolation_ratio=2.0, extra_h_extrapolation_ratio=2.0,
                   extra_w_extrapolation_ratio=2.0, extra_t_extrapolation_ratio=2.0)
_PREDICT2 = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
             "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
             "model_channels": 2048, "concat_padding_mask": True, "crossattn_emb_channels": 1024,
             "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1,
             "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 256, "num_blocks": 28, "num_heads": 16,
             "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
             "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0,
             "extra_h_extrapolation_ratio": 1.0, "extra_w_extrapolation_ratio": 1.0,
             "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False}
_WAN = {"image_model": "wan2.1", "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6, "out_dim": 16, "in_dim": 16, "model_type": "t2v"}
_WAN_14B = dict(_WAN, dim=5120, num_heads=40, ffn_dim=13824, num_layers=40)
_WAN_1_3B = dict(_WAN, dim=1536, num_heads=12, ffn_dim=8960, num_layers=30)
_LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304,
            "n_layers": 26, "qk_norm": True, "n_heads": 24, "n_kv_heads": 8, "axes_dims": [32, 32, 32],
            "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}


def _specs() -> List[ArchSpec]:
    S = ArchSpec
    out = [
        # --- UNet family (configs from comfy/model_detection.py unet_config_from_diffusers_unet) ---
        S("SD15", "SD15", _SD15, "Stable Diffusion 1.x", 859_520_964),
        S("SD15_inpaint", "SD15", dict(_SD15, in_channels=9), "SD 1.5 inpainting (9 input channels)"),
        S("SD15_instructpix2pix", "SD15_instructpix2pix", dict(_SD15, in_channels=8), "InstructPix2Pix"),
        S("Stable_Zero123", "Stable_Zero123", dict(_SD15, in_channels=8), "Stable Zero123 (+ cc_projection)"),
        S("SD20", "SD20", _SD21, "Stable Diffusion 2.x", 865_910_724),
        S("SD21UnclipL", "SD21UnclipL", dict(_SD21, num_classes="sequential", adm_in_channels=1536), "SD 2.1 unCLIP-L"),
        S("SD21UnclipH", "SD21UnclipH", dict(_SD21, num_classes="sequential", adm_in_channels=2048), "SD 2.1 unCLIP-H"),
        S("LotusD", "LotusD", dict(_SD21, num_classes="sequential", adm_in_channels=4), "Lotus depth"),
        S("SD_X4Upscaler", "SD_X4Upscaler",
          _unet(in_channels=7, model_channels=256, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 2, 4],
                transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_output=[0, 0, 0] + [1] * 9,
                transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024),
          "SD x4 upscaler"),
        S("SDXL", "SDXL", _SDXL, "Stable Diffusion XL base", 2_567_463_684),
        S("SDXL_instructpix2pix", "SDXL_instructpix2pix", dict(_SDXL, in_channels=8), "SDXL InstructPix2Pix"),
        S("SDXLRefiner", "SDXLRefiner",
          _unet(num_classes="sequential", adm_in_channels=2560, model_channels=384, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=4,
                use_linear_in_transformer=True, context_dim=1280, num_head_channels=64,
                transformer_depth_output=[0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0]), "SDXL refiner"),
        S("SSD1B", "SSD1B", dict(_SDXL, transformer_depth=[0, 0, 2, 2, 4, 4], transformer_depth_middle=-1,
                                 transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4]), "Segmind SSD-1B"),
        S("Segmind_Vega", "Segmind_Vega", dict(_SDXL, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=-1,
                                               transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2]), "Segmind Vega"),
        S("KOALA_700M", "KOALA_700M", dict(_SDXL, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                                           transformer_depth_output=[0, 0, 2, 2, 5, 5], transformer_depth_middle=-2),
          "KOALA 700M"),
        S("KOALA_1B", "KOALA_1B", dict(_SDXL, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 6],
                                       transformer_depth_output=[0, 0, 2, 2, 6, 6], transformer_depth_middle=6),
          "KOALA 1B"),
        S("SVD_img2vid", "SVD_img2vid", _SVD, "Stable Video Diffusion img2vid"),
        S("SV3D_u", "SV3D_u", dict(_SVD, adm_in_channels=256), "SV3D-u"),
        S("SV3D_p", "SV3D_p", dict(_SVD, adm_in_channels=1280), "SV3D-p"),
        # --- Stable Cascade ---
        S("Stable_Cascade_C", "Stable_Cascade_C", {"stable_cascade_stage": "c", "c_cond": 2048}, "Stable Cascade stage C"),
        S("Stable_Cascade_B", "Stable_Cascade_B",
          {"stable_cascade_stage": "b", "c_hidden": [320, 640, 1280, 1280], "nhead": [-1, -1, 20, 20],
           "blocks": [[2, 6, 28, 6], [6, 28, 6, 2]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]]},
          "Stable Cascade stage B"),
        # --- MMDiT (SD3) ---
        S("SD3", "SD3", dict(_SD3, depth=24, context_embedder_config=_SD3_CTX(1536), num_patches=36864,
                              pos_embed_max_size=192), "SD3 Medium (2B)"),
        S("SD35_Medium", "SD3", dict(_SD3, depth=24, context_embedder_config=_SD3_CTX(1536), num_patches=147456,
                                     pos_embed_max_size=384, qk_norm="rms",
                                     x_block_self_attn_layers=list(range(13))), "SD 3.5 Medium"),
        S("SD35_Large", "SD3", dict(_SD3, depth=38, context_embedder_config=_SD3_CTX(2432), num_patches=36864,
                                    pos_embed_max_size=192, qk_norm="rms"), "SD 3.5 Large (8B)"),
        S("StableAudio", "StableAudio", {"audio_model": "dit1.0"}, "Stable Audio Open 1.0"),
        S("AuraFlow", "AuraFlow", {"max_seq": 1024, "cond_seq_dim": 2048, "n_double_layers": 4, "n_layers": 36},
          "AuraFlow"),
        S("PixArtAlpha", "PixArtAlpha", {"num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
                                         "depth": 28, "model_max_length": 120, "input_size": 128, "pe_interpolation": 2,
                                         "image_model": "pixart_alpha", "micro_condition": True}, "PixArt-alpha 1024"),
        S("PixArtSigma", "PixArtSigma", {"num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
                                         "depth": 28, "model_max_length": 300, "input_size": 128, "pe_interpolation": 2,
                                         "image_model": "pixart_sigma", "micro_condition": False}, "PixArt-sigma 1024"),
        S("HunyuanDiT", "HunyuanDiT", {"image_model": "hydit", "depth": 40, "hidden_size": 1408, "mlp_ratio": 4.3637},
          "Hunyuan-DiT 1.0/1.1"),
        S("HunyuanDiT1", "HunyuanDiT1", {"image_model": "hydit1", "depth": 40, "hidden_size": 1408,
                                         "mlp_ratio": 4.3637, "size_cond": True, "use_style_cond": True},
          "Hunyuan-DiT 1.2+"),
        # --- Flux family ---
        S("Flux", "Flux", _FLUX, "FLUX.1 dev", 11_901_408_320),
        S("FluxSchnell", "FluxSchnell", dict(_FLUX, guidance_embed=False), "FLUX.1 schnell"),
        S("FluxInpaint", "FluxInpaint", dict(_FLUX, in_channels=96), "FLUX.1 Fill"),
        S("Flux2", "Flux2", {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 48, "mlp_ratio": 3.0,
                             "theta": 2000, "out_channels": 128, "global_modulation": True, "vec_in_dim": None,
                             "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
                             "default_ref_method": "index", "ref_index_scale": 10.0, "in_channels": 128,
                             "hidden_size": 6144, "context_in_dim": 15360, "patch_size": 1, "depth": 8,
                             "depth_single_blocks": 48, "guidance_embed": True}, "FLUX.2 dev"),
        S("Chroma", "Chroma", _CHROMA, "Chroma"),
        S("ChromaRadiance", "ChromaRadiance",
          dict(_CHROMA, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
               nerf_hidden_size=64, nerf_mlp_ratio=4, nerf_depth=4, nerf_max_freqs=8, nerf_tile_size=512,
               nerf_final_head_type="conv", nerf_embedder_dtype=None), "Chroma Radiance (pixel space)"),
        # --- video / other DiTs ---
        S("GenmoMochi", "GenmoMochi",
          {"image_model": "mochi_preview", "depth": 48, "patch_size": 2, "num_heads": 24, "hidden_size_x": 3072,
           "hidden_size_y": 1536, "mlp_ratio_x": 4.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12,
           "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
           "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False,
           "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 4096, "t5_token_length": 256,
           "rope_theta": 10000.0}, "Mochi 1 preview"),
        S("LTXV", "LTXV", {"image_model": "ltxv", "num_layers": 28, "attention_head_dim": 64,
                           "cross_attention_dim": 2048}, "LTX-Video 2B"),
        S("LTXV_13B", "LTXV", {"image_model": "ltxv", "num_layers": 48, "attention_head_dim": 128,
                               "cross_attention_dim": 4096}, "LTX-Video 13B"),
        S("HunyuanVideo", "HunyuanVideo", _HUNYUAN_VIDEO, "HunyuanVideo"),
        S("HunyuanVideoI2V", "HunyuanVideoI2V", dict(_HUNYUAN_VIDEO, in_channels=33), "HunyuanVideo I2V"),
        S("HunyuanVideoSkyreelsI2V", "HunyuanVideoSkyreelsI2V", dict(_HUNYUAN_VIDEO, in_channels=32),
          "SkyReels V1 I2V"),
        S("HunyuanImage21", "HunyuanImage21",
          dict(_HUNYUAN_VIDEO, in_channels=64, out_channels=64, patch_size=[1, 1], vec_in_dim=None,
               axes_dim=[64, 64], context_in_dim=3584, hidden_size=3584, num_heads=28, byt5=True,
               guidance_embed=False), "HunyuanImage 2.1"),
        S("HunyuanImage21Refiner", "HunyuanImage21Refiner",
          dict(_HUNYUAN_VIDEO, in_channels=128, out_channels=64, patch_size=[1, 1, 1], vec_in_dim=None,
               context_in_dim=3584, hidden_size=3328, num_heads=26, meanflow=True), "HunyuanImage 2.1 refiner"),
        S("HunyuanVideo15", "HunyuanVideo15",
          dict(_HUNYUAN_VIDEO, in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
               context_in_dim=3584, hidden_size=2048, num_heads=16, depth=54, depth_single_blocks=0, byt5=True,
               guidance_embed=False, use_cond_type_embedding=True, vision_in_dim=1152), "HunyuanVideo 1.5"),
        S("HunyuanVideo15_SR_Distilled", "HunyuanVideo15_SR_Distilled",
          dict(_HUNYUAN_VIDEO, in_channels=98, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
               context_in_dim=3584, hidden_size=2048, num_heads=16, depth=54, depth_single_blocks=0, byt5=True,
               guidance_embed=False, use_cond_type_embedding=True, vision_in_dim=1152),
          "HunyuanVideo 1.5 super-resolution"),
        S("CosmosT2V", "CosmosT2V", _COSMOS, "Cosmos-1.0 T2V 7B"),
        S("CosmosT2V_14B", "CosmosT2V", _COSMOS_14B, "Cosmos-1.0 T2V 14B"),
        S("CosmosI2V", "CosmosI2V", dict(_COSMOS, in_channels=17), "Cosmos-1.0 V2W 7B"),
        S("CosmosT2IPredict2", "CosmosT2IPredict2", _PREDICT2, "Cosmos-Predict2 2B T2I"),
        S("CosmosT2IPredict2_14B", "CosmosT2IPredict2", dict(_PREDICT2, model_channels=5120, num_blocks=36,
                                                             num_heads=40), "Cosmos-Predict2 14B T2I"),
        S("CosmosI2VPredict2", "CosmosI2VPredict2",
          dict(_PREDICT2, in_channels=17, rope_h_extrapolation_ratio=3.0, rope_w_extrapolation_ratio=3.0),
          "Cosmos-Predict2 2B V2W"),
        S("Lumina2", "Lumina2", _LUMINA2, "Lumina Image 2.0"),
        S("ZImage", "ZImage", dict(_LUMINA2, dim=3840, cap_feat_dim=2560, n_layers=30, n_heads=30, n_kv_heads=30,
                                   axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                                   ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                                   pad_tokens_multiple=32), "Z-Image"),
        S("WAN21_T2V", "WAN21_T2V", _WAN_14B, "Wan 2.1 T2V 14B (also Wan 2.2 A14B T2V)"),
        S("WAN21_T2V_1_3B", "WAN21_T2V", _WAN_1_3B, "Wan 2.1 T2V 1.3B"),
        S("WAN21_I2V", "WAN21_I2V", dict(_WAN_14B, in_dim=36, model_type="i2v"), "Wan 2.1 I2V 14B"),
        S("WAN21_FunControl2V", "WAN21_FunControl2V", dict(_WAN_14B, in_dim=48, model_type="i2v"),
          "Wan 2.1 Fun Control 14B"),
        S("WAN21_FunControl2V_1_1", "WAN21_FunControl2V",
          dict(_WAN_14B, in_dim=48, model_type="i2v", in_dim_ref_conv=16),
          "Wan 2.1 Fun 1.1 Control 14B (+ reference-image ref_conv)"),
        S("WAN21_Vace", "WAN21_Vace", dict(_WAN_14B, model_type="vace", vace_in_dim=96, vace_layers=8),
          "Wan 2.1 VACE 14B"),
        S("WAN21_Vace_1_3B", "WAN21_Vace", dict(_WAN_1_3B, model_type="vace", vace_in_dim=96, vace_layers=15),
          "Wan 2.1 VACE 1.3B"),
        S("WAN21_Camera", "WAN21_Camera", dict(_WAN_14B, in_dim=32, model_type="camera"), "Wan 2.1 Fun Camera"),
        S("WAN22_Camera", "WAN22_Camera", dict(_WAN_14B, in_dim=36, model_type="camera_2.2"),
          "Wan 2.2 Fun Camera"),
        S("WAN21_HuMo", "WAN21_HuMo", dict(_WAN_14B, model_type="humo"), "HuMo (Wan 14B based)"),
        S("WAN22_S2V", "WAN22_S2V", dict(_WAN_14B, model_type="s2v"), "Wan 2.2 S2V 14B"),
        S("WAN22_Animate", "WAN22_Animate", dict(_WAN_14B, in_dim=36, model_type="animate"), "Wan 2.2 Animate 14B"),
        S("WAN22_T2V", "WAN22_T2V", dict(_WAN, dim=3072, num_heads=24, ffn_dim=14336, num_layers=30, in_dim=48,
                                         out_dim=48), "Wan 2.2 TI2V 5B"),
        S("Hunyuan3Dv2", "Hunyuan3Dv2", {"image_model": "hunyuan3d2", "in_channels": 64, "context_in_dim": 1536,
                                         "hidden_size": 1024, "mlp_ratio": 4.0, "num_heads": 16, "depth": 16,
                                         "depth_single_blocks": 32, "qkv_bias": True, "guidance_embed": False},
          "Hunyuan3D 2.0"),
        S("Hunyuan3Dv2mini", "Hunyuan3Dv2mini", {"image_model": "hunyuan3d2", "in_channels": 64,
                                                 "context_in_dim": 1536, "hidden_size": 1024, "mlp_ratio": 4.0,
                                                 "num_heads": 16, "depth": 8, "depth_single_blocks": 16,
                                                 "qkv_bias": True, "guidance_embed": False}, "Hunyuan3D 2 mini"),
        S("Hunyuan3Dv2_1", "Hunyuan3Dv2_1", {"image_model": "hunyuan3d2_1", "in_channels": 64, "context_dim": 1024,
                                             "hidden_size": 2048, "mlp_ratio": 4.0, "num_heads": 16, "depth": 21,
                                             "qkv_bias": False, "guidance_cond_proj_dim": None}, "Hunyuan3D 2.1"),
        S("HiDream", "HiDream",
          {"image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32],
           "caption_channels": [4096, 4096], "max_resolution": [128, 128], "in_channels": 16,
           "llama_layers": list(range(32)) + [31] * 16, "num_attention_heads": 20, "num_routed_experts": 4,
           "num_activated_experts": 2, "num_layers": 16, "num_single_layers": 32, "out_channels": 16,
           "patch_size": 2, "text_emb_dim": 2048}, "HiDream-I1"),
        S("ACEStep", "ACEStep",
          {"audio_model": "ace", "attention_head_dim": 128, "in_channels": 8, "inner_dim": 2560, "max_height": 16,
           "max_position": 32768, "max_width": 32768, "mlp_ratio": 2.5, "num_attention_heads": 20,
           "num_layers": 24, "out_channels": 8, "patch_size": [16, 1], "rope_theta": 1000000.0,
           "speaker_embedding_dim": 512, "text_embedding_dim": 768, "ssl_encoder_depths": [8, 8],
           "ssl_latent_dims": [1024, 768], "ssl_names": ["mert", "m-hubert"], "lyric_encoder_vocab_size": 6693,
           "lyric_hidden_size": 1024}, "ACE-Step"),
        S("Omnigen2", "Omnigen2",
          {"image_model": "omnigen2", "axes_dim_rope": [40, 40, 40], "axes_lens": [1024, 1664, 1664],
           "ffn_dim_multiplier": None, "hidden_size": 2520, "in_channels": 16, "multiple_of": 256,
           "norm_eps": 1e-05, "num_attention_heads": 21, "num_kv_heads": 7, "num_layers": 32,
           "num_refiner_layers": 2, "out_channels": None, "patch_size": 2, "text_feat_dim": 2048,
           "timestep_scale": 1000.0}, "OmniGen2"),
        S("QwenImage", "QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
          "Qwen-Image 20B"),
    ]
    return out


_SPECS: Dict[str, ArchSpec] = {s.name: s for s in _specs()}
ARCHITECTURES: Tuple[str, ...] = tuple(_SPECS)
"""Every architecture name :func:`meta_model` knows (config-class names, plus size variants)."""

UNSUPPORTED: Dict[str, str] = {}
"""Config classes of ComfyUI 0.3.75's ``comfy.supported_models.models`` that no architecture here covers,
with the reason.  Empty: every class builds on meta.  (See :func:`uncovered_config_classes` for the
ComfyUI actually loaded, which may be a different version.)"""


def arch_spec(arch: str) -> ArchSpec:
    try:
        return _SPECS[arch]
    except KeyError:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None


def config_class(arch: str):
    """The ``comfy.supported_models`` class of ``arch`` in the ComfyUI that is loaded."""
    _comfy()
    import comfy.supported_models as sm
    spec = arch_spec(arch)
    cls = getattr(sm, spec.config_class, None)
    if cls is None:
        raise NotImplementedError(f"{arch}: this ComfyUI has no comfy.supported_models.{spec.config_class}")
    return cls


def available_architectures() -> Tuple[str, ...]:
    """The architectures whose config class exists in the ComfyUI that is loaded."""
    _comfy()
    import comfy.supported_models as sm
    return tuple(a for a in ARCHITECTURES if hasattr(sm, _SPECS[a].config_class))


def uncovered_config_classes() -> List[str]:
    """Names of classes in the loaded ComfyUI's ``supported_models.models`` that no spec covers."""
    _comfy()
    import comfy.supported_models as sm
    covered = {s.config_class for s in _SPECS.values()}
    return [c.__name__ for c in sm.models if c.__name__ not in covered]


def _get_model(cls_obj, model_config, device, state_dict=None):
    """``model_config.get_model`` with the extra inputs a few classes take from the checkpoint."""
    torch = _comfy()
    checkpoint_extras = _engine_blocks().checkpoint_extras
    sd = dict(state_dict or {})
    for k, v in checkpoint_extras(type(model_config).__name__, device).items():
        sd.setdefault(k, v)
    return model_config.get_model(sd, "", device=device)


def _engine_blocks():
    import sys
    from . import REPO_ROOT
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from engine import blocks
    return blocks


_meta_cache: Dict[Tuple[str, Any], Any] = {}


def meta_model(arch: str, dtype=None):
    """The full-size ``comfy.model_base`` model of ``arch`` on ``torch.device("meta")`` (cached, shared:
    do not modify).  ``dtype`` defaults to the config class's first supported inference dtype."""
    torch = _comfy()
    dtype = _torch_dtype(dtype)
    key = (arch, dtype)
    with _lock:
        if key in _meta_cache:
            return _meta_cache[key]
        cls = config_class(arch)
        spec = arch_spec(arch)
        model_config = cls(dict(spec.unet_config))
        dt = dtype or model_config.supported_inference_dtypes[0]
        model_config.set_inference_dtype(dt, None)
        # (model_base logs two lines per build)
        with _quiet(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _get_model(cls, model_config, torch.device("meta"))
            # a few ComfyUI modules ignore ``device`` for small tensors (e.g. Wan Animate's motion
            # encoder biases): put everything of the diffusion model on meta
            model.diffusion_model.to(torch.device("meta"))
        _meta_cache[key] = model
        return model


_shape_cache: Dict[str, "collections.OrderedDict"] = {}


def meta_unet_shapes(arch: str) -> "collections.OrderedDict[str, Any]":
    """``{"diffusion_model.<key>": torch.Size}`` of the full-size ``arch``, in module registration order
    (``state_dict()`` order).  Cached; returns a fresh copy."""
    with _lock:
        if arch not in _shape_cache:
            sd = meta_model(arch).state_dict()
            _shape_cache[arch] = collections.OrderedDict(
                (k, v.shape) for k, v in sd.items() if k.startswith("diffusion_model."))
        return collections.OrderedDict(_shape_cache[arch])


def meta_param_count(arch: str) -> int:
    """Number of elements in the ``diffusion_model.*`` tensors of the full-size ``arch``."""
    return sum(math.prod(s) for s in meta_unet_shapes(arch).values())


def meta_checkpoint_state_dict(arch: str) -> Dict[str, Any]:
    """The UNet part of a checkpoint file of ``arch`` as ComfyUI would save it (on-disk key names, e.g.
    ``model.diffusion_model.*``), as meta tensors."""
    model = meta_model(arch)
    sd = model.state_dict_for_saving()
    return {k: v for k, v in sd.items() if hasattr(v, "shape")}


def detect_meta_arch(arch: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Run ComfyUI's checkpoint detection on the meta checkpoint of ``arch``.

    Returns ``(config class name or None, detected unet_config)``: the class ComfyUI's
    ``model_detection.model_config_from_unet`` picks for a file with these keys and shapes."""
    _comfy()
    import comfy.model_detection as md
    sd = meta_checkpoint_state_dict(arch)
    if arch_spec(arch).config_class == "Stable_Zero123":
        import torch
        sd["cc_projection.weight"] = torch.empty((768, 772), device="meta")
        sd["cc_projection.bias"] = torch.empty((768,), device="meta")
    prefix = md.unet_prefix_from_state_dict(sd)
    with _quiet(logging.ERROR):
        cfg = md.detect_unet_config(sd, prefix)
        mc = md.model_config_from_unet_config(cfg, sd) if cfg is not None else None
    return (type(mc).__name__ if mc is not None else None), (cfg or {})


# ---------------------------------------------------------------------------------------------
# small models with the real block structure
# ---------------------------------------------------------------------------------------------
SMALL_ARCHS: Tuple[str, ...] = ("SD15", "SDXL", "Flux", "FluxSchnell")

# text-encoder sizes: real layer counts and vocabularies (so the real tokenizers work), tiny widths
_CLIP_L_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}
_CLIP_G_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}
_T5_SMALL = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4}

_SMALL_UNET: Dict[str, Dict[str, Any]] = {
    # 12 input / 3 middle / 12 output blocks like SD1.5; context = small clip_l width
    # (SD15's config class forces num_heads=8: head width 4..12 here)
    "SD15": dict(_SD15, model_channels=32, channel_mult=[1, 2, 3, 3], context_dim=_CLIP_L_SMALL["hidden_size"]),
    # 9 input / 3 middle / 9 output blocks like SDXL, with SDXL's transformer depths;
    # context = clip_l + clip_g widths, adm = clip_g projection + 6 * 256 size embeddings
    # (channel_mult must rise at every level for the same skip_connection keys; GroupNorm needs multiples
    # of 32; the config class's num_head_channels=64 is overridden to 32: 2 and 3 heads)
    "SDXL": dict(_SDXL, model_channels=32, channel_mult=[1, 2, 3], num_head_channels=32,
                 context_dim=_CLIP_L_SMALL["hidden_size"] + _CLIP_G_SMALL["hidden_size"],
                 adm_in_channels=_CLIP_G_SMALL["projection_dim"] + 6 * 256),
    # 19 double / 38 single blocks like FLUX.1; context = small t5 width, vec = small clip_l width
    "Flux": dict(_FLUX, hidden_size=64, num_heads=4, axes_dim=[4, 6, 6], context_in_dim=_T5_SMALL["d_model"],
                 vec_in_dim=_CLIP_L_SMALL["hidden_size"]),
}
_SMALL_UNET["FluxSchnell"] = dict(_SMALL_UNET["Flux"], guidance_embed=False)
# MODEL only: an inpainting and an instruct-pix2pix SD1.5 (9 and 8 input channels) and FLUX.1 Fill (img_in
# over 384 inputs), the first layer of each wider than its base model's
_SMALL_UNET["SD15_inpaint"] = dict(_SMALL_UNET["SD15"], in_channels=9)
_SMALL_UNET["SD15_instructpix2pix"] = dict(_SMALL_UNET["SD15"], in_channels=8)
_SMALL_UNET["FluxInpaint"] = dict(_SMALL_UNET["Flux"], in_channels=96)
# MODEL only (no small CLIP, not offered by the loader node): architectures with parameters that ComfyUI's
# loader does not patch (WAN's blocks.N.modulation, SD3's pos_embed)
_SMALL_UNET["WAN21_T2V"] = dict(_WAN, dim=32, num_heads=2, ffn_dim=64, num_layers=2, freq_dim=32, text_dim=32)
_SMALL_UNET["WAN21_FunControl2V_1_1"] = dict(_SMALL_UNET["WAN21_T2V"], in_dim=48, model_type="i2v",
                                             in_dim_ref_conv=16)
_SMALL_UNET["SD3"] = dict(_SD3, depth=2, context_embedder_config=_SD3_CTX(128), num_patches=256,
                          pos_embed_max_size=16, adm_in_channels=64)
_SMALL_CLIP_OPTIONS: Dict[str, Dict[str, Any]] = {
    "SD15": {"clip_l_model_config": _CLIP_L_SMALL},
    "SDXL": {"clip_l_model_config": _CLIP_L_SMALL, "clip_g_model_config": _CLIP_G_SMALL},
    "Flux": {"clip_l_model_config": _CLIP_L_SMALL, "t5xxl_model_config": _T5_SMALL},
}
_SMALL_CLIP_OPTIONS["FluxSchnell"] = _SMALL_CLIP_OPTIONS["Flux"]
_SMALL_CLIP_OPTIONS["SD15_inpaint"] = _SMALL_CLIP_OPTIONS["SD15"]


def small_unet_config(arch: str) -> Dict[str, Any]:
    if arch not in _SMALL_UNET:
        raise KeyError(f"no small model for {arch!r}; small archs: {', '.join(SMALL_ARCHS)}")
    return dict(_SMALL_UNET[arch])


def _unpatch_clones(patcher) -> None:
    """Unload any loaded clone of ``patcher`` so its shared module holds the unpatched weights again.

    ComfyUI patches weights *in place* when it loads a model (on the CPU too) and leaves it loaded after
    a run; a cached fixture must not hand out a module that still carries another graph's merge."""
    import comfy.model_management as mm
    for i in reversed(range(len(mm.current_loaded_models))):
        lm = mm.current_loaded_models[i]
        m = getattr(lm, "model", None)
        if m is not None and m.is_clone(patcher):
            mm.current_loaded_models.pop(i)
            try:
                lm.model_unload()
            except Exception:  # pragma: no cover - defensive: a half-dead entry
                m.detach(True)
    # A clone that was loaded and then garbage collected detaches without unpatching (ModelPatcher.__del__
    # calls detach(unpatch_all=False)); its backup of the original weights is shared by every clone, so
    # the cached patcher can still restore them.
    if patcher.backup or patcher.object_patches_backup:
        patcher.unpatch_model(unpatch_weights=True)


_small_cache: Dict[Tuple, Any] = {}


def _norm_delta(delta_seed, delta_scale):
    if delta_seed is None or not delta_scale:
        return None, 0.0
    return int(delta_seed), float(delta_scale)


def small_model(arch: str, seed: int = 0, dtype=None, delta_seed: Optional[int] = None,
                delta_scale: float = 0.0):
    """A small real ``comfy.model_patcher.ModelPatcher`` with the block structure of ``arch``.

    Built from the real ``comfy.supported_models.<arch>`` config class (so ``model.model.model_config`` is
    e.g. ``SD15``) with :func:`small_unet_config`; on the CPU; weights deterministic from ``seed``;
    ``delta_seed`` / ``delta_scale`` add ``delta_scale * N(0,1)`` noise from ``delta_seed`` (a "fine-tune"
    of the same base).  Cached per arguments; every call returns a fresh ``clone()``.
    Such a model cannot be saved and re-detected by ComfyUI as ``arch`` (its widths differ)."""
    torch = _comfy()
    dtype = _torch_dtype(dtype) or torch.float32
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    key = ("model", arch, int(seed), dtype, delta_seed, delta_scale)
    with _lock:
        patcher = _small_cache.get(key)
        if patcher is None:
            patcher = _build_small_model(arch, int(seed), dtype, delta_seed, delta_scale)
            _small_cache[key] = patcher
        else:
            _unpatch_clones(patcher)
        return patcher.clone()


def _build_small_model(arch, seed, dtype=None, delta_seed=None, delta_scale=0.0, scaled_fp8=None):
    """Build an uncached small model (see :func:`small_model`); ``scaled_fp8``: see
    :func:`small_scaled_fp8_model` (its ``scale_mult``)."""
    torch = _comfy()
    dtype = _torch_dtype(dtype) or torch.float32
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    import comfy.model_management as mm
    import comfy.model_patcher
    cls = config_class(arch)
    cfg = small_unet_config(arch)
    model_config = cls(cfg)
    model_config.unet_config.update(cfg)     # ours wins over the class's unet_extra_config
    if scaled_fp8 is not None:
        model_config.scaled_fp8 = torch.float8_e4m3fn
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    with _quiet(), torch.inference_mode(False):
        model = _get_model(cls, model_config, mm.unet_offload_device())
        _fill_module(model, seed, delta_seed, delta_scale, only_prefix="diffusion_model.")
        if scaled_fp8 is not None:
            _store_scaled_fp8(model, seed, delta_seed, delta_scale, scaled_fp8)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _store_scaled_fp8(model, seed, delta_seed, delta_scale, scale_mult: float) -> None:
    """Each scaled-fp8 layer's weight as value / scale in fp8 e4m3fn, scale = its largest magnitude / 448 ×
    ``scale_mult``."""
    torch = _comfy()
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if hasattr(module, "scale_weight") and w is not None and w.dtype == torch.float8_e4m3fn:
                value = fill_value(name + ".weight", w.shape, seed, delta_seed, delta_scale)
                scale = value.abs().max() / 448.0 * scale_mult
                w.data.copy_((value / scale).to(torch.float8_e4m3fn))
                module.scale_weight.data.copy_(scale)


def small_scaled_fp8_model(arch: str, seed: int = 0, delta_seed: Optional[int] = None, delta_scale: float = 0.0,
                           scale_mult: float = 1.0):
    """An uncached small model stored as scaled fp8, as "fp8_scaled" checkpoints load in ComfyUI: each
    linear layer keeps its weight in fp8 e4m3fn divided by a per-layer fp32 ``scale_weight`` (its largest
    magnitude / 448, times ``scale_mult``); the effective weights are the :func:`small_model` values
    rounded through that storage."""
    return _build_small_model(arch, seed, None, delta_seed, delta_scale, scaled_fp8=scale_mult)


def small_clip(arch: str, seed: int = 0, dtype=None, delta_seed: Optional[int] = None, delta_scale: float = 0.0):
    """A small real ``comfy.sd.CLIP`` with the text encoders of ``arch`` (SD15: clip_l; SDXL: clip_l +
    clip_g; Flux: clip_l + t5xxl).  Built through ComfyUI's own path (the config class's ``clip_target``
    and ``comfy.sd.CLIP``) with per-encoder ``<name>_model_config`` overrides: real module classes, key
    names, layer counts and vocabularies (so the real tokenizers and a forward pass work), tiny widths.
    Same seeding / caching / clone rules as :func:`small_model`."""
    torch = _comfy()
    dtype = _torch_dtype(dtype) or torch.float32
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    key = ("clip", arch, int(seed), dtype, delta_seed, delta_scale)
    with _lock:
        clip = _small_cache.get(key)
        if clip is None:
            clip = _build_small_clip(arch, int(seed), dtype, delta_seed, delta_scale)
            _small_cache[key] = clip
        else:
            _unpatch_clones(clip.patcher)
        return clip.clone()


def _build_small_clip(arch, seed, dtype=None, delta_seed=None, delta_scale=0.0):
    """Build an uncached small CLIP (see :func:`small_clip`)."""
    torch = _comfy()
    dtype = _torch_dtype(dtype) or torch.float32
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    import comfy.sd
    if arch not in _SMALL_CLIP_OPTIONS:
        raise KeyError(f"no small CLIP for {arch!r}; small archs: {', '.join(SMALL_ARCHS)}")
    cls = config_class(arch)
    model_config = cls(small_unet_config(arch))
    target = model_config.clip_target({})
    options = {k: dict(v) for k, v in _SMALL_CLIP_OPTIONS[arch].items()}
    options["dtype"] = dtype
    with _quiet(), torch.inference_mode(False):
        clip = comfy.sd.CLIP(target=target, model_options=options)
        _fill_module(clip.cond_stage_model, seed, delta_seed, delta_scale)
    return clip


def model_nbytes(module) -> int:
    """Bytes of all tensors in ``module.state_dict()``."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if hasattr(t, "numel"))


def block_prefixes(keys: Iterable[str], strip: str = "diffusion_model.") -> List[str]:
    """Block ids like ``input_blocks.4.``, ``double_blocks.12.``, ``blocks.block7.`` (first-appearance
    order), the generic derivation of comfyui-internals.md §4."""
    import re
    pat = re.compile(r"^([A-Za-z_]+)\.(block)?(\d+)\.")
    seen: Dict[str, None] = {}
    for k in keys:
        if strip and k.startswith(strip):
            k = k[len(strip):]
        m = pat.match(k)
        if m:
            seen.setdefault(m.group(0), None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# the harness test node
# ---------------------------------------------------------------------------------------------
class SmallModelLoader:
    """Harness-only test node: a small MODEL and CLIP of the given architecture (see :func:`small_model`)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "arch": (list(SMALL_ARCHS) + ["SD15_inpaint"], {"default": "SD15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            "delta_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            "delta_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.0001}),
            "dtype": (["fp32", "fp16", "bf16", "fp8_e4m3fn"], {"default": "fp32"}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, arch, seed, delta_seed, delta_scale, dtype):
        kw = dict(seed=seed, dtype=dtype, delta_seed=delta_seed if delta_scale else None, delta_scale=delta_scale)
        return (small_model(arch, **kw), small_clip(arch, **kw))


TEST_NODE_ID = "MergeLabTest_SmallModel"


def register_test_nodes(harness) -> None:
    """Register :class:`SmallModelLoader` as ``MergeLabTest_SmallModel`` in ``harness``."""
    harness.register_test_node(TEST_NODE_ID, SmallModelLoader)


# ---------------------------------------------------------------------------------------------
# full-size SD1.5 checkpoint on disk
# ---------------------------------------------------------------------------------------------
_SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
DEFAULT_TUNED_DELTA_SEED = 1
DEFAULT_TUNED_DELTA_SCALE = 0.002


_layout_cache: Dict[str, Any] = {}


def sd15_checkpoint_layout() -> "collections.OrderedDict[str, Tuple[Tuple[int, ...], Any]]":
    """``{on-disk key: (shape, torch dtype)}`` of an SD1.5 checkpoint as ComfyUI saves it (UNet from the
    meta SD15 model, CLIP-L from ``sd1_clip.SD1ClipModel`` and the KL VAE from ``comfy.ldm``, all on meta,
    passed through ``state_dict_for_saving`` / ``process_*_state_dict_for_saving``).  Floats are fp16."""
    with _lock:
        if "sd15" not in _layout_cache:
            _layout_cache["sd15"] = _sd15_layout()
        return collections.OrderedDict(_layout_cache["sd15"])


def _sd15_layout():
    torch = _comfy()
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    meta = torch.device("meta")
    unet = meta_model("SD15", torch.float16)
    clip = comfy.sd1_clip.SD1ClipModel(device=meta, dtype=torch.float16)
    with meta:
        vae = AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
    sd = unet.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    out = collections.OrderedDict()
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        dt = torch.float16 if v.is_floating_point() else v.dtype
        out[k] = (tuple(v.shape), dt)
    return out


_ST_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def _st_dtype(dt) -> str:
    return _ST_DTYPES[str(dt).replace("torch.", "")]


def read_safetensors_metadata(path: str) -> Optional[Dict[str, str]]:
    """The ``__metadata__`` of a safetensors file (header only), or None if unreadable/truncated."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size:
                return None
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return None
        return header.get("__metadata__", {}) or {}
    except (OSError, ValueError, KeyError, struct.error):
        return None


def write_safetensors_streaming(path: str, layout, value_fn: Callable[[str, Tuple[int, ...], Any], Any],
                                metadata: Optional[Dict[str, str]] = None,
                                progress: Optional[Callable[[int, int], None]] = None, workers: int = 2) -> None:
    """Write a safetensors file tensor by tensor: ``value_fn(key, shape, dtype)`` returns each tensor
    (already in ``dtype``); only one tensor is in memory at a time.  Atomic (temp file + ``os.replace``)."""
    torch = _comfy()
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for k, (shape, dt) in layout.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _st_dtype(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    # a writer thread overlaps disk writes with generating the next tensor (both release the GIL);
    # the bounded queue keeps at most a few tensors in memory
    import queue
    q: "queue.Queue" = queue.Queue(maxsize=3)
    errors: List[BaseException] = []

    def writer(f):
        while True:
            item = q.get()
            if item is None:
                return
            if not errors:
                try:
                    f.write(memoryview(item))
                except BaseException as e:  # pragma: no cover - disk full etc.
                    errors.append(e)

    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            th = threading.Thread(target=writer, args=(f,), daemon=True)
            th.start()
            try:
                total = len(layout)
                with _single_thread():   # parallelism comes from the generator threads instead
                    for i, (k, shape, dt, t) in enumerate(_generate_ahead(layout, value_fn, workers)):
                        if errors:
                            break
                        if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                            raise ValueError(f"{k}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dt}")
                        if t.numel():
                            q.put(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                        if progress:
                            progress(i + 1, total)
            finally:
                q.put(None)
                th.join()
            if errors:
                raise errors[0]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _generate_ahead(layout, value_fn, workers: int):
    """Yield ``(key, shape, dtype, value_fn(...))`` in layout order, computing up to ``workers`` tensors
    ahead in threads (torch's RNG and casts release the GIL)."""
    items = list(layout.items())
    if workers <= 1:
        for k, (shape, dt) in items:
            yield k, shape, dt, value_fn(k, shape, dt)
        return
    from concurrent.futures import ThreadPoolExecutor
    pending: "collections.deque" = collections.deque()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        it = iter(items)
        try:
            for _ in range(workers):
                k, (shape, dt) = next(it)
                pending.append((k, shape, dt, ex.submit(value_fn, k, shape, dt)))
        except StopIteration:
            pass
        while pending:
            k, shape, dt, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                nk, (nshape, ndt) = nxt
                pending.append((nk, nshape, ndt, ex.submit(value_fn, nk, nshape, ndt)))
            yield k, shape, dt, fut.result()


def _sd15_value(seed, delta_seed, delta_scale):
    torch = _comfy()

    def value(key, shape, dt):
        if not dt.is_floating_point:
            return torch.arange(math.prod(shape), dtype=dt).reshape(shape)
        return fill_value(key, shape, seed, delta_seed, delta_scale).to(dt)
    return value


def full_sd15_checkpoint(path: Optional[str] = None, seed: int = 0, delta_seed: Optional[int] = None,
                         delta_scale: float = 0.0, force: bool = False) -> str:
    """Path of a full-size SD1.5 checkpoint (UNet + CLIP-L + VAE, ~2.1 GB fp16, random weights from
    ``seed``; with ``delta_seed``/``delta_scale``: the same plus ``delta_scale * N(0,1)`` per tensor).

    Cached under ``CACHE_DIR/fixtures/`` (or at ``path``) and reused when its metadata stamp (format
    version, seed, delta, a hash of the key/shape layout) matches and the file is complete; otherwise
    generated streaming (~15-60 s on 2 cores, ~2.1 GB written) and written atomically."""
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    stamp = {"mergelab_fixture": "sd15_full", "format_version": str(FORMAT_VERSION), "seed": str(int(seed)),
             "delta_seed": "" if delta_seed is None else str(delta_seed),
             "delta_scale": "" if delta_seed is None else repr(delta_scale)}
    if path is None:
        name = f"sd15_full_s{int(seed)}"
        if delta_seed is not None:
            name += f"_d{delta_seed}x{delta_scale:g}"
        path = os.path.join(FIXTURE_DIR, f"{name}_v{FORMAT_VERSION}.safetensors")
    with _lock:
        layout = sd15_checkpoint_layout()
        stamp["layout_sha1"] = hashlib.sha1(
            json.dumps([[k, list(s), str(d)] for k, (s, d) in layout.items()]).encode()).hexdigest()
        if not force:
            meta = read_safetensors_metadata(path)
            if meta is not None and all(meta.get(k) == v for k, v in stamp.items()):
                return path
        t0 = time.time()
        write_safetensors_streaming(path, layout, _sd15_value(int(seed), delta_seed, delta_scale),
                                    metadata=dict(stamp, format="pt"))
        logging.info("mergelab.fixtures: wrote %s in %.1fs", path, time.time() - t0)
    return path


def tuned_sd15_checkpoint(seed: int = 0, delta_seed: int = DEFAULT_TUNED_DELTA_SEED,
                          delta_scale: float = DEFAULT_TUNED_DELTA_SCALE, path: Optional[str] = None) -> str:
    """A second full-size SD1.5 checkpoint = :func:`full_sd15_checkpoint` (``seed``) + small deltas."""
    return full_sd15_checkpoint(path=path, seed=seed, delta_seed=delta_seed, delta_scale=delta_scale)


def expected_sd15_tensor(key: str, seed: int = 0, delta_seed: Optional[int] = None, delta_scale: float = 0.0):
    """The exact tensor (fp16) the checkpoint of these arguments holds under on-disk ``key``."""
    delta_seed, delta_scale = _norm_delta(delta_seed, delta_scale)
    shape, dt = sd15_checkpoint_layout()[key]
    return _sd15_value(int(seed), delta_seed, delta_scale)(key, shape, dt)
