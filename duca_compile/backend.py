"""The ``duca`` torch.compile backend: find sites -> build variants -> compile each -> runner.

    compiled = torch.compile(model, backend=duca_backend)                       # DuCa defaults
    compiled = torch.compile(model, backend=duca_backend(FORAConfig(interval=3)))
    compiled = torch.compile(model, backend="duca", options={"config": DuCaConfig()})
"""
from __future__ import annotations

import logging
import re
import warnings

import torch
import torch.fx as fx
from torch._dynamo.backends.registry import register_backend

from .passes import CacheLayout, build_variant, find_sites, probe_subsets
from .passes.graph_paths import graph_fake_mode, source_name as _source_name
from .policies import CacheConfig, DuCaConfig
from .runner import GraphRunner
from .runtime import TimestepClock, attach_state

__all__ = ["duca_backend", "DuCaBackend", "INNER_COMPILERS"]

log = logging.getLogger(__name__)

# Graph inputs whose value marks the denoising step (matched against Dynamo's source names).
TIMESTEP_INPUT_NAMES = re.compile(r"\b(timestep|timesteps|t|sigma|sigmas)\b|\['(timestep|t)'\]")
INNER_COMPILERS = ("inductor", "eager", "aot_eager")


class DuCaBackend:
    """A configured backend. ``inner`` compiles each variant: "inductor" (default), or "eager" /
    "aot_eager" for fast tests and FLOP counting. ``mode`` and ``options`` reach Inductor."""

    def __init__(self, config: CacheConfig | None = None, inner: str = "inductor", mode: str | None = None,
                 options: dict | None = None):
        if config is not None and not isinstance(config, CacheConfig):
            raise ValueError(f"config must be a CacheConfig such as DuCaConfig(...), got {type(config).__name__}")
        if inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
        self.config = config if config is not None else DuCaConfig()
        self.inner, self.mode, self.options = inner, mode, dict(options or {})

    def __repr__(self):
        return f"duca_backend({self.config!r}, inner={self.inner!r})"

    # torch.compile(..., mode=, options=) hands these over as keyword arguments.
    def __call__(self, gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
        options = {**self.options, **(options or {})}
        config = options.pop("config", self.config)
        inner = options.pop("inner", self.inner)
        if not isinstance(config, CacheConfig):
            raise ValueError(f"options['config'] must be a CacheConfig, got {type(config).__name__}")
        compile_variant = _inner_compiler(inner, mode or self.mode, options)

        why = _unsupported(gm, example_inputs)
        sitemap = find_sites(gm) if not why else None
        if sitemap is not None and not sitemap:
            why = sitemap.why_empty
        elif sitemap is not None:
            probe_subsets(gm, sitemap)
        params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
        owner = _owner(params)
        if not why and owner is None:
            why = "the graph has no parameters, so it cannot be tied to a model"
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        user = [i for i, (n, x) in enumerate(zip(placeholders, example_inputs))
                if not isinstance(x, torch.nn.Parameter) and "_buffers" not in _source_name(n)]
        ts = [i for i in user if TIMESTEP_INPUT_NAMES.search(_source_name(placeholders[i]))]
        if why:
            hint = (" (a model split by graph breaks caches the pieces that hold its blocks: "
                    "duca_compile.explain(model) lists them)") if sitemap is not None else ""
            warnings.warn(f"duca: no caching for this graph ({why}); compiling it plainly with {inner}{hint}",
                          stacklevel=2)
            compiled = compile_variant(gm, example_inputs)
            if owner is None:
                return compiled
            state = attach_state(owner, config)
            if why not in state.uncached:
                state.uncached.append(why)
            # the piece before a graph break: it tells the block pieces after it which step this is
            return TimestepClock(state, compiled, ts[0]) if ts and sitemap is not None else compiled

        state = attach_state(owner, config)
        policy = state.policy
        layout = CacheLayout.from_graph(gm, sitemap, orders=policy.taylor_orders, propagation=policy.propagation,
                                        value_norms=getattr(config, "selection", "") == "kv-norm")
        fake_mode = graph_fake_mode(n.meta.get("example_value") for n in gm.graph.nodes) \
            or torch._guards.detect_fake_mode(example_inputs)

        def build(actions, skip):
            variant = build_variant(gm, sitemap, layout, actions, skip, fake_mode)
            extra = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) for c in layout.caches]
            extra += [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in layout.inputs(actions)]
            return compile_variant(variant, [*example_inputs, *extra]), variant

        runner = GraphRunner(state, sitemap, layout, build, piece_key=id(params[0]),
                             timestep_index=ts[0] if ts else None, user_indices=user)
        log.info("duca: %d sites in %d blocks; stack outputs %s", len(sitemap.sites), len(sitemap.blocks),
                 sitemap.stack_outputs)
        return runner


def duca_backend(*args, **kwargs):
    """The backend itself (``backend=duca_backend``) or, given a config, a configured backend:
    ``duca_backend(FORAConfig(interval=3), inner="eager")``."""
    if args and isinstance(args[0], fx.GraphModule):
        return DuCaBackend()(*args, **kwargs)
    return DuCaBackend(*args, **kwargs)


register_backend(duca_backend, name="duca")


def _owner(params: list):
    """What a graph's caching state belongs to: the module Dynamo is compiling (so the pieces of a
    model split by graph breaks share one state), else the graph's first parameter."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        module = tx.f_locals.get("self") if tx is not None else None
    except Exception:  # noqa: BLE001 - outside Dynamo (or another version): fall back to the parameter
        module = None
    if isinstance(module, torch.nn.Module) and (not params or any(p is params[0] for p in module.parameters())):
        return module
    return params[0] if params else None


def _unsupported(gm: fx.GraphModule, example_inputs) -> str:
    for x in example_inputs:
        if isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and
                                           any(isinstance(s, torch.SymInt) for s in x.shape)):
            return "dynamic shapes: compile with torch.compile(..., dynamic=False) so each shape gets static caches"
    if torch.is_grad_enabled():
        return "grad mode is on: run the model under torch.no_grad() or torch.inference_mode()"
    return ""


def _inner_compiler(inner: str, mode: str | None, options: dict):
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return lambda gm, example_inputs: aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**list_mode_options(mode or "default"), **options}

    def compile_inductor(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches=patches)
    return compile_inductor
