"""Tiny random-init diffusers DiTs and matching inputs, for tests, the demo and quick benchmarks.

No hub access: every model is built from a config with seeded random weights. ``FAMILIES`` is one
table over diffusers' transformer families: the class, a tiny config, and the forward inputs; the
three families with ``layers`` / ``heads`` overrides (dit, pixart, flux) are what the property
tests draw random configs from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["FAMILIES", "Family", "TINY_MODELS", "make_model", "make_inputs", "randomize_zero_params"]

TEXT_LEN = 5


@dataclass(frozen=True)
class Family:
    """One diffusers transformer family: ``cls`` (name in ``diffusers``), a tiny ``config``, the keyword
    overrides the property tests use (``layers`` / ``heads`` / ... -> config keys), and ``inputs``:
    ``(model, batch, timestep, generator) -> forward kwargs`` (``return_dict=False`` is added)."""

    cls: str
    config: dict
    inputs: Callable
    overrides: dict = field(default_factory=dict)
    video: bool = False


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _latent_2d(model, batch, g):
    c = model.config
    return _randn(g, batch, c.in_channels, c.sample_size, c.sample_size)


def _dit_inputs(model, batch, t, g):
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                class_labels=torch.randint(0, model.config.num_embeds_ada_norm, (batch,), generator=g))


def _pixart_inputs(model, batch, t, g):
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, model.config.caption_channels),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _pixart_sigma_inputs(model, batch, t, g):
    # Σ-style: micro-conditions on (use_additional_conditions), an attention mask over the caption
    mask = torch.ones(batch, TEXT_LEN)
    mask[:, -1] = 0
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, model.config.caption_channels),
                encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": torch.full((batch, 2), 64.0), "aspect_ratio": torch.ones(batch, 1)})


def _flux_ids(frames, side, text_len):
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([f.flatten(), r.flatten(), c.flatten()], -1).float(), torch.zeros(text_len, 3)


def _flux_inputs(model, batch, t, g, side=4):
    c = model.config
    img_ids, txt_ids = _flux_ids(1, side, TEXT_LEN)
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim),
                timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids)


def _sd3_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim))


def _hunyuan_video_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim))


def _wan_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_dim))


def _cogvideox_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, 2, c.in_channels, c.sample_height, c.sample_width), timestep=t,
                encoder_hidden_states=_randn(g, batch, c.max_text_seq_length, c.text_embed_dim))


def _ltx_inputs(model, batch, t, g, frames=2, side=4):
    c = model.config
    return dict(hidden_states=_randn(g, batch, frames * side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels), timestep=t,
                encoder_attention_mask=torch.ones(batch, TEXT_LEN), num_frames=frames, height=side, width=side,
                rope_interpolation_scale=(1.0, 1.0, 1.0))


def _sana_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN))


def _qwen_inputs(model, batch, t, g, side=4):
    c = model.config
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(batch, TEXT_LEN), timestep=t / 1000.0,
                img_shapes=[[(1, side, side)]] * batch)


def _lumina2_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t / 1000.0,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.cap_feat_dim),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool))


def _hunyuan_dit_inputs(model, batch, t, g):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    c = model.config
    side = c.sample_size // c.patch_size
    head_dim = c.hidden_size // c.num_attention_heads
    rope = get_2d_rotary_pos_embed(head_dim, ((0, 0), (side, side)), (side, side), use_real=True)
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, c.text_len, c.cross_attention_dim),
                text_embedding_mask=torch.ones(batch, c.text_len),
                encoder_hidden_states_t5=_randn(g, batch, c.text_len_t5, c.cross_attention_dim_t5),
                text_embedding_mask_t5=torch.ones(batch, c.text_len_t5),
                image_meta_size=torch.tensor([[64, 64, 64, 64, 0, 0]] * batch, dtype=torch.float32),
                style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=rope)


_HEADS = {"layers": "num_layers", "heads": "num_attention_heads", "head_dim": "attention_head_dim"}

FAMILIES: dict[str, Family] = {
    "dit": Family("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1), _dit_inputs,
        {**_HEADS, "sample": "sample_size", "classes": "num_embeds_ada_norm"}),
    "pixart": Family("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=1), _pixart_inputs,
        {**_HEADS, "sample": "sample_size"}),
    "pixart-sigma": Family("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=48, caption_channels=24, norm_num_groups=1, interpolation_scale=2,
        use_additional_conditions=True), _pixart_sigma_inputs),
    "flux": Family("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)), _flux_inputs, {**_HEADS, "single_layers": "num_single_layers"}),
    "sd3": Family("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        pos_embed_max_size=16), _sd3_inputs),
    "hunyuan-video": Family("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6)), _hunyuan_video_inputs, video=True),
    "wan": Family("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64), _wan_inputs, video=True),
    "cogvideox": Family("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN), _cogvideox_inputs, video=True),
    "ltx-video": Family("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=24), _ltx_inputs, video=True),
    "sana": Family("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        mlp_ratio=2.5, sample_size=8, patch_size=1), _sana_inputs),
    "qwen-image": Family("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6)), _qwen_inputs),
    "lumina2": Family("Lumina2Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=32, num_layers=2,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32), cap_feat_dim=24), _lumina2_inputs),
    "hunyuan-dit": Family("HunyuanDiT2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=4, cross_attention_dim=24, cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=TEXT_LEN,
        text_len_t5=6), _hunyuan_dit_inputs),
}

TINY_MODELS = FAMILIES     # the name earlier releases used


def _family(name: str) -> Family:
    from .tiny_others import OTHER_FAMILIES

    known = {**FAMILIES, **OTHER_FAMILIES}
    if name not in known:
        raise ValueError(f"family must be one of {sorted(known)}, got {name!r}")
    return known[name]


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build a tiny ``family`` model (``FAMILIES`` or ``tiny_others.OTHER_FAMILIES``) with seeded random
    weights, in eval mode. ``overrides`` are the family's short names (``layers``, ...) or config keys."""
    import diffusers

    fam = _family(family)
    config = {**fam.config, **{fam.overrides.get(k, k): v for k, v in overrides.items()}}
    if family == "pixart":                       # cross-attention runs at the hidden width
        config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    torch.manual_seed(seed)
    return randomize_zero_params(getattr(diffusers, fam.cls)(**config))


def randomize_zero_params(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-inits several output layers (adaLN-Zero gates, final projections); random
    weights there make every branch visible in the output, so a broken cache cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model.eval()


def make_inputs(family: str, model: torch.nn.Module, batch: int = 2, timestep: float = 500.0,
                seed: int = 0, **kw) -> dict:
    """Keyword inputs for one forward call of a tiny ``family`` model (``return_dict=False``)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((batch,), float(timestep))
    return {**_family(family).inputs(model, batch, t, g, **kw), "return_dict": False}
