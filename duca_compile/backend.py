"""The ``duca`` torch.compile backend: find sites -> build variants -> compile each -> runner.

    compiled = torch.compile(model, backend=duca_backend, dynamic=False)                  # the default: DEFAULT_CONFIG
    compiled = torch.compile(model, backend=duca_backend(FORAConfig(interval=3)), dynamic=False)
    compiled = torch.compile(model, backend="duca", options={"config": DuCaConfig()}, dynamic=False)

What the backend returns serves every model instance Dynamo routes through the graph: each call
looks its caching state up from the weights it carries (``owners``), never from the graph.
"""
from __future__ import annotations

import logging
import operator
import warnings
import weakref

import torch
import torch.fx as fx

from . import _torch, owners
from .fallbacks import Fallback
from .passes import CacheLayout, build_variant, find_sites, probe_subsets
from .passes.graph_paths import graph_fake_mode, source_name as _source_name, timestep_input
from .passes.specialize_shapes import is_dynamic, specialize_shapes
from .adaptive import AdaptiveRunner
from .adaptive_blocks import AdaptiveBlockRunner
from .passes.split_head import block_streams, split_head
from .policies import DEFAULT_CONFIG, AdaptiveConfig, CacheConfig, Mode, make_policy
from .policies.base import MIN_SUBSET
from .regional import BlockLookup, BlockRunner, block_graph_key
from .runner import GraphRunner
from .runtime import CompiledCallable, StateLookup, TimestepClock, UncachedCall
from .settings import Settings, TensorSpec, _accept_any, check_inductor_settings, inner_compiler

__all__ = ["duca_backend", "DuCaBackend", "Settings", "settings_of"]

log = logging.getLogger(__name__)

