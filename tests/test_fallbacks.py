"""Every fallback warns once per model, is counted in stats()["fallbacks"] and listed by explain();
each is forced here by breaking the piece it stands in for. Errors that mean something else
propagate instead of turning into a fallback."""
from __future__ import annotations

import dataclasses
import sys
import warnings

import pytest
import torch

import duca_compile
from duca_compile import ScriptedConfig, _torch, presets
from duca_compile.fallbacks import REASONS, Fallback
from duca_compile.models import make_inputs

from helpers import compile_tiny, run_against_oracle, timesteps

SUBSET_PLAN = ScriptedConfig(modes=("full", "subset", "subset", "reuse"), ratio=0.5)
_subset_module = sys.modules["duca_compile.passes.subset_branches"]


def _run(family, fast, model, steps=4):
    with duca_compile.sampling(fast, num_steps=steps):
        for i, t in enumerate(timesteps(steps)):
            fast(**make_inputs(family, model, timestep=t, seed=i))


def _fallback_warnings(record, reason):
    return [w for w in record if f"duca fallback [{reason}]" in str(w.message)]


def _recording(run):
    """``run()``'s result and every warning it raised (each one, not once per place)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = run()
    return result, record


@pytest.mark.smoke
def test_a_failed_subset_dry_run_reuses_the_site_warns_counts_and_explains(monkeypatch):
    def cannot(*args, **kwargs):
        raise ValueError("a reshape duca cannot follow")

    monkeypatch.setattr(_subset_module, "copy_on_tokens", cannot)
    model, fast = compile_tiny("dit", SUBSET_PLAN)
    _, record = _recording(lambda: _run("dit", fast, model))
    s = duca_compile.stats(fast, flops=False)
    assert s["fallbacks"] == {"subset_reused": 2}                 # the FF of each of the 2 blocks
    assert len(_fallback_warnings(record, "subset_reused")) == 1   # once per model
    assert s["tokens_computed"] < s["tokens_total"]                # still cached: reused, not computed
    text = duca_compile.explain(fast)
    assert text.count("fallback [subset_reused]") == 2 and "a reshape duca cannot follow" in text


@pytest.mark.smoke
def test_an_unexpected_error_in_the_dry_run_propagates(monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("a torch API that moved")

    monkeypatch.setattr(_subset_module, "copy_on_tokens", broken)
    model, fast = compile_tiny("dit", SUBSET_PLAN)
    with pytest.raises(Exception, match="a torch API that moved"):
        _run("dit", fast, model)


@pytest.mark.smoke
def test_a_plan_compiled_apart_warns_and_counts(monkeypatch):
    from duca_compile.settings import InnerCompiler

    generic = InnerCompiler.compile_generic

    def refusing(self, gm, inputs, token_inputs):
        fn, accepts = generic(self, gm, inputs, token_inputs)
        return fn, ((lambda indices: False) if token_inputs else accepts)

    monkeypatch.setattr(InnerCompiler, "compile_generic", refusing)
    model, fast = compile_tiny("dit", SUBSET_PLAN)
    modes, record = _recording(lambda: run_against_oracle("dit", model, fast, timesteps(4)))
    assert modes == ["full", "subset", "subset", "reuse"]
    s = duca_compile.stats(fast, flops=False)
    assert s["fallbacks"] == {"plan_compiled_apart": 1}            # one k-tuple, compiled once apart
    assert len(_fallback_warnings(record, "plan_compiled_apart")) == 1
    assert "fallback [plan_compiled_apart] at SUBSET k=" in duca_compile.explain(fast)


@pytest.mark.smoke
def test_flops_counted_per_plan_when_k_cannot_be_symbolic(monkeypatch):
    import duca_compile.flops as flops

    model, fast = compile_tiny("dit", SUBSET_PLAN)
    _run("dit", fast, model)
    symbolic = duca_compile.stats(fast)
    torch.compiler.reset()

    counted = flops.count_flops

    def no_symbols(gm, *inputs):
        if any(isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape) for x in inputs):
            raise RuntimeError("k cannot be symbolic here")
        return counted(gm, *inputs)

    monkeypatch.setattr(flops, "count_flops", no_symbols)
    model, fast = compile_tiny("dit", SUBSET_PLAN)
    _run("dit", fast, model)
    with pytest.warns(UserWarning, match=r"duca fallback \[flops_per_plan\]"):
        per_plan = duca_compile.stats(fast)
    assert per_plan["fallbacks"] == {"flops_per_plan": 1}
    assert per_plan["flops_run"] == symbolic["flops_run"] > 0      # the same count, plan by plan
    assert symbolic["fallbacks"] == {}


@pytest.mark.smoke
def test_a_graph_left_uncached_is_counted():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())

        def forward(self, x):
            return self.net(x)

    fast = torch.compile(Plain().eval(), backend=duca_compile.duca_backend(inner="eager"))
    with pytest.warns(UserWarning, match="no caching for this graph"):
        fast(torch.randn(2, 8))
    s = duca_compile.stats(fast, flops=False)
    assert s["fallbacks"] == {"graph_uncached": 1} and len(s["uncached"]) == 1
    assert "fallback [graph_uncached]" in duca_compile.explain(fast)


@pytest.mark.smoke
def test_without_dynamos_compiling_frame_the_owner_is_found_by_walking_the_stack(monkeypatch):
    monkeypatch.setitem(_torch.SURFACE, "current_tx", _torch.Private(
        "torch._dynamo.symbolic_convert", "InstructionTranslator.no_such_api", "test", "test"))
    monkeypatch.delattr(_torch, "current_tx", raising=False)       # drop the loaded one
    model, fast = compile_tiny("dit", SUBSET_PLAN)
    modes, record = _recording(lambda: run_against_oracle("dit", model, fast, timesteps(4)))
    assert modes == ["full", "subset", "subset", "reuse"]
    s = duca_compile.stats(fast, flops=False)
    assert s["fallbacks"] == {"owner_by_frame_walk": 1} and s["cache_hits"] > 0
    (w,) = _fallback_warnings(record, "owner_by_frame_walk")
    assert "InstructionTranslator.no_such_api" in str(w.message)


def test_fallback_reasons_are_validated():
    with pytest.raises(ValueError, match="unknown fallback reason"):
        Fallback("no_such_reason", "x", "y")
    assert set(REASONS) == {"subset_reused", "plan_compiled_apart", "flops_per_plan", "graph_uncached",
                            "owner_by_frame_walk"}


# Fallbacks a preset is expected to take on these tiny models: none. (A method that never runs a
# parallel block on k tokens reuses it whole by design: that is no fallback.)
EXPECTED_FALLBACKS: dict[tuple[str, str, str], dict] = {}
PRESET_MODELS = {"dit": "dit-xl-2", "pixart": "pixart-alpha", "flux": "flux-dev"}


@pytest.mark.parametrize("family", list(PRESET_MODELS))
def test_no_preset_takes_a_fallback_on_tiny_dit_pixart_flux(family):
    name = PRESET_MODELS[family]
    steps = 12
    for method in presets()[name]:
        torch.compiler.reset()
        config = presets(name, method)
        if method == "clusca":                               # the tiny Flux has 5 text tokens
            config = dataclasses.replace(config, clusters=4)
        model, fast = compile_tiny(family, config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                   # a fallback warning fails the test
            with duca_compile.sampling(fast, num_steps=steps):
                for i, t in enumerate(timesteps(steps)):
                    fast(**make_inputs(family, model, timestep=t, seed=i))
            s = duca_compile.stats(fast)                      # FLOPs too: symbolic k counted once
        assert s["fallbacks"] == EXPECTED_FALLBACKS.get((family, name, method), {}), (name, method)
        assert s["cache_hits"] > 0 and s["flop_ratio"] < 1, (name, method)
