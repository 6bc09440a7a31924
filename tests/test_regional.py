"""Regional compilation (``compile_repeated_blocks`` / ``torch.compile`` per block): every block
graph caches, each block under its own name with caches of its own, under the step plan a
whole-model graph gets. Checked against the eager oracle on an uncompiled twin, against whole-model
duca, and for recompiles, cache hits in every block and compiles per block graph."""
import dataclasses
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st_

import duca_compile
from duca_compile import (ClusCaConfig, DuCaConfig, FORAConfig, TaylorSeerConfig, ToCaConfig, duca_backend,
                          presets)
from duca_compile.reference import ReferenceCache
from duca_compile.regional import BlockRunner
from duca_compile.report import count_ops
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs, make_model

from helpers import REPEATED, compile_regional, compile_tiny, timesteps

FAMILIES = ["dit", "pixart", "flux", "wan", "qwen-image"]


def run_request(family, twin, model, steps, oracle=None, input_seed=0, atol=1e-5):
    """One request through the regionally compiled model; every call checked against the oracle."""
    modes = []
    with duca_compile.sampling(model, num_steps=steps):
        for i, t in enumerate(timesteps(steps)):
            kw = make_inputs(family, model, timestep=t, seed=input_seed + i)
            out = model(**kw)[0]
            st = state_of(model)
            oracle = oracle or ReferenceCache.from_compiled(twin, model)
            ref = oracle.replay(model, **kw)[0]
            torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4,
                                       msg=lambda m: f"step {i} ({st.last_plan.mode.value}): {m}")
            modes.append(st.last_plan.mode.value)
    return modes, oracle


def _runners(model):
    return list(dict.fromkeys(r for r, _ in state_of(model).graphs()))


@pytest.mark.parametrize("family", FAMILIES)
def test_regional_duca_matches_the_oracle_with_hits_in_every_block_and_no_recompile(family):
    twin, model = compile_regional(family, DuCaConfig())
    modes, oracle = run_request(family, twin, model, 7)
    assert {"full", "subset", "skip"} <= set(modes)
    st = state_of(model)
    blocks = {s.rsplit(".", 1)[0] for s in oracle.sites}
    assert st.regional is not None and {b.name for b in st.regional.blocks} == blocks
    assert set(st.stats.block_hits) == blocks and all(n > 0 for n in st.stats.block_hits.values())
    compiles = {id(r): r.compiles for r in _runners(model)}
    with torch.compiler.set_stance("fail_on_recompile"):       # a second request: nothing new compiles
        run_request(family, twin, model, 7, oracle, input_seed=50)
    assert {id(r): r.compiles for r in _runners(model)} == compiles
    # one variant per block class and pattern (FULL, SUBSET, SKIP): a later graph of a class (Dynamo
    # compiles the first block apart, for its input strides) runs the first one's variants
    leaders = [r for r in _runners(model) if r.leader is None]
    assert len(leaders) == len({type(b).__name__ for b in model.modules() if b.__dict__.get("_compiled_call_impl")})
    assert all(r.compiles == len(r.variants) == 3 for r in leaders)
    assert all(r.compiles == 0 and r.variants is r.leader.variants for r in _runners(model) if r.leader is not None)
    assert st.stats.calls == 14 and st.stats.requests == 2


METHODS = [DuCaConfig(), ToCaConfig(), FORAConfig(interval=3), TaylorSeerConfig(), ClusCaConfig(clusters=4),
           DuCaConfig(compute_first=1), ToCaConfig(selection="kv-norm"),
           TaylorSeerConfig(interval=5, first_enhance=1, forecast="foca")]


@given(family=st_.sampled_from(["dit", "flux", "qwen-image"]), method=st_.sampled_from(METHODS),
       steps=st_.integers(3, 9), seed=st_.integers(0, 3))
def test_regional_methods_match_the_oracle(family, method, steps, seed):
    torch._dynamo.reset()
    twin, model = compile_regional(family, dataclasses.replace(method, seed=seed))
    modes, _ = run_request(family, twin, model, steps, input_seed=seed)
    assert modes[0] == "full"
    if steps > 3:
        assert state_of(model).stats.cache_hits > 0


# step 1 of 7 is full in block 0 only, aggressive in the others (see test_methods.PER_LAYER)
PER_LAYER = DuCaConfig(interval=2, ratio=0.0, count_down=True, interval_weight=0.8, forced_interval=((0.2, 0.4, 2),),
                       step_types="per-layer")


@pytest.mark.parametrize("config, steps", [(FORAConfig(interval=3), 8), (DuCaConfig(ratio=0.0), 8),
                                           (TaylorSeerConfig(), 8), (PER_LAYER, 7),
                                           (TaylorSeerConfig(interval=3, first_enhance=1, forecast="foca"), 9)],
                         ids=["fora", "duca-no-subset", "taylorseer", "duca-per-layer", "foca"])
