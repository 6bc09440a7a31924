"""Costs that show on a GPU, checked on the CPU: host syncs per request, cache-sized allocations
while compiling, compiles in the middle of a request (``precompile``), where caches live."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import duca_compile
from duca_compile import DuCaConfig, FORAConfig, ScriptedConfig, TaylorSeerConfig, presets
from duca_compile.models import make_inputs, make_pipeline, pipeline_call_kwargs
from duca_compile.runtime import TimestepReader, state_of, timestep_value
from duca_compile.settings import InnerCompiler, TensorSpec

from helpers import compile_regional, compile_tiny, run_against_oracle, timesteps


@pytest.fixture
def as_device(monkeypatch):
    """CPU tensors read as a GPU's would be: each read counts as a host sync."""
    monkeypatch.setattr(TimestepReader, "free", ())


def _request(fast, model, ts, batch=2, make=lambda t, b: torch.full((b,), t)):
    for i, t in enumerate(ts):
        fast(**dict(make_inputs("dit", model, batch=batch, seed=i), timestep=make(t, batch)))


# -- host syncs -----------------------------------------------------------------------------------

def test_own_loop_over_views_of_the_scheduler_timesteps_syncs_once_per_request(as_device):
    model, fast = compile_tiny("dit", FORAConfig(interval=3))
    for _ in range(2):
        schedule = torch.tensor(timesteps(6))           # what set_timesteps makes, once per request
        with warnings.catch_warnings():
            warnings.simplefilter("error")              # and no host-sync warning
            _request(fast, model, schedule, make=lambda t, b: t.expand(b))
    s = duca_compile.stats(fast, flops=False)
    assert s["host_syncs"] == 2 and s["requests"] == 2 and s["cache_hits"] > 0
    assert s["steps"]["full"] == 4 and s["steps"]["reuse"] == 8


def test_new_timestep_tensors_sync_every_call_and_warn_once(as_device):
    model, fast = compile_tiny("dit", FORAConfig(interval=3))
    with pytest.warns(UserWarning, match="host sync per call") as record:
        _request(fast, model, timesteps(6))
        _request(fast, model, timesteps(6))
    assert sum("host sync" in str(w.message) for w in record) == 1
    s = duca_compile.stats(fast, flops=False)
    assert s["host_syncs"] == 12 and s["requests"] == 2 and s["steps"]["reuse"] == 8


@pytest.mark.smoke
def test_a_written_base_is_read_again(as_device):
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    schedule = torch.tensor(timesteps(4))
    _request(fast, model, schedule[:2], make=lambda t, b: t.expand(b))
    schedule.copy_(torch.tensor(timesteps(4, 800.0, 50.0)))     # in place: same tensor, other values
    _request(fast, model, schedule, make=lambda t, b: t.expand(b))
    st_ = state_of(fast)
    assert st_.stats.host_syncs == 2 and st_.tracker.seen == timesteps(4, 800.0, 50.0)


@pytest.mark.parametrize("config", [DuCaConfig(), TaylorSeerConfig(interval=3), presets("dit-xl-2", "clusca")],
                         ids=["duca", "taylorseer", "clusca"])
def test_sampling_reads_nothing_from_the_device(as_device, scalar_reads, config):
    """Inside sampling(), a request (token selection, Taylor tables, k-means included) never reads
    a tensor's value on the host: nothing makes the CPU wait for the GPU."""
    model, fast = compile_tiny("dit", config)
    with duca_compile.sampling(fast, num_steps=8):
        _request(fast, model, timesteps(8))                     # compiles every variant once
    del scalar_reads[:]
    with duca_compile.sampling(fast, num_steps=8), torch.compiler.set_stance("fail_on_recompile"):
        _request(fast, model, timesteps(8))
    s = duca_compile.stats(fast, flops=False)
    assert scalar_reads == [] and s["host_syncs"] == 0 and s["cache_hits"] > 0
    assert set(s["steps"]) >= {"full"} and s["steps"]["full"] < 16


@given(shape=st.sampled_from([(6,), (3, 4), (8, 2)]), picks=st.lists(st.integers(0, 47), min_size=1, max_size=8),
       expand=st.integers(1, 3), write_at=st.integers(-1, 7))
def test_reader_values_equal_direct_reads(shape, picks, expand, write_at):
    """Whatever view of a timesteps tensor a call gets, and whatever is written into it in between,
    the reader gives the value a direct read would, and reads the device only for a new base."""
    reader = TimestepReader()
    reader.free = ()
    base = torch.randn(shape) * 100
    syncs = 0
    for i, pick in enumerate(picks):
        if i == write_at:
            base.mul_(0.5)
            syncs += i > 0                     # read again once it was read before
        flat = base.view(-1) if len(shape) == 1 else base[pick % shape[0]]
        t = flat[pick % flat.shape[0]].expand(expand) if pick % 3 else flat
        syncs += i == 0
        assert reader(t) == timestep_value(t)
    assert reader.syncs == syncs
    assert reader(base.clone()) == timestep_value(base) and reader.syncs == syncs + 1   # no view: read


@pytest.mark.smoke
def test_inference_tensors_are_read_each_call():
    reader = TimestepReader()
    reader.free = ()
    with torch.inference_mode():
        base = torch.tensor([3.0, 2.0])
        assert [reader(t.expand(2)) for t in base] == [3.0, 2.0]
    assert reader.syncs == 2


# -- compiling allocates no caches ----------------------------------------------------------------

