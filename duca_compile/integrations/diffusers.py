"""``enable(pipe, config)`` / ``disable(pipe)``: feature caching for a diffusers DiT pipeline.

    pipe = FluxPipeline.from_pretrained(...)
    duca_compile.enable(pipe, FORAConfig(interval=3))   # compiles pipe.transformer in place
    image = pipe(prompt, num_inference_steps=28).images[0]
    duca_compile.disable(pipe)                          # back to the plain pipeline

The denoising step is taken from the pipeline, never from the timestep tensor (no
device-to-host copy per call): the scheduler's ``set_timesteps`` starts a request of
``len(scheduler.timesteps)`` steps, its ``step`` ends a step, and the transformer's
``cache_context(name)`` (Flux, Wan, ... run cond and uncond as separate calls) gives each named
pass its own cache slot. Only this pipeline's scheduler and transformer *instances* are patched;
their classes are untouched. diffusers itself is not imported here.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .. import _torch
from ..backend import duca_backend
from ..policies import DEFAULT_CONFIG, CacheConfig
from ..policies.presets import presets
from ..runtime import ModelState, PipelineDriver

__all__ = ["enable", "disable"]

_RECORD = "_duca_compile_enabled"          # pipe.__dict__ key of the _Enabled record
_MARK = "_duca_compile_patch"              # set on every wrapper function we install
# transformer class -> preset model name, for a preset given by method only ("duca")
_MODEL_NAMES = {"DiTTransformer2DModel": "dit-xl-2", "PixArtTransformer2DModel": "pixart-alpha",
                "FluxTransformer2DModel": "flux-dev"}
# transformer -> the last _PipelineBackend made for it: re-enabling with the same settings reuses it,
# so Dynamo's cached graphs (guarded on the backend object) are reused instead of recompiled.
_BACKENDS: "weakref.WeakKeyDictionary[torch.nn.Module, _PipelineBackend]" = weakref.WeakKeyDictionary()


class _PipelineBackend:
    """The duca backend, plus: every caching state it creates (at a model's first call) is driven by
    ``driver`` while the pipeline is enabled."""

    def __init__(self, key: tuple, config: CacheConfig, inner: str, mode, options):
        self.key = key
        self.duca = duca_backend(config, inner=inner, mode=mode, options=options, on_state=self._adopt)
        self.driver = PipelineDriver()
        self.states: weakref.WeakSet[ModelState] = weakref.WeakSet()
        self.enabled = False

    def _adopt(self, state: ModelState) -> None:
        self.states.add(state)
        if self.enabled:
            state.driver = self.driver

    def __call__(self, gm, example_inputs, **kwargs):
        return self.duca(gm, example_inputs, **kwargs)

    def connect(self, on: bool) -> None:
        self.enabled = on
        for state in list(self.states):
            if on:
                state.driver = self.driver
            elif state.driver is self.driver:
                state.driver = None
        if not on:
            self.driver.active, self.driver.context = False, None


@dataclass
class _Enabled:
    key: tuple
    transformer: torch.nn.Module
    backend: _PipelineBackend
    swapped_out: torch.nn.Module | None         # pipe.transformer before enable, when it was torch.compile'd
    previous_compiled_call: object
    blocks: list = field(default_factory=list)   # regional: (block, its compiled call before enable)
    patches: list = field(default_factory=list)  # (object, attribute name, had own attribute, previous value)


def enable(pipe, config: CacheConfig | str | tuple | None = None, *, inner: str = "inductor", mode: str | None = None,
           options: dict | None = None, fullgraph: bool = False, regional: bool = False):
    """Turn on feature caching for a diffusers pipeline with a ``.transformer``; returns ``pipe``.

    config: a ``CacheConfig`` (``FORAConfig(interval=3)``, ``DuCaConfig()``, ...); ``None`` means
        ``policies.DEFAULT_CONFIG`` (TaylorSeer N=3, order 1, 6 full steps first; why: README, "Which
        method"); a preset (``duca_compile.presets``) as ``"model:method"``, ``(model, method)`` or
        just ``"method"``, the model then inferred from the transformer class (DiT -> ``dit-xl-2``,
        PixArt -> ``pixart-alpha``, Flux -> ``flux-dev``).
    inner, mode, options: how each variant is compiled (see ``duca_backend``); ``inner="eager"``
        compiles nothing but the cache rewrites, for tests and debugging.
    fullgraph: passed to ``torch.compile``; shapes are always static (``dynamic=False``), one graph per
        resolution / batch size.
    regional: compile each repeated block instead of the whole transformer (the classes in the
        transformer's ``_repeated_blocks``, else the elements of its block lists that own an attention
        module), as ``compile_repeated_blocks`` does; the rest of the transformer runs eagerly.

    Calling it again with the same arguments does nothing; with other arguments it re-enables.
    Call it after replacing ``pipe.scheduler``: the scheduler present now is the one that is patched.
    """
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        what = "a UNet pipeline (pipe.unet)" if isinstance(getattr(pipe, "unet", None), torch.nn.Module) else \
            f"{type(pipe).__name__} has no `.transformer` module"
        raise ValueError(f"duca_compile.enable needs a diffusers pipeline with a `.transformer` (DiT, PixArt, Flux, "
                         f"SD3, ...): {what}")
    scheduler = getattr(pipe, "scheduler", None)
    if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
        raise ValueError(f"duca_compile.enable needs `pipe.scheduler` with set_timesteps() and step(); "
                         f"got {type(scheduler).__name__}")
    base = _torch.original_module(transformer)       # an already torch.compile'd transformer
    if not isinstance(base, torch.nn.Module) or next(base.parameters(), None) is None:
        raise ValueError("duca_compile.enable: pipe.transformer has no parameters")
    _check_offload(base)
    config = _resolve_config(config, base)
    key = (config, inner, mode, tuple(sorted((options or {}).items(), key=lambda kv: kv[0])), bool(fullgraph),
           bool(regional))

    record = pipe.__dict__.get(_RECORD)
    if record is not None:
        if record.key == key and record.transformer is base and pipe.transformer is base \
                and getattr(scheduler.step, _MARK, None) is record.backend:
            return pipe                          # already enabled exactly so: never wrap twice
        disable(pipe)
        transformer = pipe.transformer
        base = _torch.original_module(transformer)
    for obj, name in ((scheduler, "set_timesteps"), (scheduler, "step"), (base, "cache_context")):
        if getattr(getattr(obj, name, None), _MARK, None) is not None:
            raise ValueError(f"duca_compile.enable: this pipeline's {type(obj).__name__} is already patched by "
                             "another enabled pipeline sharing it; call duca_compile.disable on that one first")

    backend = _BACKENDS.get(base)
    if backend is None or backend.key != key:
        backend = _PipelineBackend(key, config, inner, mode, options)   # validates inner
        _BACKENDS[base] = backend
    record = _Enabled(key=key, transformer=base, backend=backend,
                      swapped_out=transformer if transformer is not base else None,
                      previous_compiled_call=_torch.compiled_call(base))
    try:
        if record.swapped_out is not None:
            pipe.transformer = base
        # Compiled in place (nn.Module.compile) rather than replaced by torch.compile's OptimizedModule:
        # pipe.transformer stays the very object and class every pipeline expects (config, dtype,
        # cache_context, isinstance checks, offload hooks, save_pretrained all see the original), the
        # cache_context patch below sits on the object the pipeline calls, and disable() only has to
        # drop _compiled_call_impl. All four tiny pipelines (DiT, PixArt, Flux, SD3) run either way.
        if regional:
            _torch.set_compiled_call(base, None)          # the blocks are compiled, not the whole
            blocks = repeated_blocks(base)
            if not blocks:
                raise ValueError(f"duca_compile.enable(regional=True): {type(base).__name__} has no repeated blocks "
                                 "(no `_repeated_blocks`, and no block list whose blocks own an attention module)")
            for block in blocks:
                record.blocks.append((block, _torch.compiled_call(block)))
                block.compile(backend=backend, fullgraph=fullgraph, dynamic=False)
        else:
            base.compile(backend=backend, fullgraph=fullgraph, dynamic=False)
        _install(record, pipe, scheduler, base)
        backend.connect(True)
    except BaseException:
        _undo(pipe, record)
        raise
    pipe.__dict__[_RECORD] = record
    return pipe


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: modules of a class named in ``_repeated_blocks``,
    else every element of a ``ModuleList`` child; either way only blocks whose own children include
    an attention module. That leaves out what ``_repeated_blocks`` also names but is no transformer
    block (HunyuanVideo's patch embedding, and its token refiner, which holds blocks of its own and
    is not cached by whole-model compilation either): those run eagerly."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if names:
        candidates = [m for m in transformer.modules() if type(m).__name__ in names]
    else:
        candidates = [block for child in transformer.children() if isinstance(child, torch.nn.ModuleList)
                      for block in child]
    return [block for block in candidates if any("Attention" in type(c).__name__ for c in block.children())]


def disable(pipe):
    """Undo ``enable``: the transformer runs uncompiled again (the object ``pipe.transformer`` was
    before ``enable``), the scheduler and ``cache_context`` are the originals. Idempotent; the
    caching stats stay readable with ``duca_compile.stats(pipe.transformer)``."""
    record = pipe.__dict__.pop(_RECORD, None)
    if record is not None:
        _undo(pipe, record)
    return pipe


def _undo(pipe, record: _Enabled) -> None:
    record.backend.connect(False)
    for obj, name, had, previous in reversed(record.patches):
        if had:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)
    record.patches.clear()
    _torch.set_compiled_call(record.transformer, record.previous_compiled_call)
    for block, previous in record.blocks:
        _torch.set_compiled_call(block, previous)
    record.blocks.clear()
    if record.swapped_out is not None:
        pipe.transformer = record.swapped_out


def _install(record: _Enabled, pipe, scheduler, transformer) -> None:
    backend = record.backend
    driver = backend.driver
    warned: list = []          # one warning per enable: the steps that ran without the backend

    def steps_left() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0   # img2img starts part-way (strength)
        return max(len(timesteps) - int(begin), 1)

    def patch(obj, name, make):
        original = getattr(obj, name)
        wrapper = make(original)
        setattr(wrapper, _MARK, backend)
        record.patches.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        obj.__dict__[name] = wrapper          # instance attribute: the class and other instances are untouched

    # functools.wraps keeps inspect.signature() of the original (bound) method: diffusers'
    # retrieve_timesteps and prepare_extra_step_kwargs inspect set_timesteps / step for their arguments.
    def wrap_set_timesteps(original):
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            _check_offload(transformer)       # offloading switched on after enable
            out = original(*args, **kwargs)
            driver.begin(steps_left())
            return out
        return set_timesteps

    def wrap_set_begin_index(original):
        @functools.wraps(original)
        def set_begin_index(*args, **kwargs):
            out = original(*args, **kwargs)
            if driver.active and driver.pending:      # after set_timesteps, before the first call
                driver.num_steps = steps_left()
            return out
        return set_begin_index

    def wrap_step(original):
        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            if driver.active and driver.calls == 0 and not warned:
                warned.append(driver.step)
                warnings.warn(_NOT_CACHED.format(step=driver.step, cls=type(transformer).__name__), stacklevel=2)
            driver.step_done()
            if driver.num_steps is not None and driver.step >= driver.num_steps:
                driver.active = False     # request over: a later direct transformer call is not step N+1
            return out
        return step

    def wrap_cache_context(original):
        @functools.wraps(original)
        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            with original(name, *args, **kwargs):
                previous, driver.context = driver.context, name
                try:
                    yield
                finally:
                    driver.context = previous
        return cache_context

    def wrap_end_of_call(original):
        @functools.wraps(original)
        def maybe_free_model_hooks(*args, **kwargs):
            driver.active = False     # the pipeline call is over, also when it stopped early (interrupt)
            return original(*args, **kwargs)
        return maybe_free_model_hooks

    patch(scheduler, "set_timesteps", wrap_set_timesteps)
    patch(scheduler, "step", wrap_step)
    if callable(getattr(scheduler, "set_begin_index", None)):
        patch(scheduler, "set_begin_index", wrap_set_begin_index)
    if callable(getattr(transformer, "cache_context", None)):
        patch(transformer, "cache_context", wrap_cache_context)
    if callable(getattr(pipe, "maybe_free_model_hooks", None)):     # every diffusers pipeline calls it last
        patch(pipe, "maybe_free_model_hooks", wrap_end_of_call)


def _check_offload(transformer: torch.nn.Module) -> None:
    """ValueError for the offloading modes caching cannot run under; model offload (the whole
    transformer moved to the device for its call, by a hook on the transformer itself) is fine."""
    if any(_offloads(getattr(m, "_hf_hook", None)) for m in transformer.modules()):
        raise ValueError(
            "duca_compile: enable_sequential_cpu_offload() is not supported. accelerate moves each weight onto the "
            "device inside every leaf module's call; torch.compile cannot trace those moves, so no block would be "
            "compiled and caching would never engage. Use pipe.enable_model_cpu_offload(), which works with duca")
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:
        return
    if _is_group_offload_enabled(transformer):
        raise ValueError(
            "duca_compile: group offloading (apply_group_offloading / enable_group_offload) is not supported. Its "
            "hooks load each group's weights when the group is called, which breaks Dynamo's graph at every block: "
            "no block would be found and caching would never engage. Use pipe.enable_model_cpu_offload(), which "
            "works with duca")


def _offloads(hook) -> bool:
    """An accelerate hook that keeps weights off the device between calls (``AlignDevicesHook(offload=True)``,
    also inside a ``SequentialHook``); model offload's ``CpuOffload`` and device-map hooks do not."""
    return hook is not None and (getattr(hook, "offload", False) is True
                                 or any(map(_offloads, getattr(hook, "hooks", ()))))


_NOT_CACHED = (
    "duca_compile: denoising step {step} ended without a call of the compiled {cls}, so it ran uncached. "
    "Either Dynamo stopped compiling its forward (it hit torch._dynamo.config.recompile_limit: every model, "
    "resolution and batch size compiled in this process adds an entry to the same forward; raise the limit), "
    "or the pipeline called another transformer (e.g. Wan 2.2's transformer_2, which enable() does not compile)")


def _resolve_config(config, transformer) -> CacheConfig:
    if config is None:
        return DEFAULT_CONFIG
    if isinstance(config, CacheConfig):
        return config
    if isinstance(config, str):
        model, sep, method = config.partition(":")
        if not sep:
            model, method = _MODEL_NAMES.get(type(transformer).__name__), config
            if model is None:
                raise ValueError(f"duca_compile.enable: no preset model is known for {type(transformer).__name__}; "
                                 f"pass 'model:method' (e.g. 'flux-dev:fora') or a config")
    elif isinstance(config, tuple) and len(config) == 2 and all(isinstance(x, str) for x in config):
        model, method = config
    else:
        raise ValueError(f"duca_compile.enable: config must be a CacheConfig such as FORAConfig(interval=3) or "
                         f"DuCaConfig(), or a preset name 'model:method'; got {type(config).__name__}")
    try:
        return presets(model, method)
    except ValueError as e:
        raise ValueError(f"duca_compile.enable: {e}") from e
