"""Run-time side of the backend: per-model state, step/request tracking, caches and dispatch.

Nothing here is traced. ``ModelState`` is shared by every graph Dynamo makes from one model: it
knows the request, step and slot of each call (from timesteps, ``sampling()`` or a pipeline
driver) and owns token selection; ``runner.GraphRunner`` dispatches each call to a variant.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from .policies import CacheConfig, Mode, StepPlan, make_policy
from .selection import TokenSelector

__all__ = ["ModelState", "PipelineDriver", "Stats", "TimestepClock", "state_of", "attach_state", "sampling",
           "reset"]

# id(owner) -> (weakref to it, state); the owner is the compiled module (every graph piece Dynamo
# makes from it shares the state) or, outside Dynamo, a graph's first parameter. Tensors compare
# elementwise, so no WeakKeyDictionary.
_STATES: dict[int, tuple[weakref.ref, "ModelState"]] = {}
_PENDING: dict[int, tuple[weakref.ref, "_Sampling"]] = {}     # sampling() entered before the state exists


def timestep_value(t) -> float:
    """The number marking a call's step: the mean timestep. Per-token timesteps (LTX's conditioning
    frames stay at 0) still change every step; one scalar device-to-host copy."""
    return float(t.float().mean()) if isinstance(t, torch.Tensor) else float(t)


def _lookup(owner) -> "ModelState | None":
    entry = _STATES.get(id(owner))
    return entry[1] if entry is not None and entry[0]() is owner else None


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
    block_hits: Counter = field(default_factory=Counter)   # block -> site outputs it read from a cache
    variants_compiled: int = 0
    compile_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["steps"] = {m.value: self.steps.get(m.value, 0) for m in Mode}
        d["block_hits"] = dict(self.block_hits)
        return d


class TimestepTracker:
    """Turns the sequence of timestep values into (new request?, step, slot).

    A new value is a new step; the same value again is another pass of the same step (its own
    cache slot, e.g. separate cond/uncond calls); a value seen before in this request, or one
    that reverses the direction of the sequence, starts a new request.
    """

    def __init__(self):
        self.seen: list[float] = []
        self.slot = 0

    def observe(self, t: float) -> tuple[bool, int, int]:
        if self.seen and t == self.seen[-1]:
            self.slot += 1
            return False, len(self.seen) - 1, self.slot
        restart = not self.seen or t in self.seen
        if len(self.seen) >= 2:
            direction = self.seen[-1] - self.seen[-2]
            restart |= (t - self.seen[-1]) * direction < 0
        if restart:
            self.seen = []
        self.seen.append(t)
        self.slot = 0
        return restart, len(self.seen) - 1, 0


class ModelState:
    """Caching state of one compiled model, shared by every graph Dynamo makes from it."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.policy = make_policy(config)
        self.stats = Stats()
        self.tracker = TimestepTracker()
        self.epoch = 0               # caches written under another epoch are invalid
        self.step, self.slot = 0, 0
        self.num_steps: int | None = None
        self.driver = None           # _Sampling or PipelineDriver: step/slot without reading timesteps
        self.shape_keys: dict[int, tuple] = {}
        self.runners: list[weakref.ref] = []
        self.step_indices: dict[str, torch.Tensor] = {}
        self.generators: dict[torch.device, torch.Generator] = {}
        self.warned: set[str] = set()
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

    def new_request(self) -> None:
        self.epoch += 1
        self.stats.requests += 1
        self.step, self.slot = 0, 0
        self.step_indices = {}
        self.selector.reset()
        for g in self.generators.values():
            g.manual_seed(self.config.seed)

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

    def advance_piece(self, own_timestep) -> bool:
        """``advance`` for one graph piece: with its own timestep input it advances; otherwise the
        first piece of a model call advances on the timestep a clock piece saw, the rest follow."""
        if own_timestep is not None:
            self.tracked = self.advance(own_timestep)
        elif self.clock_calls and self.advanced_at == self.clock_calls:
            return self.tracked
        else:
            t = self.pending_timestep
            self.tracked = self.advance(lambda: None if t is None else timestep_value(t))
        self.advanced_at = self.clock_calls
        return self.tracked

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.config.seed)
            self.generators[device] = g
        return self.generators[device]

    def select_tokens(self, site: str, batch: int, tokens: int, k: int, device,
                      value_score: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, k]`` token indices on the device; later passes of a step reuse the first's."""
        idx = self.step_indices.get(site)
        if idx is not None and idx.shape == (batch, k) and self.slot > 0:
            return idx
        idx = self.selector.select(site, batch, tokens, k, device, self.generator(torch.device(device)),
                                   value_score)
        self.step_indices[site] = idx
        return idx

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            import warnings
            warnings.warn(message, stacklevel=3)