@pytest.mark.smoke
def test_variants_compile_from_cache_metadata_not_allocated_tensors(monkeypatch):
    seen = []
    generic = InnerCompiler.compile_generic

    def spy(self, gm, example_inputs, token_inputs):
        seen.append(list(example_inputs))
        return generic(self, gm, example_inputs, token_inputs)

    monkeypatch.setattr(InnerCompiler, "compile_generic", spy)
    config = ScriptedConfig(modes=("full", "reuse", "subset", "skip"), ratio=0.5)
    model, fast = compile_tiny("dit", config, inner="aot_eager")
    with duca_compile.sampling(fast, num_steps=4):
        modes = run_against_oracle("dit", model, fast, timesteps(4))
    assert modes == ["full", "reuse", "subset", "skip"]
    layout = next(r for r, _ in state_of(fast).graphs()).layout
    caches = {(tuple(c.shape), c.dtype) for c in layout.caches}
    assert len(seen) == 4
    for inputs in seen:
        specs = [x for x in inputs if isinstance(x, TensorSpec)]
        assert len(specs) == len(layout.caches)
        assert not any(isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
                       and (tuple(x.shape), x.dtype) in caches and x.numel() > 64 for x in inputs[-len(specs) - 4:])


# -- caches: where they live, what they weigh -----------------------------------------------------

@pytest.mark.parametrize("config", [FORAConfig(interval=2), TaylorSeerConfig(interval=3, max_order=2),
                                    DuCaConfig(selection="kv-norm")], ids=["fora", "taylorseer", "duca-v1"])
def test_caches_live_on_the_blocks_device_and_dtype(config):
    model, fast = compile_tiny("dit", config)
    model.to(torch.bfloat16)
    kw = lambda t: {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
                    for k, v in make_inputs("dit", model, timestep=t).items()}
    with duca_compile.sampling(fast, num_steps=4):
        for t in timesteps(4):
            fast(**kw(t))
    param = next(model.transformer_blocks.parameters())
    total = 0
    for runner, piece in state_of(fast).graphs():
        for slot in piece.slots.values():
            for key, cache in slot.by_key.items():
                assert cache.device == param.device
                # value norms are scores, kept in fp32 whatever the model's dtype
                assert cache.dtype == (torch.float32 if key.startswith("vnorm:") else torch.bfloat16), key
                total += cache.numel() * cache.element_size()
    s = duca_compile.stats(fast, flops=False)
    assert s["cache_bytes"] == total > 0 and s["cache_hits"] > 0


# -- precompile -----------------------------------------------------------------------------------

def _variants(fast) -> int:
    return duca_compile.stats(fast, flops=False)["variants_compiled"]


@pytest.mark.parametrize("family,method,regional", [("dit", "duca", False), ("dit", "taylorseer", False),
                                                     ("flux", "clusca", False), ("dit", "toca", True),
                                                     ("pixart", "duca", False)])
def test_precompile_compiles_every_variant_the_schedule_uses(family, method, regional):
    registry = {"dit": "dit-xl-2", "pixart": "pixart-alpha", "flux": "flux-dev"}[family]
    config = presets(registry, method)
    if method == "clusca":
        config = dataclasses.replace(config, clusters=4)      # tiny Flux has few tokens
    n = 12

    def request(fast, model):
        outs = []
        with duca_compile.sampling(fast, num_steps=n):
            for i, t in enumerate(timesteps(n)):
                outs.append(fast(**make_inputs(family, model, timestep=t, seed=i))[0])
        return outs

    model, fast = (compile_regional if regional else compile_tiny)(family, config)
    report = duca_compile.precompile(fast, num_steps=n, **make_inputs(family, model, timestep=1.0))
    s = duca_compile.stats(fast, flops=False)
    assert report["variants"] == s["variants_compiled"] > 1 and report["steps"][0] == 0
    assert report["calls"] == len(report["steps"]) < n
    assert s["calls"] == 0 and s["requests"] == 0 and s["precompile_seconds"] == report["seconds"] > 0
    with torch.compiler.set_stance("fail_on_recompile"):
        warm = request(fast, model)
    assert _variants(fast) == report["variants"]               # nothing compiled during the request
    assert duca_compile.stats(fast, flops=False)["cache_hits"] > 0
    torch._dynamo.reset()                                       # the same request, never precompiled
    cold_model, cold = (compile_regional if regional else compile_tiny)(family, config)
    assert all(torch.equal(a, b) for a, b in zip(warm, request(cold, cold_model)))
    assert _variants(cold) == report["variants"]


@pytest.mark.smoke
def test_precompile_a_pipeline_runs_it_once():
    pytest.importorskip("transformers")
    pipe = make_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    duca_compile.enable(pipe, "pixart-alpha:duca", inner="eager")
    kwargs = pipeline_call_kwargs("pixart", pipe, num_inference_steps=10)
    report = duca_compile.precompile(pipe, **kwargs)
    assert report["calls"] == 10 and report["variants"] > 1 and report["steps"] is None
    with torch.compiler.set_stance("fail_on_recompile"):
        pipe(**kwargs)
    s = duca_compile.stats(pipe.transformer, flops=False)
    assert s["variants_compiled"] == report["variants"] and s["requests"] == 1 and s["cache_hits"] > 0


def test_precompile_says_what_is_wrong():
    model, fast = compile_tiny("dit", FORAConfig(interval=2))
    with pytest.raises(ValueError, match="num_steps must be an int"):
        duca_compile.precompile(fast, **make_inputs("dit", model, timestep=1.0))
    plain = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="not compiled with the duca backend"):
        duca_compile.precompile(plain, num_steps=4, **make_inputs("dit", model, timestep=1.0))
