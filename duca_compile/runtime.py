"""Run-time side of the backend: per-model state, step/request tracking and the controls.

Nothing here is traced. A ``ModelState`` belongs to one model instance and one backend setting
(``owners`` finds it from the weights a call carries). It knows the request, step and slot of each
call (from timesteps, ``sampling()`` or a pipeline driver), owns token selection and, per compiled
graph that served the model, its caches (``runner.Piece``); ``runner.GraphRunner`` dispatches each
call to a variant.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import _torch, owners
from .fallbacks import Fallback
from .policies import CacheConfig, Mode, StepPlan, make_policy
from .policies.token_selection import TokenSelector

__all__ = ["ModelState", "PipelineDriver", "Stats", "TimestepTracker", "StateLookup", "TimestepClock", "UncachedCall",
           "TimestepReader", "state_of", "states_of", "state_for", "sampling", "driven", "reset", "timestep_value"]

# id(module) -> (weakref to it, settings or None for any, driver): a sampling() entered before the
# model's first call; the state that call creates takes the driver over.
_PENDING: dict[int, tuple[weakref.ref, object, "_Sampling"]] = {}
# A request's steps do not jump: a timestep moving on by more than this many times the largest step
# so far starts a new request (an early-stopped request followed by an img2img one, say).
JUMP_FACTOR = 4.0
# Context parallelism under torch 2.11 differs (see the warning in state_for); tested from this one.
CONTEXT_PARALLEL_TORCH = (2, 13)


def timestep_value(t) -> float:
    """The number marking a call's step: the mean timestep. Per-token timesteps (LTX's conditioning
    frames stay at 0) still change every step; for a tensor on an accelerator, a host sync."""
    return float(t.float().mean()) if isinstance(t, torch.Tensor) else float(t)


class TimestepReader:
    """Reads call timesteps with as few host syncs as it can. A Python number or a CPU tensor costs
    none. A device tensor that is a view of one already read (``t.expand(batch)`` of an element of
    ``scheduler.timesteps``, as ``for t in timesteps`` yields) is looked up in the host copy of its
    base, taken once per base (one sync per request), while that base is alive and unwritten. Any
    other device tensor is read, one sync. ``syncs`` counts the syncs."""

    free = ("cpu",)        # device types whose tensors the host reads without waiting

    def __init__(self):
        self.syncs = 0
        self._base: tuple = (None, -1, None)     # (weakref to the base, its version, its host copy)

    def __call__(self, t) -> float:
        if not isinstance(t, torch.Tensor) or t.device.type in self.free:
            return timestep_value(t)
        base = _torch.view_base(t)
        version = _torch.version(base) if base is not None else None
        if version is None or not base.is_contiguous() or base.dtype != t.dtype:
            self.syncs += 1                    # no base, or one whose writes are not counted
            return timestep_value(t)
        ref, seen, host = self._base
        if ref is None or ref() is not base or seen != version:
            self.syncs += 1
            host = base.detach().to("cpu")
            self._base = (weakref.ref(base), version, host)
        view = host.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())
        return timestep_value(view)


@dataclass
class Stats:
    requests: int = 0
    calls: int = 0
    steps: Counter = field(default_factory=Counter)        # mode name -> calls run in that mode
    tokens_computed: int = 0     # summed over sites: N per computed site, k per SUBSET site
    tokens_total: int = 0        # what an uncached model would have computed
    cache_hits: int = 0          # site (or stack) outputs read from a cache instead of computed
    shape_resets: int = 0        # caches dropped because batch, resolution or dtype changed
    fallback_calls: int = 0      # calls run FULL because no step could be tracked
    uncached_calls: int = 0      # calls a cached model ran plainly (grad mode)
    host_syncs: int = 0          # device-to-host reads of timesteps (TimestepReader)
    decision_reads: int = 0      # device-to-host reads of adaptive decisions (one per step at most)
    block_hits: Counter = field(default_factory=Counter)   # block -> site outputs it read from a cache
    fallbacks: Counter = field(default_factory=Counter)    # fallbacks.REASONS key -> places it happened
    variants_compiled: int = 0
    compile_seconds: float = 0.0
    precompile_seconds: float = 0.0      # duca_compile.precompile's wall-clock, in total

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["steps"] = {m.value: self.steps.get(m.value, 0) for m in Mode}
        d["block_hits"] = dict(self.block_hits)
        d["fallbacks"] = dict(self.fallbacks)
        return d


class TimestepTracker:
    """Turns the sequence of timestep values into (new request?, step, slot).

    A new value is a new step; the same value again is another pass of the same step (its own
    cache slot, e.g. separate cond/uncond calls). A new request starts with a value seen before in
    this request, one that reverses the direction of the sequence, or one that jumps by more than
    ``JUMP_FACTOR`` times the largest step so far.
    """

    def __init__(self):
        self.seen: list[float] = []
        self.slot = 0
        self.largest_step = 0.0

    def observe(self, t: float) -> tuple[bool, int, int]:
        if self.seen and t == self.seen[-1]:
            self.slot += 1
            return False, len(self.seen) - 1, self.slot
        restart = not self.seen or t in self.seen or not math.isfinite(t)
        if self.seen:
            jump = abs(t - self.seen[-1])
            restart |= self.largest_step > 0 and jump > JUMP_FACTOR * self.largest_step
            if len(self.seen) >= 2:
                restart |= (t - self.seen[-1]) * (self.seen[-1] - self.seen[-2]) < 0
        if restart:
            self.seen, self.largest_step = [], 0.0
        elif self.seen:
            self.largest_step = max(self.largest_step, abs(t - self.seen[-1]))
        self.seen.append(t)
        self.slot = 0
        return restart, len(self.seen) - 1, 0


class ModelState:
    """Caching state of one model instance under one backend setting."""

    def __init__(self, config: CacheConfig, settings=None):
        self.config, self.settings = config, settings
        self.policy = make_policy(config)
        self.stats = Stats()
        self.tracker = TimestepTracker()
        self.timesteps = TimestepReader()
        self.request_syncs = 0       # host syncs of timestep reads in this request after its first call
        self.epoch = 0               # caches written under another epoch are invalid
        self.step, self.slot = 0, 0
        self.num_steps: int | None = None
        self.driver = None           # _Sampling or PipelineDriver: step/slot without reading timesteps
        self.pieces: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # GraphRunner -> Piece
        self.regional = None         # regional.BlockStack: the blocks whose graphs are compiled one by one
        self.shape_keys: dict[int, tuple] = {}    # id(anchor) of a graph piece -> its last input shapes
        self.step_indices: dict[str, torch.Tensor] = {}
        self.generators: dict[torch.device, torch.Generator] = {}
        self.seed_offset = 0         # context parallelism: this rank's stream of the shared seed
        self.warned: set[str] = set()
        self.fallbacks: dict[tuple[str, str], Fallback] = {}    # (reason, where) -> the fallback
        self.selector = TokenSelector(config, self.warn_once)
        self.last_indices: dict[str, torch.Tensor] = {}
        self.last_plan: StepPlan | None = None
        self.last_actions: dict = {}
        self.last_assign: dict = {}
        self.last_skip = False
        self.uncached: list[str] = []     # why graphs of this model run plainly
        # Graph pieces of one model call (graph breaks): a piece holding the timestep but no blocks
        # counts calls and keeps the timestep tensor; the first block piece of the call advances.
        self.clock_calls = 0
        self.pending_timestep: torch.Tensor | None = None
        self.advanced_at = -1
        self.tracked = False

    def __repr__(self):
        return f"ModelState({self.config!r}, calls={self.stats.calls})"

    def graphs(self) -> list:
        """(runner, piece) of every compiled graph that has served this model (one per block
        with regional compilation)."""
        return list(self.pieces.items()) + (self.regional.graphs() if self.regional is not None else [])

    def new_request(self) -> None:
        self.epoch += 1
        self.request_syncs = 0
        self.stats.requests += 1
        self.step, self.slot = 0, 0
        self.step_indices = {}
        self.selector.reset()
        for g in self.generators.values():
            g.manual_seed(self.config.seed + self.seed_offset)

    def reset(self) -> None:
        """Drop every cache; the next call starts a new request."""
        self.epoch += 1
        self.tracker = TimestepTracker()
        self.step, self.slot = 0, 0

    def advance(self, read_timestep) -> bool:
        """Move to the call's (step, slot); False when the step cannot be known. The timestep is
        read (one device-to-host copy) only when no driver gives the step."""
        call = self.driver.next_call() if self.driver is not None else None
        if call is not None:
            new, self.step, self.slot, self.num_steps = call
            if new:
                self.new_request()
            return True
        t = read_timestep()
        if t is None:
            return False
        restart, step, slot = self.tracker.observe(t)
        if restart:
            self.new_request()
            self.num_steps = None    # timesteps do not say how many steps a request has
        self.step, self.slot = step, slot
        return True

    def read_timestep(self, t) -> float:
        """A call's timestep value (``TimestepReader``), its host syncs counted in ``stats``."""
        before = self.timesteps.syncs
        value = self.timesteps(t)
        if self.timesteps.syncs > before:
            self.stats.host_syncs += 1
            self.request_syncs += 1            # a restart's own read is counted before new_request()
            if self.request_syncs >= 2:
                self.warn_once("host-sync", "duca: reading each call's timestep from the device costs a host sync "
                               "per call (the CPU waits for the GPU before queueing the next step). Pass a view of "
                               "the scheduler's timesteps (t.expand(batch)), or step the model inside "
                               "duca_compile.sampling(), or use duca_compile.enable(pipe): none reads it")
        return value

    def advance_piece(self, own_timestep) -> bool:
        """``advance`` for one graph piece: with its own timestep input it advances; otherwise the
        first piece of a model call advances on the timestep a clock piece saw, the rest follow."""
        if own_timestep is not None:
            self.tracked = self.advance(own_timestep)
        elif self.clock_calls and self.advanced_at == self.clock_calls:
            return self.tracked
        else:
            t = self.pending_timestep
            self.tracked = self.advance(lambda: None if t is None else self.read_timestep(t))
        self.advanced_at = self.clock_calls
        return self.tracked

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.config.seed + self.seed_offset)
            self.generators[device] = g
        return self.generators[device]

    def select_tokens(self, requests: list, device) -> list[torch.Tensor]:
        """``[batch, k]`` token indices on the device for each ``(site, batch, tokens, k,
        value_score)``, selected together; later passes of a step reuse the first's."""
        out, todo = [], []
        for site, batch, tokens, k, _ in requests:
            idx = self.step_indices.get(site)
            reuse = idx is not None and idx.shape == (batch, k) and self.slot > 0
            out.append(idx if reuse else None)
            if not reuse:
                todo.append(len(out) - 1)
        fresh = self.selector.select_many([requests[i] for i in todo], device, self.generator(torch.device(device)))
        for i, idx in zip(todo, fresh):
            out[i] = self.step_indices[requests[i][0]] = idx
        return out

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            import warnings
            warnings.warn(message, stacklevel=3)

    def note_fallbacks(self, fallbacks, warn: bool = True) -> None:
        """Record ``fallbacks`` (``fallbacks.Fallback``) for this model: counted once per place,
        one warning per reason (``warn=False``: the backend has warned when it compiled the graph)."""
        for fb in fallbacks:
            if (fb.reason, fb.where) not in self.fallbacks:
                self.fallbacks[(fb.reason, fb.where)] = fb
                self.stats.fallbacks[fb.reason] += 1
                if warn:
                    self.warn_once(f"fallback:{fb.reason}", fb.message())