class DuCaBackend:
    """A configured backend. ``inner`` compiles each variant: "inductor" (default), or "eager" /
    "aot_eager" for fast tests and FLOP counting. ``mode`` and ``options`` reach Inductor.
    ``on_state`` is called with every caching state this backend creates (one per model instance)."""

    def __init__(self, config: CacheConfig | None = None, inner: str = "inductor", mode: str | None = None,
                 options: dict | None = None, on_state=None):
        if config is not None and not isinstance(config, CacheConfig):
            raise ValueError(f"config must be a CacheConfig such as DuCaConfig(...), got {type(config).__name__}")
        self.config = config if config is not None else DEFAULT_CONFIG
        self.inner, self.mode, self.options = inner, mode, dict(options or {})
        self.on_state = on_state
        self.settings()                        # validates inner, mode and options now

    def __repr__(self):
        return f"duca_backend({self.config!r}, inner={self.inner!r})"

    def settings(self, mode: str | None = None, options: dict | None = None) -> tuple[Settings, dict]:
        """These settings with a ``torch.compile`` call's ``mode`` / ``options`` applied, and the
        Inductor options. Raises ValueError for a bad config, inner compiler, mode or option."""
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"options must be a dict, got {type(options).__name__}")
        options = {**self.options, **(options or {})}
        config, inner = options.pop("config", self.config), options.pop("inner", self.inner)
        mode = mode or self.mode
        if not isinstance(config, CacheConfig):
            raise ValueError(f"options['config'] must be a CacheConfig such as DuCaConfig(...), "
                             f"got {type(config).__name__}")
        check_inductor_settings(inner, mode, options)
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        backend = None if self is globals().get("_DEFAULT") else self
        return Settings(config, inner, mode if mode != "default" else None, key, backend), options

    # torch.compile(..., mode=, options=) hands these over as keyword arguments.
    def __call__(self, gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
        settings, inductor_options = self.settings(mode, options)
        compile_variant = inner_compiler(settings.inner, settings.mode, inductor_options)
        module, fallbacks = _compiling_module(example_inputs)
        if is_dynamic(example_inputs) and not torch.is_grad_enabled():
            # caches need static shapes: specialise this graph per concrete shape, at run time
            ref = weakref.ref(module) if module is not None else (lambda: None)     # never keep it alive
            return ShapeSpecializer(gm, lambda g, ex: self._compile(g, ex, settings, compile_variant, ref(),
                                                                    fallbacks))
        return self._compile(gm, example_inputs, settings, compile_variant, module, fallbacks)

    def _compile(self, gm: fx.GraphModule, example_inputs, settings: Settings, compile_variant, module,
                 fallbacks=()):
        """The runner for a graph with static shapes (or a plain compile, wrapped, saying why not);
        ``module``: the module Dynamo compiled the graph from, when known; ``fallbacks``: what the
        runner must report for the graph so far."""
        params = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        if not params:
            _warn_plain("the graph has no parameters, so it cannot be tied to a model", settings.inner)
            return compile_variant(gm, example_inputs)
        anchor = example_inputs[params[0]]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        user = [i for i, (n, x) in enumerate(zip(placeholders, example_inputs))
                if not isinstance(x, torch.nn.Parameter) and "_buffers" not in _source_name(n)]
        sitemap = find_sites(gm, type(module) if module is not None else None)
        if sitemap.regional:                   # one block's graph: the model's pre-hook gives the step
            lookup, ts = BlockLookup(settings, params[0], self.on_state), None
            resolve = lookup.state
        else:
            if module is not None and owners.lookup(anchor) is None:
                owners.tie(anchor, module)
            resolve = StateLookup(settings, params[0], self.on_state)
            ts = timestep_input(placeholders, user, module)

        if torch.is_grad_enabled():            # the model's cached graphs cannot serve this call
            why = "grad mode is on: run the model under torch.no_grad() or torch.inference_mode()"
            _warn_plain(why, settings.inner)
            return UncachedCall(resolve, compile_variant(gm, example_inputs), why, counts_step=True,
                                timestep_index=ts)
        if not sitemap:
            _warn_plain(sitemap.why_empty, settings.inner,
                        " (a model split by graph breaks caches the pieces that hold its blocks: "
                        "duca_compile.explain(model) lists them)")
            compiled = compile_variant(gm, example_inputs)
            # before a graph break, the piece with the timestep tells the block pieces which step it is
            return TimestepClock(resolve, compiled, ts, sitemap.why_empty) if ts is not None else \
                UncachedCall(resolve, compiled, sitemap.why_empty)
        examples, strided = list(example_inputs), []
        if sitemap.regional:
            # Dynamo compiles the first block of a class apart (its input, the patch embedding's
            # output, has other strides): compile for contiguous inputs, so that the graphs of one
            # class can share their variants, and make such inputs contiguous at each call
            strided = [i for i, x in enumerate(examples) if isinstance(x, torch.Tensor) and not x.is_contiguous()]
            examples = [x.contiguous() if i in strided else x for i, x in enumerate(examples)]
        if isinstance(settings.config, AdaptiveConfig) and sitemap.regional:
            return _adaptive_blocks(gm, example_inputs, examples, strided, sitemap, settings, compile_variant, lookup,
                                    user, fallbacks)
        if isinstance(settings.config, AdaptiveConfig):
            return _adaptive(gm, example_inputs, sitemap, settings, compile_variant, resolve, ts, user, fallbacks)
        policy = make_policy(settings.config)
        fallbacks = [*fallbacks, *probe_subsets(
            gm, sitemap, parallel_blocks=Mode.SUBSET in policy.modes() and policy.subsets_parallel_blocks)]
        layout = CacheLayout.from_graph(gm, sitemap, orders=policy.taylor_orders, propagation=policy.propagation,
                                        value_norms=getattr(settings.config, "selection", "") == "kv-norm",
                                        plain_sites={s.name for s in sitemap.sites if not policy.propagates(s.latent)},
                                        forecast=policy.forecast_basis[0])
        fake_mode = graph_fake_mode(n.meta.get("example_value") for n in gm.graph.nodes) \
            or _torch.detect_fake_mode(example_inputs)

        build = VariantBuilder(gm, examples, sitemap, layout, fake_mode, compile_variant)
        log.info("duca: %d sites in %d blocks%s; stack outputs %s", len(sitemap.sites), len(sitemap.blocks),
                 " (one block's graph: regional)" if sitemap.regional else "", sitemap.stack_outputs)
        if sitemap.regional:
            return BlockRunner(lookup, settings, sitemap, layout, build, timestep_index=None, user_indices=user,
                               fallbacks=fallbacks, strided=strided, share_key=(settings, *block_graph_key(gm, examples)))
        return GraphRunner(resolve, settings, sitemap, layout, build, timestep_index=ts, user_indices=user,
                           fallbacks=fallbacks)


def _adaptive_blocks(gm, example_inputs, examples, strided, sitemap, settings, compile_variant, lookup, user, fallbacks):
    """The runner of adaptive caching for one block graph of a regionally compiled model, or a plain
    compile (no caching state at all) when the block's outputs do not continue its inputs."""
    streams = block_streams(gm, examples)
    if not streams:
        _warn_plain(f"adaptive caching: {streams.why}", settings.inner)
        return compile_variant(gm, example_inputs)
    return AdaptiveBlockRunner(lookup, settings, sitemap, streams, gm, examples, compile_variant, user,
                               strided=strided, share_key=(settings, *block_graph_key(gm, examples)),
                               fallbacks=fallbacks)


def _adaptive(gm, example_inputs, sitemap, settings, compile_variant, resolve, ts, user, fallbacks):
    """The runner of adaptive caching, or a plain compile, wrapped, when the graph cannot be cut
    after its head blocks (a warning says why)."""
    config = settings.config
    split = split_head(gm, sitemap, config.head_blocks, config.tail_blocks)
    why = split.why
    if why:
        _warn_plain(f"adaptive caching: {why}", settings.inner)
        return UncachedCall(resolve, compile_variant(gm, example_inputs), f"adaptive caching: {why}")
    fake_mode = graph_fake_mode(n.meta.get("example_value") for n in gm.graph.nodes) \
        or _torch.detect_fake_mode(example_inputs)
    log.info("duca: adaptive caching, head %s, middle %d blocks, tail %s", split.head, len(split.middle), split.tail)
    return AdaptiveRunner(resolve, settings, sitemap, split, gm, list(example_inputs), fake_mode, compile_variant,
                          timestep_index=ts, user_indices=user, fallbacks=fallbacks)


class VariantBuilder:
    """Builds (passes) and compiles one variant of a graph for a plan: ``(actions, skip, generic)``
    -> (compiled, accepts(index tensors), variant graph). The graph is built at SUBSET sizes below
    every site's token count, so that each site's token axis is told apart; ``generic`` compiles
    it for any sizes, else for the plan's own."""

    def __init__(self, gm, example_inputs, sitemap, layout, fake_mode, compile_variant):
        self.gm, self.example_inputs, self.sitemap, self.layout = gm, example_inputs, sitemap, layout
        self.fake_mode, self.compile_variant = fake_mode, compile_variant
        self.tokens = {s.name: s.tokens[0] for s in sitemap.sites}

    def __call__(self, actions: dict, skip: bool, generic: bool = True):
        # Always built below every token count: at k = N an axis of width N (Wan at N = D = 32)
        # would be taken for the token axis. The graph names no literal k, so a plan compiled apart
        # still compiles it for its own k, with static index shapes.
        built = {name: _below_all(a, self.tokens[name]) for name, a in actions.items()}
        variant = build_variant(self.gm, self.sitemap, self.layout, built, skip, self.fake_mode)
        if _moves_data_only(variant):
            # a block graph's SKIP returns a copy of its cache: nothing for a compiler to speed up,
            # and an Inductor compile costs seconds
            return variant.forward, _accept_any, variant
        specs = self.layout.inputs(built if generic else actions)      # the index sizes compiled for
        # caches by their metadata only (compiled on fake tensors: no cache-sized allocation while
        # compiling); the per-call inputs are index and coefficient tensors of a few elements
        extra = [TensorSpec(tuple(c.shape), c.dtype, torch.device(c.device)) for c in self.layout.caches]
        extra += [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in specs]
        first = len(self.example_inputs) + len(self.layout.caches)
        token_inputs = [first + j for j, s in enumerate(specs) if s.kind == "index"] if generic else []
        fn, accepts = self.compile_variant.compile_generic(variant, [*self.example_inputs, *extra], token_inputs)
        return fn, accepts, variant


_DATA_MOVES = {torch.ops.aten.empty_strided.default, torch.ops.aten.copy.default, torch.ops.aten.clone.default,
               operator.getitem}


def _moves_data_only(gm: fx.GraphModule) -> bool:
    return all(n.op in ("placeholder", "output") or (n.op == "call_function" and n.target in _DATA_MOVES)
               for n in gm.graph.nodes)


def _below_all(action, tokens: int):
    """A SUBSET size to build a generic variant at: k itself, or tokens - 1 for k = every token."""
    return min(action, tokens - 1) if isinstance(action, int) and tokens > MIN_SUBSET else action


class ShapeSpecializer(CompiledCallable):
    """Serves a graph Dynamo made dynamic: each concrete input shape gets a static copy of the
    graph (``passes.specialize_shapes``), compiled and cached like a graph traced with static shapes."""

    def __init__(self, gm: fx.GraphModule, compile_static):
        self.gm, self.compile_static = gm, compile_static
        self.by_shape: dict[tuple, object] = {}

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in args if not isinstance(a, torch.nn.Parameter))
        fn = self.by_shape.get(key)
        if fn is None:
            fn = self.by_shape[key] = self.compile_static(specialize_shapes(self.gm, args), list(args))
        return fn(*args)


