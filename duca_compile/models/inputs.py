"""Forward inputs of the tiny families: ``(model, batch, timestep, generator) -> kwargs``.

Each recipe builds what the family's diffusers pipeline would pass its transformer at one step
(latents, text embeddings, masks, rotary tables, ids), seeded from ``generator``.
"""
from __future__ import annotations

import torch

TEXT_LEN = 5          # text tokens in every recipe's prompt embeddings


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _latent_2d(model, batch, g):
    c = model.config
    return _randn(g, batch, c.in_channels, c.sample_size, c.sample_size)


def dit(model, batch, t, g):
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                class_labels=torch.randint(0, model.config.num_embeds_ada_norm, (batch,), generator=g))


def pixart(model, batch, t, g):
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, model.config.caption_channels),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def pixart_sigma(model, batch, t, g):
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


def flux(model, batch, t, g, side=4):
    c = model.config
    img_ids, txt_ids = _flux_ids(1, side, TEXT_LEN)
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim),
                timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids)


def sd3(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim))


def hunyuan_video(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN),
                pooled_projections=_randn(g, batch, c.pooled_projection_dim))


def wan(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_dim))


def cogvideox(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, 2, c.in_channels, c.sample_height, c.sample_width), timestep=t,
                encoder_hidden_states=_randn(g, batch, c.max_text_seq_length, c.text_embed_dim))


def ltx(model, batch, t, g, frames=2, side=4):
    c = model.config
    return dict(hidden_states=_randn(g, batch, frames * side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels), timestep=t,
                encoder_attention_mask=torch.ones(batch, TEXT_LEN), num_frames=frames, height=side, width=side,
                rope_interpolation_scale=(1.0, 1.0, 1.0))


def sana(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN))


def qwen(model, batch, t, g, side=4):
    c = model.config
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(batch, TEXT_LEN), timestep=t / 1000.0,
                img_shapes=[[(1, side, side)]] * batch)


def lumina2(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_latent_2d(model, batch, g), timestep=t / 1000.0,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.cap_feat_dim),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool))


def hunyuan_dit(model, batch, t, g):
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


def auraflow(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, c.sample_size, c.sample_size), timestep=t / 1000.0,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim))


def cogview4(model, batch, t, g):
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


def mochi(model, batch, t, g):
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


def allegro(model, batch, t, g, rope=True):
    c = model.config
    kw = dict(hidden_states=_randn(g, batch, c.in_channels, 2, c.sample_height, c.sample_width), timestep=t,
              encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels),
              encoder_attention_mask=_text_mask(batch))
    if rope:                         # the pipeline always passes it
        kw["image_rotary_emb"] = _allegro_rope(model, 2)
    return kw


def chroma(model, batch, t, g, side=4):
    c = model.config
    img_ids, txt_ids = _flux_ids(1, side, TEXT_LEN)
    mask = torch.cat([_text_mask(batch, dtype=torch.bool), torch.ones(batch, side * side, dtype=torch.bool)], 1)
    return dict(hidden_states=_randn(g, batch, side * side, c.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.joint_attention_dim),
                timestep=t / 1000.0, img_ids=img_ids, txt_ids=txt_ids, attention_mask=mask)


def hidream(model, batch, t, g):
    c = model.config
    t5, llama = c.caption_channels
    return dict(hidden_states=_randn(g, batch, c.in_channels, 8, 8), timesteps=t,
                encoder_hidden_states_t5=_randn(g, batch, TEXT_LEN, t5),
                encoder_hidden_states_llama3=_randn(g, len(c.llama_layers), batch, TEXT_LEN, llama),
                pooled_embeds=_randn(g, batch, c.text_emb_dim))


def flux2(model, batch, t, g, side=4):
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


def zimage(model, batch, t, g):
    c = model.config
    # lists of per-image latents [C, F, H, W] and captions [L, C]; the pipeline passes t = (1000 - t) / 1000
    return dict(x=list(_randn(g, batch, c.in_channels, 1, 8, 8).unbind(0)), t=(1000.0 - t) / 1000.0,
                cap_feats=list(_randn(g, batch, TEXT_LEN, c.cap_feat_dim).unbind(0)))


def latte(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, c.video_length, c.sample_size, c.sample_size),
                timestep=t, encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.caption_channels))
    # no encoder_attention_mask: the pipeline passes none, and Latte does not repeat a [batch, text] mask per frame


def easyanimate(model, batch, t, g):
    c = model.config
    return dict(hidden_states=_randn(g, batch, c.in_channels, 2, c.sample_height, c.sample_width), timestep=t,
                encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim))


def cosmos(model, batch, t, g):
    c = model.config
    kw = dict(hidden_states=_randn(g, batch, c.in_channels, 2, 8, 8), timestep=t / 1000.0,
              encoder_hidden_states=_randn(g, batch, TEXT_LEN, c.text_embed_dim))
    if c.concat_padding_mask:        # needs torchvision (not installed here)
        kw["padding_mask"] = torch.zeros(1, 1, 8, 8)
    return kw


def omnigen(model, batch, t, g, side=8):
    c = model.config
    n_img = (side // c.patch_size) ** 2
    seq = TEXT_LEN + 1 + n_img                         # text tokens, the time token, image tokens
    mask = torch.tril(torch.ones(seq, seq))            # causal over the text, bidirectional over the image
    mask[-n_img:, -n_img:] = 1
    return dict(hidden_states=_randn(g, batch, c.in_channels, side, side), timestep=t / 1000.0,
                input_ids=torch.randint(1, c.vocab_size, (batch, TEXT_LEN), generator=g), input_img_latents=[],
                input_image_sizes={}, attention_mask=mask.expand(batch, seq, seq).clone(),
                position_ids=torch.arange(seq).expand(batch, seq).clone())


def skyreels_df(model, batch, t, g):
    # diffusion forcing: one timestep per latent frame ([batch, frames]) -> per-token gates
    kw = wan(model, batch, t, g)       # SkyReels-V2 is built on Wan's blocks
    kw["timestep"] = torch.stack([t, t * 0.5], 1)
    kw["enable_diffusion_forcing"] = True
    return kw