def state_for(owner: owners.Owner, settings, on_new=None) -> ModelState:
    """``owner``'s state under ``settings`` (a ``backend.Settings``), created on first use."""
    st = owner.states.get(settings)
    if st is None:
        st = owner.states[settings] = ModelState(settings.config, settings)
        module = owner.module() if owner.module is not None else None
        rank, world, group = context_parallel(module)
        st.seed_offset, st.selector.world, st.selector.group = rank, world, group
        if world > 1 and _torch.torch_version() < CONTEXT_PARALLEL_TORCH:
            st.warn_once("cp-torch", f"duca: context parallelism is tested on torch >= {CONTEXT_PARALLEL_TORCH[0]}."
                         f"{CONTEXT_PARALLEL_TORCH[1]}; on torch {torch.__version__} Dynamo recompiles other models "
                         "of the process once after the first context-parallel call (their next step runs FULL) and "
                         "the output gather is no functional collective in the graph")
        pending = _PENDING.get(id(module)) if module is not None else None
        if pending is not None and pending[0]() is module and pending[1] in (None, settings):
            st.driver = pending[2]                # a sampling() entered before the first call
        if on_new is not None:
            on_new(st)
    return st


def context_parallel(module) -> tuple[int, int, object]:
    """(rank, world size, process group) when ``module`` runs under diffusers' context parallelism,
    else (0, 1, None). Each rank then holds a shard of the tokens and draws its SUBSET tokens
    (ratio x its own tokens: a stratified share of the global k) from its own stream, seed + rank,
    so the ranks pick other local positions and their union never repeats a token."""
    config = getattr(module, "_parallel_config", None)
    if config is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1, None
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)       # diffusers' ring x ulysses mesh, once enabled
    if mesh is None:
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), None
    return mesh.get_local_rank(), mesh.size(), mesh.get_group()