def duca_backend(*args, **kwargs):
    """The backend itself (``backend=duca_backend``) or, given a config, a configured backend:
    ``duca_backend(FORAConfig(interval=3), inner="eager")``."""
    if args and isinstance(args[0], fx.GraphModule):
        return _DEFAULT(*args, **kwargs)
    return DuCaBackend(*args, **kwargs)


def _register_name() -> None:
    """``backend="duca"``: torch finds the name through the package's entry point, which imports this
    module and then registers it itself; register here only when torch knows no such name yet
    (the package run from a source tree without ``pip install``)."""
    if not _torch.backend_known("duca"):
        try:
            from importlib.metadata import entry_points

            if any(ep.name == "duca" for ep in entry_points(group="torch_dynamo_backends")):
                return                         # torch will load it through the entry point
        except (OSError, ValueError):          # metadata unreadable: register by hand below
            pass
        _torch.backend_registry.register_backend(duca_backend, name="duca")



def settings_of(model) -> Settings | None:
    """The duca settings of a compiled wrapper: what ``torch.compile(m, ...)`` returned, or a module
    compiled in place by ``m.compile(...)``. None when ``model`` is not one, or not with duca."""
    callback = _torch.compile_callback(model)
    if callback is None:
        return None
    backend = _torch.innermost_backend(callback)
    fn, kwargs = getattr(backend, "compiler_fn", backend), dict(getattr(backend, "kwargs", {}) or {})
    fn = getattr(fn, "duca", fn)                   # integrations.diffusers wraps one
    fn = _DEFAULT if fn is duca_backend else fn
    if not isinstance(fn, DuCaBackend):
        return None
    try:
        return fn.settings(**kwargs)[0]
    except (TypeError, ValueError):
        return None


def _warn_plain(why: str, inner: str, hint: str = "") -> None:
    warnings.warn(f"duca: no caching for this graph ({why}); compiling it plainly with {inner}{hint}",
                  stacklevel=3)


def _compiling_module(example_inputs) -> tuple[torch.nn.Module | None, list[Fallback]]:
    """The module whose forward Dynamo is compiling, when it holds the graph's first parameter
    (pieces of one model split by graph breaks then share one owner), and the fallback taken when
    this torch cannot say (the run-time lookup then walks the call stack)."""
    anchor = next((x for x in example_inputs if isinstance(x, torch.nn.Parameter)), None)
    try:
        frame_locals = _torch.compiling_frame_locals()
    except _torch.MissingTorchAPI as e:
        return None, [Fallback("owner_by_frame_walk", "graph", str(e).split(". Tested")[0])]
    module = frame_locals.get("self") if frame_locals is not None else None
    if anchor is not None and isinstance(module, torch.nn.Module) and any(p is anchor for p in module.parameters()):
        return module, []
    return None, []


_DEFAULT = DuCaBackend()      # what the bare ``backend=duca_backend`` compiles with
_register_name()
