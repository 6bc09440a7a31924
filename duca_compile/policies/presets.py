"""Paper presets: the official defaults of each method per model, selectable by name.

    config = duca_compile.presets("dit-xl-2", "duca")

Where the official code scores tokens by attention maps (ToCa/DuCa on DiT and PixArt), which fused
attention never forms, the presets use the FlashAttention-compatible scores the same code ships
(random for v2, kv-norm for v1) with the official staleness and spatial terms. Sources: the
official repositories Shenyi-Z/DuCa, Shenyi-Z/ToCa, Shenyi-Z/TaylorSeer and
Shenyi-Z/Cache4Diffusion (ClusCa), read as summarised in the project's notes.
"""
from __future__ import annotations

from .adaptive import AdaptiveConfig
from .clusca import ClusCaConfig
from .duca import DuCaConfig
from .fora import FORAConfig
from .schedules import RatioSchedule
from .taylorseer import TaylorSeerConfig
from .toca import ToCaConfig

__all__ = ["presets", "PRESETS", "MODELS"]

# model -> sampler and steps the presets were tuned for
MODELS = {
    "dit-xl-2": "DiT-XL/2 256², DDIM 50 steps, cfg 1.5",
    "pixart-alpha": "PixArt-α, DPM-Solver 20 steps, cfg 4.5",
    "flux-dev": "FLUX.1-dev 1024², 50 steps",
    "opensora": "OpenSora v1.2 480p, rectified flow 30 steps, cfg 7.0",
    "any": "any model: adaptive caching decides each step from the data (the peers' defaults)",
}

# DiT's DDIM loop counts steps down; its interval follows N / (1.4 − 0.8·x/T), forced to 2 for
# int(0.2·T) <= x < int(0.4·T) (x in [10, 20) at T = 50), and is updated in layer 0 of a full step,
# the later layers deciding their type with the new one (DuCa N=3: 18 full steps, not 20).
_DIT_STEPS = dict(count_down=True, interval_weight=0.4, forced_interval=((0.2, 0.4, 2),), step_types="per-layer")
_DIT_RATIO = RatioSchedule(step_weight=2.0, layer_weight=-0.2, module_weight=2.5, module_tau=0.6, count_down=True)
_PIXART_RATIO = RatioSchedule(step_weight=0.9, layer_weight=0.6, module_weight=1.0, module_tau=0.6)
# ToCa-FLUX fresh_ratio_scheduler 'ToCa': stream factor 0.4 / 1.6, layer factor with current['layer'] / 27
_FLUX_RATIO = RatioSchedule(layer_weight=0.5, layer_span=27, layers_per_list=True,
                            list_factors=(("transformer_blocks", 0.4), ("single_transformer_blocks", 1.6)))
_OPENSORA_CYCLES = (("self_attn", "FCA"), ("ff", "FCA"), ("cross_attn", "FCACCA"))


def _dit_duca(selection):
    # the official DiT kv-norm score is per batch row (the CFG halves may pick different tokens);
    # its random score is drawn for one half and repeated
    return DuCaConfig(interval=3, ratio=0.05, selection=selection, soft_fresh_weight=0.25, spatial_grid=2,
                      spatial_bonus=0.8, ratio_schedule=_DIT_RATIO, share_cfg_indices=selection != "kv-norm",
                      **_DIT_STEPS)


def _pixart_duca(selection):
    return DuCaConfig(interval=3, ratio=0.75, selection=selection, soft_fresh_weight=0.25, spatial_grid=4,
                      spatial_bonus=0.4, ratio_schedule=_PIXART_RATIO)


def _opensora_duca(selection):
    return DuCaConfig(ratio=0.1, selection=selection, soft_fresh_weight=0.25, cycles=_OPENSORA_CYCLES, warmup=3,
                      ratio_schedule=RatioSchedule(module_weight=1.5, module_tau=0.33))


