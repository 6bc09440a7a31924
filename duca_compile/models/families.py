"""The tiny families: one table over diffusers' transformer families, built with random weights.

Each entry is a diffusers class, a tiny config and the forward-input recipe (``inputs.py``). The
families with ``layers`` / ``heads`` overrides (dit, pixart, flux) are what the property tests draw
random configs from; ``conformance/expected.py`` says what each must yield.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import inputs
from .inputs import TEXT_LEN

__all__ = ["FAMILIES", "Family", "family", "make_model", "make_inputs", "randomize_zero_params"]


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


_HEADS = {"layers": "num_layers", "heads": "num_attention_heads", "head_dim": "attention_head_dim"}
_HIDREAM = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, caption_channels=[24, 20], text_emb_dim=12, num_routed_experts=2,
                num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(8, 8), llama_layers=[0, 1])
_EASYANIMATE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
                    sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=32,
                    text_embed_dim=24)
_LATTE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              cross_attention_dim=32, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              caption_channels=24, video_length=2)

FAMILIES: dict[str, Family] = {
    "dit": Family("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1), inputs.dit,
        {**_HEADS, "sample": "sample_size", "classes": "num_embeds_ada_norm"}),
    "pixart": Family("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=1), inputs.pixart,
        {**_HEADS, "sample": "sample_size"}),
    "pixart-sigma": Family("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=48, caption_channels=24, norm_num_groups=1, interpolation_scale=2,
        use_additional_conditions=True), inputs.pixart_sigma),
    "flux": Family("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)), inputs.flux, {**_HEADS, "single_layers": "num_single_layers"}),
    "sd3": Family("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        pos_embed_max_size=16), inputs.sd3),
    "hunyuan-video": Family("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6)), inputs.hunyuan_video, video=True),
    "wan": Family("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64), inputs.wan, video=True),
    "cogvideox": Family("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN), inputs.cogvideox, video=True),
    "ltx-video": Family("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=24), inputs.ltx, video=True),
    "sana": Family("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        mlp_ratio=2.5, sample_size=8, patch_size=1), inputs.sana),
    "qwen-image": Family("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6)), inputs.qwen),
    "lumina2": Family("Lumina2Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=32, num_layers=2,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32), cap_feat_dim=24), inputs.lumina2),
    "hunyuan-dit": Family("HunyuanDiT2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=4, cross_attention_dim=24, cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=TEXT_LEN,
        text_len_t5=6), inputs.hunyuan_dit),
    # beyond the twelve the conformance suite was written for (the second table of docs/models.md)
    "auraflow": Family("AuraFlowTransformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pos_embed_max_size=64), inputs.auraflow),
    "chroma": Family("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2), inputs.chroma),
    "flux2": Family("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True), inputs.flux2),
    "cogview3plus": Family("CogView3PlusTransformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=24, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8),
        inputs.cogview4),
    "cogview4": Family("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=24, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(8, 8)), inputs.cogview4),
    "omnigen": Family("OmniGenTransformer2DModel", dict(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        num_layers=2, pad_token_id=0, vocab_size=100, max_position_embeddings=256, original_max_position_embeddings=128,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, pos_embed_max_size=16, time_step_dim=32),
        inputs.omnigen),
    "z-image": Family("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]), inputs.zimage),
    "mochi": Family("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=24, time_embed_dim=32, max_sequence_length=TEXT_LEN),
        inputs.mochi, video=True),
    "allegro": Family("AllegroTransformer3DModel", dict(     # head_dim 24: the RoPE splits it in 3 even parts
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=48, sample_height=8, sample_width=8, sample_frames=2, caption_channels=24),
        inputs.allegro, video=True),
    "latte": Family("LatteTransformer3DModel", _LATTE, inputs.latte, video=True),
    "skyreels-v2": Family("SkyReelsV2Transformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64), inputs.skyreels_df, video=True),
    "easyanimate": Family("EasyAnimateTransformer3DModel", {**_EASYANIMATE, "mmdit_layers": 1},
                          inputs.easyanimate, video=True),
    "cosmos": Family("CosmosTransformer3DModel", dict(          # no padding-mask channel: it needs torchvision
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=24, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable"), inputs.cosmos, video=True),
    "hidream": Family("HiDreamImageTransformer2DModel", _HIDREAM, inputs.hidream),
}


def family(name: str) -> Family:
    """The table entry of ``name``; ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def make_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build the tiny ``name`` model of ``FAMILIES`` with seeded random weights, in eval mode.
    ``overrides`` are the family's short names (``layers``, ...) or config keys."""
    import diffusers

    fam = family(name)
    config = {**fam.config, **{fam.overrides.get(k, k): v for k, v in overrides.items()}}
    if name == "pixart":                       # cross-attention runs at the hidden width
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


def make_inputs(name: str, model: torch.nn.Module, batch: int = 2, timestep: float = 500.0,
                seed: int = 0, **kw) -> dict:
    """Keyword inputs for one forward call of a tiny ``name`` model (``return_dict=False``)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((batch,), float(timestep))
    return {**family(name).inputs(model, batch, t, g, **kw), "return_dict": False}