def states_of(model) -> list[ModelState]:
    """Every caching state of ``model`` (a compiled wrapper or the module itself), one per setting."""
    module = _torch.original_module(model)
    owner = owners.lookup(module)
    if owner is None and isinstance(module, torch.nn.Module):
        owner = next(filter(None, map(owners.lookup, module.parameters())), None)
    return list(owner.states.values()) if owner is not None else []


def state_of(model) -> ModelState | None:
    """The caching state a compiled model uses: the one of its own backend settings when ``model``
    is a compiled wrapper (``torch.compile(m, ...)`` or ``m.compile(...)``), else the only one.
    None before the model's first call.

    Raises ValueError when the module has several (compiled with two configs) and ``model`` does
    not say which."""
    from .backend import settings_of

    states = states_of(model)
    settings = settings_of(model) if states else None
    if settings is not None:
        return next((st for st in states if st.settings == settings), None)
    if len(states) <= 1:
        return states[0] if states else None
    raise ValueError(f"{type(_torch.original_module(model)).__name__} is compiled with {len(states)} duca "
                     f"settings ({', '.join(repr(s.config) for s in states)}); pass the compiled wrapper "
                     "that torch.compile returned to say which")


class StateLookup:
    """Per call, the state of the model whose weights the call carries (``args[anchor_index]`` is
    its first parameter) under one backend setting. The last answer is kept for the next call."""

    def __init__(self, settings, anchor_index: int, on_new=None):
        self.settings, self.anchor_index, self.on_new = settings, anchor_index, on_new
        self._last: tuple = (None, None)     # weak references: (anchor, its state)

    def __call__(self, args) -> ModelState:
        anchor = args[self.anchor_index]
        ref, st = self._last
        st = st() if ref is not None and ref() is anchor else None
        if st is None:
            st = state_for(owners.owner_of_call(anchor), self.settings, self.on_new)
            self._last = (weakref.ref(anchor), weakref.ref(st))
        return st


