"""Tiny random-init diffusers *pipelines* and matching call arguments, for ``duca_compile.enable``.

No hub access and no text encoders: tokenizers and text encoders are ``None`` and every call passes
seeded random prompt embeddings. Pipelines whose output is latents need no VAE (``vae=None``: the
pipelines fall back to their default scale factors); DiT, which always decodes, and image-to-image,
which encodes its input image, get a tiny ``AutoencoderKL``. All but DiT need ``transformers``
importable (diffusers replaces those pipeline classes by dummies otherwise).

    pipe = make_pipeline("wan")
    latents = pipe(**pipeline_call_kwargs("wan", pipe, num_inference_steps=4))[0]
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .families import make_model, randomize_zero_params
from .inputs import TEXT_LEN

__all__ = ["PIPELINES", "PIPELINE_FAMILIES", "PipelineSpec", "make_pipeline", "pipeline_call_kwargs",
           "needs_transformers"]


@dataclass(frozen=True)
class PipelineSpec:
    """cls: the diffusers pipeline class; family: its transformer (``FAMILIES``, or ``"sd3"``);
    scheduler: (class name, kwargs); prompt: how the prompt embeddings are passed (see ``_PROMPTS``);
    cfg: the guidance argument and its default (> 1 adds negative embeddings); side: image side in
    pixels; frames: video frames (0: an image pipeline); vae: build a tiny AutoencoderKL; extra:
    further call arguments; about: a few words for tables."""

    cls: str
    family: str
    scheduler: tuple
    prompt: str
    cfg: tuple
    side: int = 16        # with vae=None the latent is side / 8 (Sana: / 32, LTX: / 32)
    frames: int = 0
    vae: bool = False
    extra: dict = field(default_factory=dict)
    about: str = ""


_FLOW = ("FlowMatchEulerDiscreteScheduler", {})
_FLUX_FLOW = ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15))
PIPELINES: dict[str, PipelineSpec] = {
    "dit": PipelineSpec("DiTPipeline", "dit", ("DDIMScheduler", {}), "labels", ("guidance_scale", 4.0), vae=True,
                        about="class-conditional, DDIM, batched CFG"),
    "pixart": PipelineSpec("PixArtAlphaPipeline", "pixart", ("DPMSolverMultistepScheduler", {}), "masked",
                           ("guidance_scale", 4.5), side=64,
                           extra=dict(use_resolution_binning=False, negative_prompt=None),
                           about="text-to-image, DPM-Solver++, batched CFG"),
    "flux": PipelineSpec("FluxPipeline", "flux", _FLUX_FLOW, "pooled", ("true_cfg_scale", 1.0), side=64,
                         about="text-to-image, flow matching, one call per step"),
    "flux-img2img": PipelineSpec("FluxImg2ImgPipeline", "flux", _FLUX_FLOW, "pooled", ("true_cfg_scale", 1.0),
                                 vae=True, extra=dict(strength=0.6),
                                 about="image-to-image, strength 0.6: the tail of the schedule"),
    "sd3": PipelineSpec("StableDiffusion3Pipeline", "sd3", ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
                        "pooled", ("guidance_scale", 5.0), side=64, about="text-to-image, flow matching, batched CFG"),
    "sd3-heun": PipelineSpec("StableDiffusion3Pipeline", "sd3", ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
                             "pooled", ("guidance_scale", 5.0), side=64,
                             about="second-order Heun scheduler: two calls per step but the last"),
    "wan": PipelineSpec("WanPipeline", "wan", ("UniPCMultistepScheduler", dict(
        flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)), "plain", ("guidance_scale", 5.0),
        side=64, frames=5, about="text-to-video, UniPC, cond / uncond as separate calls"),
    "cogvideox": PipelineSpec("CogVideoXPipeline", "cogvideox", ("CogVideoXDDIMScheduler", {}), "plain",
                              ("guidance_scale", 6.0), side=64, frames=5, extra=dict(use_dynamic_cfg=False),
                              about="text-to-video, CogVideoX DDIM, batched CFG"),
    "ltx-video": PipelineSpec("LTXPipeline", "ltx-video", _FLOW, "masked", ("guidance_scale", 3.0), side=128,
                              frames=9, about="text-to-video, flow matching, batched CFG"),
    "hunyuan-video": PipelineSpec("HunyuanVideoPipeline", "hunyuan-video", _FLOW, "hunyuan", ("true_cfg_scale", 1.0),
                                  side=64, frames=5, about="text-to-video, flow matching, one call per step"),
    "sana": PipelineSpec("SanaPipeline", "sana", ("DPMSolverMultistepScheduler", {}), "masked",
                         ("guidance_scale", 4.5), side=256,
                         extra=dict(use_resolution_binning=False, negative_prompt=None),
                         about="text-to-image, DPM-Solver++, linear attention"),
    "qwen-image": PipelineSpec("QwenImagePipeline", "qwen-image", _FLOW, "qwen", ("true_cfg_scale", 4.0), side=64,
                               about="text-to-image, true CFG: cond / uncond as separate calls"),
}
PIPELINE_FAMILIES = tuple(PIPELINES)


def needs_transformers(name: str) -> bool:
    """Whether building ``name``'s pipeline class needs ``transformers`` importable."""
    return _spec(name).cls != "DiTPipeline"