def state_of(model) -> ModelState | None:
    """The caching state of a compiled model (or of its original module)."""
    module = getattr(model, "_orig_mod", model)
    st = _lookup(module)
    if st is not None:
        return st
    for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
        st = _lookup(p)
        if st is not None:
            return st
    return None


def attach_state(owner, config: CacheConfig) -> ModelState:
    """The state of ``owner`` (a module, or a graph's first parameter), new if its config changed."""
    old = st = _lookup(owner)
    if st is None or st.config != config:
        st = ModelState(config)
        pending = _PENDING.get(id(owner))
        if pending is not None and pending[0]() is owner:     # a sampling() entered before the first call
            st.driver = pending[1]
        elif old is not None:                                 # recompiled with another config inside one
            st.driver = old.driver
        key = id(owner)
        _STATES[key] = (weakref.ref(owner, lambda _, key=key: _STATES.pop(key, None)), st)
    return st


class TimestepClock:
    """Wraps a compiled graph piece that takes the timestep but holds no blocks (the part of a
    model before a graph break): each call it counts a model call and keeps the timestep tensor
    for the block piece that follows. Nothing is read from the device here."""

    def __init__(self, state: ModelState, compiled, timestep_index: int):
        self.state, self.compiled, self.timestep_index = state, compiled, timestep_index

    def __call__(self, *args):
        self.state.clock_calls += 1
        self.state.pending_timestep = args[self.timestep_index]
        return self.compiled(*args)


@dataclass
class _Sampling:
    num_steps: int | None
    calls_per_step: int
    calls: int = 0

    def next_call(self):
        i, self.calls = self.calls, self.calls + 1
        step, slot = divmod(i, self.calls_per_step)
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
    is never read (no device-to-host copy). Entering starts a new request. It may be entered
    before the model's first call: the state Dynamo's first compile creates takes it over.

    Example:
        with duca_compile.sampling(fast, num_steps=len(scheduler.timesteps)):
            for t in scheduler.timesteps: ...
    """
    if calls_per_step < 1:
        raise ValueError(f"calls_per_step must be >= 1, got {calls_per_step!r}")
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    driver, module = _Sampling(num_steps, calls_per_step), getattr(model, "_orig_mod", model)
    st = state_of(model)
    if st is None and not isinstance(module, torch.nn.Module):
        raise ValueError("sampling() needs the compiled module (or a model already called once)")
    previous = st.driver if st is not None else None
    if st is not None:
        st.driver = driver
    else:
        _PENDING[id(module)] = (weakref.ref(module), driver)
    try:
        yield st                  # None when the first call inside creates the state
    finally:
        _PENDING.pop(id(module), None)
        for state in {id(s): s for s in (st, state_of(model)) if s is not None}.values():
            if state.driver is driver:          # the state a compile inside the block created, too
                state.driver = previous
            state.reset()


def reset(model) -> None:
    """Drop a compiled model's caches by hand (normally automatic)."""
    st = state_of(model)
    if st is not None:
        st.reset()
