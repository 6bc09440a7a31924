"""Full-size diffusers architectures (DiT-XL/2, PixArt-α, FLUX.1-dev): configs and call inputs.

Built on the ``meta`` device they have the real shapes and no weights, which is all the FLOP report
needs (``duca_compile.flops_report``); the GPU benchmark builds them with random bf16 weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModelSpec", "MODELS", "STEPS", "meta_model", "model_inputs"]


@dataclass(frozen=True)
class ModelSpec:
    """A diffusers transformer config at full size, and the inputs of one call at ``batch``."""

    cls: str
    kwargs: dict
    inputs: object          # (model, batch) -> keyword inputs, on the model's device
    about: str = ""

    def build(self, **overrides) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.cls)(**{**self.kwargs, **overrides}).eval()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dit_inputs(model, batch):
    c, d = model.config, _device(model)
    s = c.sample_size
    return dict(hidden_states=torch.zeros(batch, c.in_channels, s, s, device=d),
                timestep=torch.zeros(batch, device=d),
                class_labels=torch.zeros(batch, dtype=torch.long, device=d), return_dict=False)


def _pixart_inputs(model, batch, text_len=120):
    c, d = model.config, _device(model)
    s = c.sample_size
    cond = {"resolution": None, "aspect_ratio": None}
    if model.use_additional_conditions:
        cond = {"resolution": torch.zeros(batch, 2, device=d), "aspect_ratio": torch.zeros(batch, 1, device=d)}
    return dict(hidden_states=torch.zeros(batch, c.in_channels, s, s, device=d),
                timestep=torch.zeros(batch, device=d),
                encoder_hidden_states=torch.zeros(batch, text_len, c.caption_channels, device=d),
                added_cond_kwargs=cond, return_dict=False)


def _flux_inputs(model, batch, image_tokens=4096, text_len=512):
    c, d = model.config, _device(model)
    kw = dict(hidden_states=torch.zeros(batch, image_tokens, c.in_channels, device=d),
              encoder_hidden_states=torch.zeros(batch, text_len, c.joint_attention_dim, device=d),
              pooled_projections=torch.zeros(batch, c.pooled_projection_dim, device=d),
              timestep=torch.zeros(batch, device=d), img_ids=torch.zeros(image_tokens, 3, device=d),
              txt_ids=torch.zeros(text_len, 3, device=d), return_dict=False)
    if c.guidance_embeds:
        kw["guidance"] = torch.zeros(batch, device=d)
    return kw


MODELS: dict[str, ModelSpec] = {
    "dit-xl-2": ModelSpec("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        _dit_inputs, "DiT-XL/2, 256x256 (32x32 latent, 256 tokens), class-conditional"),
    "pixart-alpha": ModelSpec("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
        use_additional_conditions=True), _pixart_inputs,
        "PixArt-alpha XL/2, 1024x1024 (4096 tokens), 120 T5 tokens"),
    "flux-dev": ModelSpec("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), _flux_inputs,
        "FLUX.1-dev, 1024x1024 (4096 image tokens), 512 T5 tokens"),
}

_FAMILY_INPUTS = {"DiTTransformer2DModel": _dit_inputs, "PixArtTransformer2DModel": _pixart_inputs,
                  "FluxTransformer2DModel": _flux_inputs}


def meta_model(name: str, **overrides) -> torch.nn.Module:
    """A registry model built on the ``meta`` device: full-size shapes, no weights."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} or an nn.Module, got {name!r}")
    with torch.device("meta"):
        return MODELS[name].build(**overrides)


def model_inputs(model: torch.nn.Module, batch: int = 2) -> dict:
    """Keyword inputs of one call of a DiT / PixArt / Flux transformer, on its device."""
    fn = _FAMILY_INPUTS.get(type(model).__name__)
    if fn is None:
        raise ValueError(f"no input recipe for {type(model).__name__}: pass inputs=dict(...) to flops_report")
    return fn(model, batch)


# Steps each model's presets were tuned for (duca_compile.policies.presets.MODELS).
STEPS = {"dit-xl-2": 50, "pixart-alpha": 20, "flux-dev": 50}
