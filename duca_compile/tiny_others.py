"""Tiny random-init configs of diffusers transformer families outside the conformance list.

The conformance suite tries them too (the README's "other families" rows): the backend has no
per-model code, so a DiT built from the same diffusers building blocks should simply work.
"""
from __future__ import annotations

import torch

from .tiny import TEXT_LEN, Family, _flux_ids, _randn, _wan_inputs

__all__ = ["OTHER_FAMILIES"]


def _auraflow_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, c.sample_size, c.sample_size), timestep=t / 1000.0,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim))


def _cogview4_inputs(model, batch, t, g):
    c = model.config
    side = c.sample_size
    return dict(hidden_states=_randn(g, batch, c.in_channels, side, side), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim),
                original_size=torch.full((batch, 2), 64.0), target_size=torch.full((batch, 2), 64.0),
                crop_coords=torch.zeros(batch, 2))


def _text_mask(batch, pad=1, dtype=torch.float32):
    mask = torch.ones(batch, TEXT_LEN, dtype=dtype)
    if pad:
        mask[:, -pad:] = 0
    return mask


def _mochi_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim),
                encoder_attention_mask=_text_mask(batch, dtype=torch.bool))


def _allegro_rope(model, frames):
    # as AllegroPipeline._prepare_rotary_positional_embeddings
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    c = model.config
    gh, gw = c.sample_height // c.patch_size, c.sample_width // c.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=c.attention_head_dim, crops_coords=((0, 0), (gh, gw)), grid_size=(gh, gw), temporal_size=frames,
        interpolation_scale=(c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def _allegro_inputs(model, batch, t, g, rope=True):
    c = model.config
    kw = dict(hidden_states=_randn(g, batch, c.in_channels, 2, c.sample_height, c.sample_width), timestep=t,
              encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels),
              encoder_attention_mask=_text_mask(batch))
    if rope:                         # the pipeline always passes it
        kw["image_rotary_emb"] = _allegro_rope(model, 2)
    return kw


def _chroma_inputs(model, batch, t, g, side=4):
    c = model.config
    img_ids, txt_ids = _flux_ids(1, side, TEXT_LEN)
    mask = torch.cat([_text_mask(batch, dtype=torch.bool), torch.ones(batch, side * side, dtype=torch.bool)], 1)
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids, attention_mask=mask)


def _hidream_inputs(model, batch, t, g):
    c = model.config
    t5, llama = c.caption_channels
    return dict(hidden_states=_randn(g, batch, c.in_channels, 8, 8), timesteps=t,
                encoder_hidden_states_t5=_randn(g, batch, TEXT_LEN, t5),
                encoder_hidden_states_llama3=_randn(g, len(c.llama_layers), batch, TEXT_LEN, llama),
                pooled_embeds=_randn(g, batch, c.text_emb_dim))


_HIDREAM = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, caption_channels=[24, 20], text_emb_dim=12, num_routed_experts=2,
                num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(8, 8), llama_layers=[0, 1])

def _flux2_inputs(model, batch, t, g, side=4):
    c = model.config
    h, w = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), h.flatten(), w.flatten(), torch.zeros(side * side)], -1)
    txt_ids = torch.stack([torch.zeros(TEXT_LEN)] * 3 + [torch.arange(TEXT_LEN).float()], -1)
    kw = dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
              encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
              timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids)
    if c.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 4.0)
    return kw


def _zimage_inputs(model, batch, t, g):
    c = model.config
    # lists of per-image latents [C, F, H, W] and captions [L, C]; the pipeline passes t = (1000 - t) / 1000
    return dict(x=list(_randn(g, batch, c.in_channels, 1, 8, 8).unbind(0)), t=(1000.0 - t) / 1000.0,
                cap_feats=list(_randn(g, batch, TEXT_LEN, c.cap_feat_dim).unbind(0)))


def _latte_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, c.video_length, c.sample_size, c.sample_size),
                timestep=t, encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels))
    # no encoder_attention_mask: the pipeline passes none, and Latte does not repeat a [batch, text] mask per frame


def _easyanimate_inputs(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, c.sample_height, c.sample_width), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim))


_EASYANIMATE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
                    sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=32,
                    text_embed_dim=24)

def _cosmos_inputs(model, batch, t, g):
    c = model.config
    kw = dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t / 1000.0,
              encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim))
    if c.concat_padding_mask:        # needs torchvision (not installed here)
        kw["padding_mask"] = torch.zeros(1, 1, 8, 8)
    return kw


def _omnigen_inputs(model, batch, t, g, side=8):
    c = model.config
    n_img = (side // c.patch_size) ** 2
    seq = TEXT_LEN + 1 + n_img                         # text tokens, the time token, image tokens
    mask = torch.tril(torch.ones(seq, seq))            # causal over the text, bidirectional over the image
    mask[-n_img:, -n_img:] = 1
    return dict(hidden_states=_randn(g, batch, c.in_channels, side, side), timestep=t / 1000.0,
                input_ids=torch.randint(1, c.vocab_size, (batch, TEXT_LEN), generator=g), input_img_latents=[],
                input_image_sizes={}, attention_mask=mask.expand(batch, seq, seq).clone(),
                position_ids=torch.arange(seq).expand(batch, seq).clone())


def _skyreels_df_inputs(model, batch, t, g):
    # diffusion forcing: one timestep per latent frame ([batch, frames]) -> per-token gates
    kw = _wan_inputs(model, batch, t, g)       # SkyReels-V2 is built on Wan's blocks
    kw["timestep"] = torch.stack([t, t * 0.5], 1)
    kw["enable_diffusion_forcing"] = True
    return kw


_LATTE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              cross_attention_dim=32, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              caption_channels=24, video_length=2)

OTHER_FAMILIES: dict[str, Family] = {
    "auraflow": Family("AuraFlowTransformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pos_embed_max_size=64), _auraflow_inputs),
    "chroma": Family("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2), _chroma_inputs),
    "flux2": Family("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True), _flux2_inputs),
    "cogview3plus": Family("CogView3PlusTransformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=24, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8),
        _cogview4_inputs),
    "cogview4": Family("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=24, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(8, 8)), _cogview4_inputs),
    "omnigen": Family("OmniGenTransformer2DModel", dict(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        num_layers=2, pad_token_id=0, vocab_size=100, max_position_embeddings=256, original_max_position_embeddings=128,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, pos_embed_max_size=16, time_step_dim=32),
        _omnigen_inputs),
    "z-image": Family("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]), _zimage_inputs),
    "mochi": Family("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=24, time_embed_dim=32, max_sequence_length=TEXT_LEN),
        _mochi_inputs, video=True),
    "allegro": Family("AllegroTransformer3DModel", dict(     # head_dim 24: the RoPE splits it in 3 even parts
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=48, sample_height=8, sample_width=8, sample_frames=2, caption_channels=24),
        _allegro_inputs, video=True),
    "latte": Family("LatteTransformer3DModel", _LATTE, _latte_inputs, video=True),
    "skyreels-v2": Family("SkyReelsV2Transformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64), _skyreels_df_inputs, video=True),
    "easyanimate": Family("EasyAnimateTransformer3DModel", {**_EASYANIMATE, "mmdit_layers": 1},
                          _easyanimate_inputs, video=True),
    "cosmos": Family("CosmosTransformer3DModel", dict(          # no padding-mask channel: it needs torchvision
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=24, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable"), _cosmos_inputs, video=True),
    "hidream": Family("HiDreamImageTransformer2DModel", _HIDREAM, _hidream_inputs),
}
