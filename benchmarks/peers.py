"""Peer feature caches, applied to the benchmark's DiT in place and removed again.

Every peer drives the same ``DiTTransformer2DModel`` through the same sampling loop; the loop calls
``peer.new_request(model, steps)`` before each request and ``peer.call(model, x, timestep=t,
class_labels=y)`` instead of ``model(...)`` once per step (classifier-free guidance batched into
that one call, unconditional half FIRST). What each library needs, and why:

* cache-dit DBCache (+ TaylorSeer calibrator): DiT is in cache-dit's adapter registry ("DiT":
  ``ForwardPattern.Pattern_3`` over ``transformer_blocks`` plus ``DiTPatchFunctor``, which rewrites
  ``forward`` because the output head reads ``transformer_blocks[0].norm1.emb``), so
  ``cache_dit.enable_cache(model, ...)`` adapts it as a transformer-only model with a persistent
  cache context. ``cache_dit.refresh_context`` rebuilds that context per request.
  ``cache_dit.disable_cache`` leaves the functor's patch behind (a ``forward`` override and a
  registered ``_norm1_emb`` alias that shows up in ``state_dict``); ``remove`` deletes it.
* diffusers hooks: DiT is not a ``CacheMixin`` (no ``enable_cache`` / ``cache_context``), so the
  hooks are applied with ``apply_*`` and removed through ``HookRegistry``, and ``call`` sets the
  cache context itself. ``BasicTransformerBlock`` is already in ``TransformerBlockRegistry``
  (returns hidden_states only). Stateful hooks count steps per call: ONE call per denoising step.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
from typing import Callable

import torch

from .models import NULL_CLASS

__all__ = ["Peer", "CacheDiT", "FirstBlockCache", "TaylorSeerCache", "FasterCache", "MagCache", "peers",
           "unavailable", "calibration_request", "count_block_work"]

_CONTEXT = "denoise"      # the diffusers cache-context name: one state for the (CFG-batched) call


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The eager module behind a ``torch.compile`` wrapper: hooks and contexts live there."""
    return getattr(model, "_orig_mod", model)


@dataclasses.dataclass(frozen=True)
class Peer:
    """One library's cache at one setting. ``_run`` holds per-model state (steps applied for, ...)."""

    name: str
    library: str
    settings: dict
    _run: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def apply(self, model, num_steps: int) -> None:
        self._apply(_unwrap(model), num_steps)
        self._run["num_steps"] = num_steps

    def new_request(self, model, num_steps: int) -> None:
        """Fresh cache state; a different step count re-applies (schedules and ratios depend on it)."""
        if self._run.get("num_steps") != num_steps:
            self.remove(model)
            self.apply(model, num_steps)
        self._reset(_unwrap(model), num_steps)

    def call(self, model, *args, **kwargs):
        return model(*args, **kwargs)

    def remove(self, model) -> None:
        if self._run.pop("num_steps", None) is not None:
            self._remove(_unwrap(model))

    def _apply(self, model, num_steps): raise NotImplementedError
    def _reset(self, model, num_steps): raise NotImplementedError
    def _remove(self, model): raise NotImplementedError


