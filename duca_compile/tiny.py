"""Tiny random-init diffusers DiTs and matching inputs, for tests, the demo and quick benchmarks.

No hub access: every model is built from a config with seeded random weights.
"""
from __future__ import annotations

import torch

__all__ = ["TINY_MODELS", "make_model", "make_inputs", "randomize_zero_params"]


def _dit(layers: int = 2, sample: int = 8, heads: int = 2, head_dim: int = 16, classes: int = 10):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=sample, patch_size=2, num_embeds_ada_norm=classes,
        norm_num_groups=1,
    )


def _pixart(layers: int = 2, sample: int = 8, heads: int = 2, head_dim: int = 16):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=sample, patch_size=2, cross_attention_dim=heads * head_dim,
        caption_channels=24, norm_num_groups=1,
    )


def _flux(layers: int = 1, single_layers: int = 2, sample: int = 8, heads: int = 2, head_dim: int = 16):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=24,
        pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )


TINY_MODELS = {"dit": _dit, "pixart": _pixart, "flux": _flux}


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build a tiny ``family`` model with seeded random weights, in eval mode."""
    if family not in TINY_MODELS:
        raise ValueError(f"family must be one of {sorted(TINY_MODELS)}, got {family!r}")
    torch.manual_seed(seed)
    return randomize_zero_params(TINY_MODELS[family](**overrides))


def randomize_zero_params(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-inits several output layers (adaLN-Zero gates, final projections); random
    weights there make every branch visible in the output, so a broken cache cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model.eval()


def make_inputs(family: str, model: torch.nn.Module, batch: int = 2, timestep: float = 500.0,
                seed: int = 0, text_len: int = 5) -> dict:
    """Keyword inputs for one forward call of a tiny ``family`` model (return_dict=False)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    t = torch.full((batch,), float(timestep))
    if family == "dit":
        s = cfg.sample_size
        return dict(hidden_states=torch.randn(batch, cfg.in_channels, s, s, generator=g), timestep=t,
                    class_labels=torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g),
                    return_dict=False)
    if family == "pixart":
        s = cfg.sample_size
        return dict(hidden_states=torch.randn(batch, cfg.in_channels, s, s, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(batch, text_len, cfg.caption_channels, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if family == "flux":
        side = 4
        n_img = side * side
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros(n_img), rows.flatten().float(), cols.flatten().float()], -1)
        return dict(hidden_states=torch.randn(batch, n_img, cfg.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                    timestep=t / 1000.0, img_ids=img_ids, txt_ids=torch.zeros(text_len, 3),
                    return_dict=False)
    raise ValueError(f"family must be one of {sorted(TINY_MODELS)}, got {family!r}")