# (model, method) -> (config factory, source)
PRESETS = {
    ("dit-xl-2", "fora"): (lambda: FORAConfig(interval=3), "FORA N=3, as compared in TaylorSeer's DiT table"),
    ("dit-xl-2", "toca"): (lambda: ToCaConfig(interval=3, ratio=0.07, soft_fresh_weight=0.25, spatial_grid=2,
                                              spatial_bonus=0.6, ratio_schedule=_DIT_RATIO,
                                              **_DIT_STEPS),
                           "ToCa README, DDIM-50: N=3, R=0.07, ToCa-ddim50 ratio schedule"),
    ("dit-xl-2", "duca"): (lambda: _dit_duca("random"), "DuCa README (N=3, R=0.05, λ3=0.25), v2 random selection"),
    ("dit-xl-2", "duca-v1"): (lambda: _dit_duca("kv-norm"), "as 'duca' with v1's V-caching (kv-norm) scores, "
                                                            "per batch row"),
    ("dit-xl-2", "taylorseer"): (lambda: TaylorSeerConfig(interval=4, max_order=4, first_enhance=2),
                                 "TaylorSeer-DiT defaults: interval 4, max order 4"),
    ("dit-xl-2", "clusca"): (lambda: ClusCaConfig(interval=4, clusters=16, propagation=0.005, max_order=4,
                                                  first_enhance=2, kmeans_cold_iters=100),
                             "ClusCa-DiT sample_ddp.py defaults: N=4, O=4, K=16, γ=0.005 (sample.py: γ=0); "
                             "k-means from random tokens up to 100 iterations"),
    ("pixart-alpha", "fora"): (lambda: FORAConfig(interval=3), "FORA N=3"),
    ("pixart-alpha", "toca"): (lambda: ToCaConfig(interval=3, ratio=0.30, soft_fresh_weight=0.25, spatial_grid=4,
                                                  spatial_bonus=0.4, ratio_schedule=_PIXART_RATIO,
                                                  interval_weight=-0.2, step_types="per-layer"),
                               "ToCa PixArt: N=3 (≈4 → 2 over the run, updated per layer), R=0.30"),
    ("pixart-alpha", "duca"): (lambda: _pixart_duca("random"), "DuCa README PixArt: N=3, R=0.75, λ3=0.25; v2 random"),
    ("pixart-alpha", "duca-v1"): (lambda: _pixart_duca("kv-norm"), "as 'duca' with kv-norm scores"),
    ("flux-dev", "fora"): (lambda: FORAConfig(interval=3), "FORA N=3, as compared in TaylorSeer's FLUX table"),
    ("flux-dev", "toca"): (lambda: ToCaConfig(interval=4, ratio=0.1, soft_fresh_weight=0.25, warmup=3,
                                              ratio_schedule=_FLUX_RATIO),
                           "ToCa-FLUX cache_init: N=4, R=0.1, λ3=0.25, first 3 steps full; ratio ×0.4 double, "
                           "×1.6 single blocks, layer factor over each list's index / 27"),
    ("flux-dev", "duca"): (lambda: DuCaConfig(interval=5, ratio=0.1, soft_fresh_weight=0.25, warmup=3,
                                              ratio_schedule=_FLUX_RATIO),
                           "DuCa on FLUX as reported, N=5 (3.80x FLOPs): DuCa's repository has no FLUX code, so "
                           "ToCa-FLUX's rules (R=0.1, λ3=0.25, first 3 steps full, its ratio schedule) with "
                           "DuCa's full / conservative / aggressive alternation; v2 random selection"),
    ("flux-dev", "hicache"): (lambda: TaylorSeerConfig(interval=7, max_order=2, first_enhance=3, forecast="hermite",
                                                       hermite_scale=0.5),
                              "HiCache's README command (its launcher's defaults): N=7, O=2, σ=0.5, first 3 steps "
                              "full; TaylorSeer's schedule and differences in the scaled Hermite basis"),
    ("flux-dev", "foca"): (lambda: TaylorSeerConfig(interval=5, first_enhance=3, forecast="foca"),
                           "FoCa on FLUX at its table's 4.16x: its code is unreleased, so TaylorSeer's schedule "
                           "(N=5, first 3 steps full: 12 of 50 steps) with FoCa's forecast as cache-dit implements it"),
    ("flux-dev", "taylorseer"): (lambda: TaylorSeerConfig(interval=6, max_order=1, first_enhance=3),
                                 "TaylorSeer-FLUX code: N=6, O=1"),
    ("flux-dev", "clusca"): (lambda: ClusCaConfig(interval=5, clusters=16, propagation=0.005, max_order=1,
                                                  first_enhance=3, propagate_text=False),
                             "ClusCa FLUX: N=5, K=16, γ=0.005, O=1, first_enhance=3; propagation on the image "
                             "stream only, clusters after the last double block"),
    ("any", "fbcache"): (lambda: AdaptiveConfig(head_blocks=1, threshold=0.05),
                         "diffusers FirstBlockCacheConfig() defaults: first block, threshold 0.05, no warm-up"),
    ("any", "dbcache-f1b0"): (lambda: AdaptiveConfig(head_blocks=1, threshold=0.08, warmup=8),
                              "cache-dit DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0) with its other "
                              "defaults: threshold 0.08, 8 warm-up steps, no limits"),
    ("any", "dbcache-f8b0"): (lambda: AdaptiveConfig(head_blocks=8, threshold=0.08, warmup=8),
                              "cache-dit DBCacheConfig() defaults: F8B0, threshold 0.08, 8 warm-up steps, no limits"),
    ("opensora", "duca"): (lambda: _opensora_duca("random"), "DuCa OpenSora cycles, R=0.1; v2 random"),
    ("opensora", "duca-v1"): (lambda: _opensora_duca("kv-norm"), "DuCa OpenSora script: kv-norm, R=0.1"),
}


def presets(model: str | None = None, method: str | None = None):
    """The config of ``method`` tuned for ``model``; with no arguments, ``{model: [methods]}``."""
    if model is None and method is None:
        out: dict[str, list[str]] = {}
        for m, meth in PRESETS:
            out.setdefault(m, []).append(meth)
        return out
    if model not in MODELS:
        raise ValueError(f"unknown preset model {model!r}; valid models: {', '.join(MODELS)}")
    methods = [meth for m, meth in PRESETS if m == model]
    if (model, method) not in PRESETS:
        raise ValueError(f"no preset {method!r} for {model!r}; valid methods for it: {', '.join(methods)}")
    return PRESETS[(model, method)][0]()