# ------------------------------------------------------------------------------------------- cache-dit
@dataclasses.dataclass(frozen=True)
class CacheDiT(Peer):
    """DBCache: the first ``Fn`` blocks always run; when their output residual moved less than
    ``threshold`` (relative L1 vs the last fully computed step) the middle blocks are replaced by
    their cached residual (TaylorSeer: a Taylor extrapolation of it), then the last ``Bn`` run.
    A threshold >= 1 caches every step outside warmup; thresholds compare like FirstBlockCache's."""

    config: dict = dataclasses.field(default_factory=dict)
    taylorseer_order: int = 0      # 0: plain residual reuse
    foca: bool = False             # FoCa's calibrator instead (both streams)
    encoder_calibrator: bool = False   # also forecast the text stream (Flux's joint blocks)

    def _apply(self, model, num_steps):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")     # read once, at cache-dit's import
        import cache_dit

        blocks = len(model.transformer_blocks)
        if self.config["Fn_compute_blocks"] + self.config["Bn_compute_blocks"] >= blocks:
            raise ValueError(f"{self.name}: Fn + Bn leaves none of {blocks} blocks to cache")
        calibrator = None
        if self.foca:
            calibrator = cache_dit.FoCaCalibratorConfig()
        elif self.taylorseer_order:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order,
                                                              enable_encoder_calibrator=self.encoder_calibrator)
        # enable_separate_cfg=False: CFG is batched into one call, so one context sees every step.
        cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(
            **self.config, num_inference_steps=num_steps, enable_separate_cfg=False),
            calibrator_config=calibrator)

    def _reset(self, model, num_steps):
        # Without this the persistent context only rolls over after num_steps calls.
        import cache_dit

        cache_dit.refresh_context(model, num_inference_steps=num_steps)

    def _remove(self, model):
        import cache_dit

        cache_dit.disable_cache(model)
        for attr in ("forward", "_norm1_emb", "_is_patched"):   # DiTPatchFunctor's leftovers
            if attr in model.__dict__ or attr in model._modules:
                delattr(model, attr)


# ----------------------------------------------------------------------------------- diffusers hooks
@dataclasses.dataclass(frozen=True)
class _DiffusersHooks(Peer):
    hook_names = ()

    def call(self, model, *args, **kwargs):
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(_unwrap(model), _CONTEXT):
            return model(*args, **kwargs)

    def _registered(self, model):
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(model)
        invalidate = getattr(registry, "invalidate_child_registries_cache", None)   # diffusers >= 0.41 caches them
        if invalidate is not None:
            invalidate()

    def _reset(self, model, num_steps):
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)

    def _remove(self, model):
        """Remove this peer's hooks, then the empty registries and the bound ``forward`` copies
        that ``HookRegistry.remove_hook`` leaves as instance attributes."""
        for module in model.modules():
            registry = module.__dict__.get("_diffusers_hook")
            if registry is None:
                continue
            for name in self.hook_names:
                registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                del module._diffusers_hook
                forward = module.__dict__.get("forward")
                if getattr(forward, "__func__", None) is type(module).forward:
                    del module.forward


@dataclasses.dataclass(frozen=True)
class FirstBlockCache(_DiffusersHooks):
    """Block 0 always runs; if its residual moved less than ``threshold`` (relative L1 vs the last
    computed step) blocks 1.. are replaced by the cached residual. No warmup, no skip limit."""

    threshold: float = 0.05
    hook_names = ("fbc_leader_block_hook", "fbc_block_hook")

    def _apply(self, model, num_steps):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.threshold))
        self._registered(model)


# TaylorSeer's default targets ("^transformer_blocks.*attn", full match) miss DiT's "attn1", and
# lite mode zeroes whole blocks and expects a "proj_out" DiT lacks: name the sub-layers explicitly.
_TAYLORSEER_TARGETS = (r"transformer_blocks\.\d+\.(attn1|ff)",)


@dataclasses.dataclass(frozen=True)
class TaylorSeerCache(_DiffusersHooks):
    """Every block's attention and MLP outputs are computed on steps ``< warmup`` and then once per
    ``interval`` steps, and Taylor-extrapolated (order ``order``) in between: a fixed schedule."""

    interval: int = 4
    warmup: int = 3
    order: int = 1
    targets: tuple | None = _TAYLORSEER_TARGETS     # None: the library's defaults (made for FLUX)
    hook_names = ("taylorseer_cache",)

    def _apply(self, model, num_steps):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=self.warmup, max_order=self.order,
            taylor_factors_dtype=torch.float32,          # default bfloat16 would add its own error
            cache_identifiers=list(self.targets) if self.targets is not None else None))
        self._registered(model)


