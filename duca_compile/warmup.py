"""``precompile``: compile every variant a schedule uses before the first request.

Variants otherwise compile on the first step that needs one, in the middle of a request (seconds
each with Inductor, while the request's memory is already taken). A compiled model is warmed up by
calling it once per distinct step plan of the schedule (its first FULL step, then the first step
of every other plan), with the caller's example inputs; a pipeline by running it once.
"""
from __future__ import annotations

import time

import torch

from . import _torch
from .runner import GraphRunner
from .runtime import Stats, driven, state_of

__all__ = ["precompile"]


class _Steps:
    """A driver visiting ``steps`` of one request of ``num_steps`` steps, one call each."""

    def __init__(self, steps: list[int], num_steps: int):
        self.steps, self.num_steps, self.calls = steps, num_steps, 0

    def next_call(self):
        if self.calls >= len(self.steps):
            raise ValueError(f"precompile: the model was called more than the {len(self.steps)} times planned")
        self.calls += 1
        return self.calls == 1, self.steps[self.calls - 1], 0, self.num_steps


def precompile(model, *args, num_steps: int | None = None, **kwargs) -> dict:
    """Compile every variant ``num_steps`` steps of the model's schedule use, now.

    model: what ``torch.compile(m, backend=duca...)`` returned, or a module compiled in place with
        duca, called as ``model(*args, **kwargs)`` (one call's inputs: the shapes, dtypes and devices
        requests will have, the timestep's too: a float timestep where requests pass integer ones
        is another graph; their values do not matter); or a pipeline given to
        ``duca_compile.enable``, run once as ``pipe(*args, **kwargs)`` (``num_inference_steps`` among
        them; ``num_steps`` is then not used).

    Afterwards the caches are dropped and the model's stats start from zero but for what compiling
    counts (variants, compile seconds, fallbacks, ``precompile_seconds``). Inputs of another shape
    later compile again. Returns ``seconds`` (wall-clock), ``variants`` (compiled during the call),
    ``calls`` (model calls made) and ``steps`` (which steps were run, for a model).
    """
    start = time.perf_counter()
    transformer = getattr(model, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and not isinstance(model, torch.nn.Module):
        before = _compiled(transformer)
        model(*args, **kwargs)
        st, steps = state_of(transformer), None
    else:
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"precompile: num_steps must be an int >= 1 (the request's steps), got {num_steps!r}")
        before, driver = _compiled(model), _Steps([0], num_steps)
        with driven(model, driver, "precompile()"):
            model(*args, **kwargs)             # traces the graphs; step 0 runs FULL
            st = state_of(model)
            if st is None:
                raise ValueError(f"precompile: {type(_torch.original_module(model)).__name__} is not compiled with "
                                 "the duca backend (no caching state after a call)")
            driver.steps = steps = _distinct_steps(st, num_steps)
            for _ in steps[1:]:
                model(*args, **kwargs)
    if st is None:
        raise ValueError(f"precompile: {type(model).__name__}'s transformer is not compiled with the duca backend; "
                         "call duca_compile.enable(pipe, ...) first")
    seconds = time.perf_counter() - start
    calls = st.stats.calls
    _restart_stats(st, seconds)
    return {"seconds": seconds, "variants": st.stats.variants_compiled - before, "calls": calls, "steps": steps}


def _compiled(model) -> int:
    st = state_of(model)
    return st.stats.variants_compiled if st is not None else 0


def _distinct_steps(st, num_steps: int) -> list[int]:
    """Step 0, then the first step of each plan the schedule has not shown yet, for every graph
    of the model (whole-model graphs and the block stack of regional compilation)."""
    runners = [r for r, _ in st.pieces.items() if isinstance(r, GraphRunner)]
    steps, seen = [0], set()
    for step in range(num_steps):
        keys = tuple(r.planned(step, num_steps).key for r in runners)
        if st.regional is not None:
            _, actions, skip = st.regional.plan_step(step, num_steps)
            keys += (GraphRunner.key(actions, skip),)
        if keys not in seen:
            seen.add(keys)
            if step:
                steps.append(step)
    return steps


def _restart_stats(st, seconds: float) -> None:
    """Drop what the warm-up calls counted; keep what compiling counted."""
    old = st.stats
    st.stats = Stats(variants_compiled=old.variants_compiled, compile_seconds=old.compile_seconds,
                     fallbacks=old.fallbacks, precompile_seconds=old.precompile_seconds + seconds)
    for _, piece in st.graphs():
        piece.variant_calls.clear()
        piece.cold_clusterings = 0
    st.reset()