class CompiledCallable:
    """What the backend hands back to Dynamo. Tools that read a compiled graph as a function
    (depyf's ``prepare_debug``) look for ``__code__``: this is the ``__call__`` the graph runs."""

    @property
    def __code__(self):
        return type(self).__call__.__code__


class TimestepClock(CompiledCallable):
    """Wraps a compiled graph piece that takes the timestep but holds no blocks (the part of a
    model before a graph break): each call it counts a model call and keeps the timestep tensor
    for the block piece that follows. Nothing is read from the device here."""

    def __init__(self, resolve, compiled, timestep_index: int, why: str):
        self.resolve, self.compiled, self.timestep_index, self.why = resolve, compiled, timestep_index, why

    def __call__(self, *args):
        st = self.resolve(args)
        if self.why not in st.uncached:
            _note_uncached(st, self.why)
        st.clock_calls += 1
        st.pending_timestep = args[self.timestep_index]
        return self.compiled(*args)


def _note_uncached(st: ModelState, why: str) -> None:
    st.uncached.append(why)
    st.note_fallbacks([Fallback("graph_uncached", f"graph piece {len(st.uncached)}", why)], warn=False)


class UncachedCall(CompiledCallable):
    """Wraps a graph of a model that runs plainly, and says why in ``stats``. With ``counts_step``
    (grad mode: the model's cached graphs exist but cannot serve this call) the call
    still counts as a step of the request, from its timestep or the driver, and the caches, which
    it did not write, are stale for the next cached call."""

    def __init__(self, resolve, compiled, why: str, counts_step: bool = False, timestep_index: int | None = None):
        self.resolve, self.compiled, self.why = resolve, compiled, why
        self.counts_step, self.timestep_index = counts_step, timestep_index

    def __call__(self, *args):
        st = self.resolve(args)
        if self.why not in st.uncached:
            _note_uncached(st, self.why)
        if self.counts_step:
            st.stats.uncached_calls += 1
            i = self.timestep_index
            st.advance_piece((lambda: st.read_timestep(args[i])) if i is not None else None)
            st.epoch += 1                       # the cached graphs' caches missed this step
        return self.compiled(*args)


