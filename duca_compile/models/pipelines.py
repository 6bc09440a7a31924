"""Tiny random-init diffusers *pipelines* (DiT, PixArt-α, Flux, SD3) and matching call arguments.

For tests and quick experiments with ``duca_compile.enable``. No hub access and no text encoders:
tokenizers and text encoders are ``None`` and every call passes seeded random prompt embeddings.
PixArt, Flux and SD3 pipelines need the ``transformers`` package importable (diffusers replaces
them by dummies otherwise), even though no text encoder is ever built.

    pipe = make_pipeline("flux")
    latents = pipe(**pipeline_call_kwargs("flux", pipe, num_inference_steps=4)).images
"""
from __future__ import annotations

import torch

from .families import make_model, randomize_zero_params

__all__ = ["PIPELINE_FAMILIES", "make_pipeline", "pipeline_call_kwargs", "needs_transformers"]

PIPELINE_FAMILIES = ("dit", "pixart", "flux", "sd3")
TEXT_LEN = 5          # tokens in the random prompt embeddings
SIDE = 16             # default image side in pixels (the tiny VAE downsamples by 2)
DEFAULT_GUIDANCE = {"dit": 4.0, "pixart": 4.5, "flux": 1.0, "sd3": 5.0}


def needs_transformers(family: str) -> bool:
    """Whether building ``family``'s pipeline class needs ``transformers`` importable."""
    return family != "dit"


def _check_family(family: str) -> None:
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"family must be one of {PIPELINE_FAMILIES}, got {family!r}")


def _tiny_sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return randomize_zero_params(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        pos_embed_max_size=16))


def _tiny_vae(family: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0, "scaling_factor": 1.0} if family in ("flux", "sd3") else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=SIDE, **extra).eval()


def make_pipeline(family: str, seed: int = 0):
    """A tiny ``family`` pipeline (``"dit"``, ``"pixart"``, ``"flux"`` or ``"sd3"``) with seeded random
    weights: tiny transformer, tiny ``AutoencoderKL`` (downsampling 2), the family's usual scheduler
    and no tokenizer / text encoder. Call it with ``pipeline_call_kwargs``."""
    _check_family(family)
    import diffusers

    torch.manual_seed(seed)
    if family == "dit":   # DiTPipeline's unconditional label is class 1000
        transformer = make_model("dit", seed=seed, classes=1000)
    elif family == "sd3":
        transformer = _tiny_sd3()
    else:
        transformer = make_model(family, seed=seed)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(family)
    if family == "dit":
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
        return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    if family == "pixart":
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
        return diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                             scheduler=scheduler)
    if family == "flux":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                              base_shift=0.5, max_shift=1.15)
        return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def pipeline_call_kwargs(family: str, pipe, num_inference_steps: int = 4, batch_size: int = 1, seed: int = 0,
                         guidance_scale: float | None = None, height: int | None = None,
                         width: int | None = None) -> dict:
    """Keyword arguments for one ``pipe(**kwargs)`` call of a ``make_pipeline(family)`` pipeline.

    Prompt embeddings (and masks / pooled embeddings) are random, drawn from ``seed``; the latents'
    generator is ``torch.Generator().manual_seed(seed)``. Output is latents (``output_type="latent"``),
    except DiT, whose pipeline always decodes: ``output_type="pt"``. Read the result as ``.images``.

    guidance_scale: classifier-free guidance; ``None`` takes the family's default. DiT, PixArt and SD3
        batch cond and uncond into one call of ``2 * batch_size`` when it is > 1. For Flux it is the
        *true* CFG scale (``true_cfg_scale``): > 1 adds negative prompt embeddings and a second,
        separate transformer call per step inside ``cache_context("uncond")``; the default 1.0 runs
        one call per step.
    height, width: image size in pixels (multiples of 4; the latent is half of it); ignored for DiT,
        whose resolution is fixed by the model.
    """
    _check_family(family)
    if guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE[family]
    g = torch.Generator().manual_seed(10_000 + seed)      # prompts: independent of the latents' generator
    kw = dict(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed))
    if family == "dit":
        labels = torch.randint(0, 1000, (batch_size,), generator=g).tolist()
        return dict(kw, class_labels=labels, guidance_scale=guidance_scale, output_type="pt")
    kw.update(height=height or SIDE, width=width or SIDE, output_type="latent")
    cfg = pipe.transformer.config
    dim = cfg.caption_channels if family == "pixart" else cfg.joint_attention_dim

    def embeds():
        return torch.randn(batch_size, TEXT_LEN, dim, generator=g)

    if family == "pixart":
        mask = torch.ones(batch_size, TEXT_LEN, dtype=torch.long)
        mask[:, -1] = 0                                    # one padding token, as a real prompt has
        return dict(kw, guidance_scale=guidance_scale, use_resolution_binning=False, negative_prompt=None,
                    prompt_embeds=embeds(),
                    prompt_attention_mask=mask, negative_prompt_embeds=embeds(),
                    negative_prompt_attention_mask=mask.clone())

    def pooled():
        return torch.randn(batch_size, cfg.pooled_projection_dim, generator=g)

    kw.update(prompt_embeds=embeds(), pooled_prompt_embeds=pooled())
    if family == "flux":
        kw["true_cfg_scale"] = guidance_scale
        if guidance_scale > 1:
            kw.update(negative_prompt_embeds=embeds(), negative_pooled_prompt_embeds=pooled())
        return kw
    return dict(kw, guidance_scale=guidance_scale, negative_prompt_embeds=embeds(),
                negative_pooled_prompt_embeds=pooled())