@dataclasses.dataclass(frozen=True)
class FasterCache(_DiffusersHooks):
    """Self-attention outputs are extrapolated from the two previous steps on all but every
    ``attention_every``-th step (timestep < 681) and, with CFG, the unconditional half is
    computed only every ``uncond_every``-th step (t < 641) and otherwise rebuilt from the
    conditional output plus a frequency-split delta; attention is only skipped on those halved
    steps. Needs the current timestep (read from the call) and CFG as cat([uncond, cond])."""

    attention_every: int = 2
    uncond_every: int = 5
    cfg: bool = True
    hook_names = ("faster_cache_denoiser", "faster_cache_block")

    def _apply(self, model, num_steps):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache
        from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=self.attention_every,
            unconditional_batch_skip_range=self.uncond_every,
            attention_weight_callback=lambda _: 0.5,       # the library's default, made explicit
            current_timestep_callback=lambda: self._run["timestep"],
            tensor_format="BCHW", is_guidance_distilled=not self.cfg,
            # class_labels is batched with the CFG halves too: split it with them.
            _unconditional_conditional_input_kwargs_identifiers=[*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS,
                                                                 "class_labels"]))
        self._registered(model)

    def call(self, model, *args, timestep, class_labels, **kwargs):
        if self.cfg and not bool((class_labels[: len(class_labels) // 2] == NULL_CLASS).all()):
            raise ValueError("FasterCache needs the CFG batch as cat([uncond, cond])")
        self._run["timestep"] = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        return super().call(model, *args, timestep=timestep, class_labels=class_labels, **kwargs)


@dataclasses.dataclass(frozen=True)
class MagCache(_DiffusersHooks):
    """After the first ``retention`` fraction of steps, skips all blocks (reusing the last residual
    of the block stack) while the accumulated error sum |1 - prod(mag_ratio)| stays <= threshold,
    at most ``max_skip`` steps in a row. The per-step residual-norm ratios are model- and
    schedule-specific: ``apply`` calibrates them with diffusers' calibration mode, running one
    request through ``calibration(call, num_steps, cfg=...)`` (default ``calibration_request``;
    pass the benchmark's sampler with ``dataclasses.replace``). Calibration costs one request per
    ``apply``; the ratios used are left in ``peer._run["mag_ratios"]``."""

    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2
    cfg: bool = True
    calibration: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
    hook_names = ("mag_cache_leader_block_hook", "mag_cache_block_hook")

    def _apply(self, model, num_steps):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        ratios = self._calibrate(model, num_steps)
        self._run["mag_ratios"] = ratios
        apply_mag_cache(model, MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip,
                                              retention_ratio=self.retention, num_inference_steps=num_steps,
                                              mag_ratios=ratios))
        self._registered(model)

    def _calibrate(self, model, num_steps) -> list[float]:
        """diffusers prints the ratios at the end of a calibration request (and keeps none)."""
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
        self._registered(model)
        printed = io.StringIO()
        try:
            self._reset(model, num_steps)
            with contextlib.redirect_stdout(printed), torch.no_grad():
                (self.calibration or calibration_request)(
                    lambda *a, **k: self.call(model, *a, **k), num_steps, cfg=self.cfg)
        finally:
            self._remove(model)
        lines = printed.getvalue().splitlines()
        marks = [i for i, line in enumerate(lines) if "Calibration Complete" in line]
        if not marks:
            raise RuntimeError("MagCache calibration printed no ratios")
        ratios = ast.literal_eval(lines[marks[-1] + 1].strip())
        assert len(ratios) == num_steps, ratios
        return [float(r) for r in ratios]


# ------------------------------------------------------------------------------------------ helpers
def calibration_request(call: Callable, num_steps: int, *, cfg: bool = True, guidance: float = 4.0,
                        batch: int = 10, seed: int = 0) -> torch.Tensor:
    """One DDIM request (classes 0..batch-1, CFG batched uncond-first): MagCache's default
    calibration run, and the loop shape every peer here expects."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sched.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    y = torch.arange(batch) % NULL_CLASS
    for t in sched.timesteps:
        if cfg:
            labels = torch.cat([torch.full_like(y, NULL_CLASS), y])
            uncond, cond = call(torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=labels).sample.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        else:
            eps = call(x, timestep=t.expand(batch), class_labels=y).sample
        x = sched.step(eps, t, x).prev_sample
    return x


@contextlib.contextmanager
def count_block_work(model):
    """Yields {"attn": rows, "mlp": rows}: the sample rows that really went through each block's
    attention and MLP (forward hooks on their inner Linear layers, so calls a cache intercepts or
    halves are not counted). A plain request counts steps x batch x blocks in each."""
    counts = {"attn": 0, "mlp": 0}

    def counter(key):
        def hook(module, inputs):
            counts[key] += inputs[0].shape[0]
        return hook

    handles = []
    for block in _unwrap(model).transformer_blocks:
        handles.append(block.attn1.to_q.register_forward_pre_hook(counter("attn")))
        handles.append(block.ff.net[-1].register_forward_pre_hook(counter("mlp")))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _warmup(num_steps: int) -> int:
    """Full-compute steps before any cache: cache-dit's default 8 of ~50, at least 2."""
    return max(2, num_steps // 8)


def peers(num_steps: int, *, cfg: bool = True, certain: bool = False, more: bool = False) -> list[Peer]:
    """The default comparison: one setting per peer at compute comparable to duca's (34-44 % of the
    FLOPs on the trained digits DiT, DDIM 50, guidance 1.5; FasterCache has a fixed schedule), and
    with ``more`` a second, more or less aggressive setting each. ``certain=True`` instead gives
    one setting per peer that caches whatever the model (thresholds out of reach), to check the
    mechanics on a random model. Sizes assume the benchmark's 8 blocks (Fn + Bn < blocks)."""
    w = _warmup(num_steps)

    def dbcache(fn, bn, r, order=0, warmup=w, **more):
        cfg_ = dict(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=r, max_warmup_steps=warmup,
                    **more)
        label = f"cache-dit DBCache F{fn}B{bn}" + (f" + TaylorSeer (threshold {r}, order {order})" if order
                                                    else f" (threshold {r})")
        return CacheDiT(label, "cache-dit", {**cfg_, "taylorseer_order": order}, config=cfg_, taylorseer_order=order)

    def fbc(r):
        return FirstBlockCache(f"diffusers FirstBlockCache (threshold {r})", "diffusers", {"threshold": r}, threshold=r)

    def taylor(interval, warmup, order=1):
        return TaylorSeerCache(f"diffusers TaylorSeerCache (interval {interval}, order {order})", "diffusers",
                               {"interval": interval, "warmup": warmup, "order": order},
                               interval=interval, warmup=warmup, order=order)

    def mag(r, skip, retention=0.2):
        return MagCache(f"diffusers MagCache (threshold {r}, max skip {skip})", "diffusers",
                        {"threshold": r, "max_skip": skip, "retention": retention, "calibrated": "self"},
                        threshold=r, max_skip=skip, retention=retention, cfg=cfg)

    faster = FasterCache("diffusers FasterCache (paper defaults)", "diffusers",
                         {"attention_every": 2, "uncond_every": 5, "cfg": cfg}, cfg=cfg)
    if certain:
        # cache-dit's TaylorSeer differentiates only from its 4th computed step: warm up 4.
        return [dbcache(1, 0, 1.0), dbcache(1, 0, 1.0, order=1, warmup=4), fbc(1e9), taylor(3, 2), faster,
                mag(1e9, 2, retention=0.0)]
    comparable = [dbcache(1, 0, 0.24), dbcache(1, 0, 0.12, order=1), fbc(0.08), taylor(4, w), faster, mag(0.12, 4)]
    if not more:
        return comparable
    return comparable + [dbcache(2, 1, 0.08, max_continuous_cached_steps=3), fbc(0.2), taylor(2, w), mag(0.06, 3)]


def unavailable() -> dict[str, str]:
    """Peers (or modes) that cannot run on this DiT, and why."""
    return {
        "diffusers TaylorSeerCache (lite mode)": "lite mode returns zeros for every whole block and "
        "predicts only a module named 'proj_out'; DiT has proj_out_1/proj_out_2, so it would zero the blocks",
    }