def test_regional_equals_whole_model_duca(config, steps):
    """Where no random token is drawn, block by block and whole-model give the same outputs and stats."""
    family = "flux"
    twin, regional = compile_regional(family, config)
    model, whole = compile_tiny(family, config)
    model.load_state_dict(twin.state_dict())
    with duca_compile.sampling(regional, num_steps=steps), duca_compile.sampling(whole, num_steps=steps):
        for i, t in enumerate(timesteps(steps)):
            kw = make_inputs(family, twin, timestep=t, seed=i)
            torch.testing.assert_close(regional(**kw)[0], whole(**kw)[0], atol=1e-5, rtol=1e-5)
    a, b = duca_compile.stats(regional), duca_compile.stats(whole)
    for key in ("calls", "steps", "tokens_computed", "tokens_total", "cache_hits", "block_hits", "tokens_per_site"):
        assert a[key] == b[key], key
    assert a["steps"]["skip"] > 0 or not isinstance(config, DuCaConfig)


def test_skip_in_a_block_graph_returns_a_copy_of_the_cache_with_the_computed_layout():
    twin, model = compile_regional("flux", DuCaConfig())
    run_request("flux", twin, model, 3)
    for runner in _runners(model):
        skip = next(g for k, g in runner.variant_graphs.items() if k[0])
        ops = count_ops(skip)
        assert ops["linear"] == ops["sdpa"] == 0 and ops["cache_write"] == 0
        placeholders = {n for n in skip.graph.nodes if n.op == "placeholder"}
        outputs = [a for a in skip.graph.output_node().args[0] if a is not None]
        assert not any(o in placeholders for o in outputs)      # never the cache tensor itself
    assert "SKIP in regional mode" in duca_compile.explain(model)


def test_explain_and_stats_name_every_block():
    twin, model = compile_regional("dit", DuCaConfig(), layers=3)
    run_request("dit", twin, model, 4)
    graph = duca_compile.explain(model, as_text=False)[0]
    assert graph["regional"] and graph["blocks"] == [f"transformer_blocks.{i}" for i in range(3)]
    assert [s["name"] for s in graph["sites"]] == [f"transformer_blocks.{i}.{c}" for i in range(3)
                                                   for c in ("attn1", "ff")]
    assert [p["mode"] for p in duca_compile.explain(model, as_text=False, num_steps=4)[0]["plan"]][:3] == \
        ["full", "subset", "skip"]
    s = duca_compile.stats(model)
    assert set(s["tokens_per_site"]) == {x["name"] for x in graph["sites"]}
    assert 0 < s["flop_ratio"] < 1 and s["cache_bytes"] > 0
    assert all(isinstance(r, BlockRunner) for r in _runners(model))


def test_a_batch_change_restarts_the_request_once_for_every_block():
    twin, model = compile_regional("dit", FORAConfig(interval=5))
    with duca_compile.sampling(model, num_steps=4):
        for i, batch in enumerate([2, 2, 4, 4]):
            model(**make_inputs("dit", model, batch=batch, timestep=timesteps(4)[i], seed=i))
            if i == 2:
                assert state_of(model).last_plan.mode.value == "full"
    st = state_of(model)
    assert st.stats.shape_resets == 1 and st.last_plan.mode.value == "reuse"


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_timestep_tracking_without_sampling_uses_the_model_call(family):
    """Flux blocks never see the timestep: the model's forward pre-hook hands it over. The first
    call, which runs before the hook exists, takes it from the call's arguments: PixArt's forward
    has rebound ``timestep`` to its embedding by then (read as a step, it started a second request)."""
    twin, model = compile_regional(family, FORAConfig(interval=2))
    for i, t in enumerate(timesteps(4)):
        model(**make_inputs(family, model, timestep=t, seed=i))
    st = state_of(model)
    assert st.stats.calls == 4 and dict(st.stats.steps)["reuse"] == 2 and st.stats.fallback_calls == 0
    assert st.stats.requests == 1


def test_grad_mode_runs_blocks_plainly_and_restarts_caching():
    twin, model = compile_regional("dit", FORAConfig(interval=2))
    kw = make_inputs("dit", model, timestep=900.0)
    with torch.enable_grad(), pytest.warns(UserWarning, match="grad mode"):
        model(**kw)
    assert state_of(model).stats.uncached_calls >= 1


