"""Shared test helpers: compile a tiny model with the duca backend and check it against the oracle."""
from __future__ import annotations

import contextlib
import copy

import torch

from duca_compile import duca_backend
from duca_compile.reference import ReferenceCache
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs, make_model

FAMILIES = ["dit", "pixart", "flux"]


def compile_tiny(family, config, inner="eager", seed=0, **model_kw):
    """A tiny ``family`` model and its duca-compiled twin (fullgraph where the family traces so)."""
    from duca_compile.conformance import EXPECTED

    model = make_model(family, seed=seed, **model_kw)
    fullgraph = EXPECTED[family].fullgraph if family in EXPECTED else True
    fast = torch.compile(model, backend=duca_backend(config, inner=inner), fullgraph=fullgraph, dynamic=False)
    return model, fast


# diffusers declares no repeated blocks for these
REPEATED = {"dit": ["BasicTransformerBlock"], "pixart": ["BasicTransformerBlock"]}


def compile_regional(family, config, inner="eager", **model_kw):
    """A tiny model with its blocks compiled by duca (``compile_repeated_blocks``), and an
    uncompiled twin for the oracle."""
    model = make_model(family, **model_kw)
    twin = copy.deepcopy(model)
    if not model._repeated_blocks:
        model._repeated_blocks = REPEATED[family]
    model.compile_repeated_blocks(backend=duca_backend(config, inner=inner), dynamic=False, fullgraph=True)
    return twin, model


def timesteps(n, start=900.0, stop=100.0):
    return [start - i * (start - stop) / max(n - 1, 1) for i in range(n)]


def oracle_for(model, fast):
    """An oracle with the compiled model's sites and its method's Taylor / propagation settings."""
    return ReferenceCache.from_compiled(model, fast)


def run_oracle_step(oracle, fast, **kw):
    return oracle.replay(fast, **kw)


def run_against_oracle(family, model, fast, ts, batch=2, atol=1e-5, input_seed=0):
    """Run every timestep through both; return the modes run. Asserts closeness at each step."""
    oracle, modes = None, []
    for i, t in enumerate(ts):
        kw = make_inputs(family, model, batch=batch, timestep=t, seed=input_seed + i)
        out = fast(**kw)[0]
        st = state_of(fast)
        oracle = oracle or oracle_for(model, fast)
        ref = run_oracle_step(oracle, fast, **kw)[0]
        torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4,
                                   msg=lambda m: f"step {i} ({st.last_plan.mode.value}): {m}")
        modes.append(st.last_plan.mode.value)
    return modes


@contextlib.contextmanager
def recorded_calls(pipe):
    """(new request?, step, slot, num_steps, cache_context name) of every transformer call of an
    enabled pipeline, as its driver hands them out."""
    driver = state_of(pipe.transformer).driver
    original, calls = driver.next_call, []

    def next_call():
        call = original()
        calls.append((*call, driver.context))
        return call

    driver.next_call = next_call
    try:
        yield calls
    finally:
        del driver.next_call