def _spec(name: str) -> PipelineSpec:
    if name not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINE_FAMILIES}, got {name!r}")
    return PIPELINES[name]


def _tiny_sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return randomize_zero_params(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        pos_embed_max_size=16))


def _tiny_vae(flow: bool, channels: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0, "scaling_factor": 1.0} if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=channels, norm_num_groups=4, sample_size=16, **extra).eval()


def make_pipeline(name: str, seed: int = 0):
    """The tiny ``name`` pipeline (``PIPELINE_FAMILIES``) with seeded random weights: tiny transformer,
    the family's usual scheduler, no tokenizer / text encoder. Call it with ``pipeline_call_kwargs``."""
    import diffusers

    spec = _spec(name)
    torch.manual_seed(seed)
    if spec.family == "dit":   # DiTPipeline's unconditional label is class 1000
        transformer = make_model("dit", seed=seed, classes=1000)
    elif spec.family == "sd3":
        transformer = _tiny_sd3()
    else:
        transformer = make_model(spec.family, seed=seed)
    torch.manual_seed(seed + 1)
    # Flux packs 2x2 latent patches: 16 transformer channels are 4 VAE channels
    channels = transformer.config.in_channels // 4 if spec.family == "flux" else 4
    vae = _tiny_vae(spec.scheduler[0].startswith("FlowMatch"), channels) if spec.vae else None
    cls_name, sched_kwargs = spec.scheduler
    scheduler = getattr(diffusers, cls_name)(**sched_kwargs)
    pipeline_cls = getattr(diffusers, spec.cls)
    # every other required component (tokenizers, text encoders, image encoders) is absent
    params = inspect.signature(pipeline_cls).parameters
    components = {p: None for p, v in params.items() if v.default is inspect.Parameter.empty}
    components.update(transformer=transformer, scheduler=scheduler, vae=vae)
    return pipeline_cls(**{k: v for k, v in components.items() if k in params})


def pipeline_call_kwargs(name: str, pipe, num_inference_steps: int = 4, batch_size: int = 1, seed: int = 0,
                         guidance_scale: float | None = None, height: int | None = None,
                         width: int | None = None, **extra) -> dict:
    """Keyword arguments for one ``pipe(**kwargs)`` call of a ``make_pipeline(name)`` pipeline.

    Prompt embeddings (and masks / pooled embeddings) are random, drawn from ``seed``; the latents'
    generator is ``torch.Generator().manual_seed(seed)``. Output is latents (``output_type="latent"``),
    except DiT, whose pipeline always decodes: ``output_type="pt"``. ``return_dict=False``: read the
    result as ``pipe(**kwargs)[0]``.

    guidance_scale: classifier-free guidance (``None``: the pipeline's default). Most pipelines batch
        cond and uncond into one call of ``2 * batch_size`` when it is > 1; Flux, HunyuanVideo and
        QwenImage take it as ``true_cfg_scale``, which, like Wan's guidance, makes a second,
        separate transformer call per step inside ``cache_context("uncond")``.
    height, width: image size in pixels; ignored for DiT, whose resolution is fixed by the model.
    extra: further arguments (``strength=``, ``callback_on_step_end=``, ...), overriding the spec's.
    """
    spec = _spec(name)
    cfg_name, default = spec.cfg
    scale = default if guidance_scale is None else guidance_scale
    g = torch.Generator().manual_seed(10_000 + seed)      # prompts: independent of the latents' generator
    kw = dict(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
              return_dict=False, **{cfg_name: scale})
    if spec.prompt == "labels":
        labels = torch.randint(0, 1000, (batch_size,), generator=g).tolist()
        return dict(kw, class_labels=labels, output_type="pt", **extra)
    kw.update(height=height or spec.side, width=width or spec.side, output_type="latent", **spec.extra)
    if spec.frames:
        kw["num_frames"] = spec.frames
    if "strength" in spec.extra or "strength" in extra:
        kw["image"] = torch.rand(batch_size, 3, kw["height"], kw["width"], generator=g)
    kw.update(_prompt_kwargs(spec, pipe.transformer.config, batch_size, g, negatives=scale > 1))
    return {**kw, **extra}


def _prompt_kwargs(spec: PipelineSpec, cfg, batch: int, g, negatives: bool) -> dict:
    dim = next(getattr(cfg, k) for k in ("caption_channels", "joint_attention_dim", "text_dim", "text_embed_dim")
               if getattr(cfg, k, None))
    mask_name = {"qwen": "prompt_embeds_mask"}.get(spec.prompt, "prompt_attention_mask")
    kw: dict = {}
    for prefix in ("", "negative_") if negatives else ("",):
        kw[prefix + "prompt_embeds"] = torch.randn(batch, TEXT_LEN, dim, generator=g)
        if spec.prompt in ("masked", "qwen", "hunyuan"):
            mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
            mask[:, -1] = 0                                # one padding token, as a real prompt has
            kw[prefix + mask_name] = mask
        if spec.prompt in ("pooled", "hunyuan"):
            kw[prefix + "pooled_prompt_embeds"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return kw