@dataclass
class _Sampling:
    num_steps: int | None
    calls_per_step: int
    calls: int = 0

    def next_call(self):
        i = self.calls
        step, slot = divmod(i, self.calls_per_step)
        if self.num_steps is not None and step >= self.num_steps:
            raise ValueError(f"sampling(num_steps={self.num_steps}, calls_per_step={self.calls_per_step}) allows "
                             f"{self.num_steps * self.calls_per_step} model calls; this is call {i + 1}. Raise "
                             "num_steps, or leave the context between requests")
        self.calls += 1
        return i == 0, step, slot, self.num_steps


class PipelineDriver:
    """Step tracking fed by a pipeline's scheduler (see ``integrations.diffusers``).

    ``begin(num_steps)`` starts a request, ``step_done()`` ends a denoising step; calls in
    between are the step's passes: slot = the active ``cache_context`` name's index, or else the
    call's position within the step (separate cond / uncond calls get separate caches).
    """

    def __init__(self):
        self.active, self.pending = False, False
        self.num_steps, self.step, self.calls = None, 0, 0
        self.context: str | None = None
        self.contexts: dict[str, int] = {}

    def begin(self, num_steps: int | None) -> None:
        self.active, self.pending = True, True
        self.num_steps, self.step, self.calls = num_steps, 0, 0
        self.contexts = {}

    def step_done(self) -> None:
        if self.active:
            self.step, self.calls = self.step + 1, 0

    def next_call(self):
        if not self.active:
            return None          # called outside a pipeline run: fall back to timestep tracking
        new, self.pending = self.pending, False
        if self.context is not None:
            slot = self.contexts.setdefault(self.context, len(self.contexts))
        else:
            slot = self.calls
        self.calls += 1
        return new, self.step, slot, self.num_steps


@contextlib.contextmanager
def sampling(model, num_steps: int | None = None, calls_per_step: int = 1):
    """Explicit step tracking: inside, the k-th call is step ``k // calls_per_step``; the timestep
    is never read (no device-to-host copy). Entering starts a new request; more calls than
    ``num_steps * calls_per_step`` raise ValueError. It may be entered before the model's first
    call: the state that call creates takes it over. Given the wrapper ``torch.compile`` returned,
    it drives that wrapper's state only (a module compiled with two configs has two).

    Example:
        with duca_compile.sampling(fast, num_steps=len(scheduler.timesteps)):
            for t in scheduler.timesteps: ...
    """
    for name, value in (("calls_per_step", calls_per_step), ("num_steps", num_steps)):
        if value is None and name == "num_steps":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sampling(): {name} must be an int >= 1, got {value!r}")
    with driven(model, _Sampling(num_steps, calls_per_step), "sampling()") as st:
        yield st


@contextlib.contextmanager
def driven(model, driver, who: str):
    """Inside, ``driver.next_call()`` gives each call of ``model`` its (new request?, step, slot,
    num_steps); leaving drops the caches (the next call starts a new request)."""
    from .backend import settings_of

    module = _torch.original_module(model)
    st = state_of(model)
    if st is None and not isinstance(module, torch.nn.Module):
        raise ValueError(f"{who} needs the compiled module (or a model already called once)")
    previous = st.driver if st is not None else None
    if st is not None:
        st.driver = driver
    else:
        _PENDING[id(module)] = (weakref.ref(module), settings_of(model), driver)
    try:
        yield st                  # None when the first call inside creates the state
    finally:
        _PENDING.pop(id(module), None)
        touched = {id(s): s for s in (st, *states_of(model)) if s is not None and (s is st or s.driver is driver)}
        for state in touched.values():          # the state a first call inside created, too
            if state.driver is driver:
                state.driver = previous
            state.reset()


def reset(model) -> None:
    """Drop a compiled model's caches by hand (normally automatic)."""
    st = state_of(model)
    if st is not None:
        st.reset()