@pytest.mark.parametrize("method", ["duca", "toca"])
def test_a_50_step_preset_compiles_one_variant_per_block_graph_and_pattern(method):
    config = presets("dit-xl-2", method)
    twin, model = compile_regional("dit", config, layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with duca_compile.sampling(model, num_steps=50):
            for i, t in enumerate(timesteps(50, 999.0, 1.0)):
                model(**make_inputs("dit", model, timestep=t, seed=i))
    (leader,) = [r for r in _runners(model) if r.leader is None]     # one block class
    assert leader.compiles == len(leader.variants) <= 4      # FULL, REUSE, SUBSET (any k), SKIP at most
    assert sum(r.compiles for r in _runners(model)) == leader.compiles
    assert len(state_of(model).regional.blocks) == 3


@pytest.mark.inductor
def test_inductor_regional_variants_equal_the_oracle():
    """True Inductor compiles of one block graph (Wan: both blocks share it), every mode."""
    from duca_compile import ScriptedConfig

    twin, model = compile_regional("wan", ScriptedConfig(modes=("full", "subset", "skip", "reuse"), ratio=0.5),
                                   inner="inductor")
    modes, _ = run_request("wan", twin, model, 5, atol=1e-4)
    assert modes == ["full", "subset", "skip", "reuse", "full"]
    (runner,) = _runners(model)
    assert runner.compiles == 4 and duca_compile.stats(model, flops=False)["variants_compiled"] == 4
    # SKIP only copies its cache out: it runs as the FX graph, with no Inductor compile of its own
    skip, full = runner.variants[(True, ())][0], runner.by_plan[next(k for k in runner.by_plan if not k[0])]
    assert isinstance(getattr(skip, "__self__", None), torch.fx.GraphModule)
    assert not isinstance(getattr(full, "__self__", None), torch.fx.GraphModule)


def test_a_graph_break_at_the_top_of_each_block_caches_the_resumed_block(monkeypatch):
    """Whole-model compile, but a ``print`` in every block's forward: Dynamo compiles the rest of
    each block as a frame of its own, which is cached block by block."""
    import diffusers.models.attention as attention

    original = attention.BasicTransformerBlock.forward

    def forward(self, hidden_states, *args, **kwargs):
        print("block", end="\r")                       # a graph break before the block's branches
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(attention.BasicTransformerBlock, "forward", forward)
    from duca_compile import ScriptedConfig

    model = make_model("dit")
    fast = torch.compile(model, backend=duca_backend(ScriptedConfig(modes=("full", "subset", "skip", "reuse"),
                                                                    ratio=0.5), inner="eager"), dynamic=False)
    oracle = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # the pieces around the blocks run plainly
        for i, t in enumerate(timesteps(4)):
            kw = make_inputs("dit", model, timestep=t, seed=i)
            out = fast(**kw)[0]
            oracle = oracle or ReferenceCache.from_compiled(model, fast)
            torch.testing.assert_close(out, oracle.replay(fast, **kw)[0], atol=1e-5, rtol=1e-4)
    s = duca_compile.stats(fast, flops=False)
    assert {m: s["steps"][m] for m in ("full", "subset", "skip", "reuse")} == dict.fromkeys(
        ("full", "subset", "skip", "reuse"), 1)
    assert set(s["block_hits"]) == {"transformer_blocks.0", "transformer_blocks.1"}


@pytest.mark.smoke
def test_two_models_behind_one_block_backend_keep_their_own_caches():
    """Two instances of one class, blocks compiled by one backend object (so Dynamo serves both
    through the same block graphs), called in turns: each gives what it gives alone."""
    backend = duca_backend(DuCaConfig(), inner="eager")

    def compiled(seed):
        model = make_model("dit", seed=seed)
        model._repeated_blocks = REPEATED["dit"]
        model.compile_repeated_blocks(backend=backend, dynamic=False, fullgraph=True)
        return model

    def request(models, steps=6):
        outs = {id(m): [] for m in models}
        contexts = [duca_compile.sampling(m, num_steps=steps) for m in models]
        for c in contexts:
            c.__enter__()
        try:
            for i, t in enumerate(timesteps(steps)):
                for m in models:
                    outs[id(m)].append(m(**make_inputs("dit", m, timestep=t, seed=i))[0])
        finally:
            for c in contexts:
                c.__exit__(None, None, None)
        return [outs[id(m)] for m in models]

    a, b = compiled(0), compiled(1)
    together = request([a, b])
    assert state_of(a) is not state_of(b) and state_of(a).stats.calls == state_of(b).stats.calls == 6
    assert len(_runners(a)) == 2 and set(_runners(a)) == set(_runners(b))      # the same graphs serve both
    torch._dynamo.reset()
    alone = [request([compiled(0)])[0], request([compiled(1)])[0]]
    for got, want in zip(together, alone):
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
