"""Adaptive caching (AdaptiveConfig): compiled HEAD / COMPUTE / REUSE graphs against the eager
oracle, the same decisions as diffusers' FirstBlockCache, one host read per step, no recompiles."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import assume, given, strategies as st

import duca_compile
from duca_compile import AdaptiveConfig, sampling
from duca_compile.adaptive import decisions
from duca_compile.models import make_inputs
from duca_compile.reference import AdaptiveReference
from duca_compile.report import count_ops
from duca_compile.runtime import state_of

from helpers import compile_regional, compile_tiny, timesteps

BLOCKS = {"dit": ["transformer_blocks.0", "transformer_blocks.1"],
          "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
          "flux": ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]}


def denoise(call, family, model, steps, seed=0, batch=2):
    """A toy sampler: ``x ← x − 0.05 · model(x, t)``, so each step's input depends on the last
    output (cached steps change the trajectory, as in a real request). Returns the outputs."""
    kw = make_inputs(family, model, batch=batch, seed=seed)
    x, outs = kw.pop("hidden_states"), []
    kw.pop("timestep")
    for i, t in enumerate(timesteps(steps)):
        ts = torch.full((batch,), t)
        out = call(i, **kw, hidden_states=x, timestep=ts)[0]
        outs.append(out)
        x = x - 0.05 * out[:, :x.shape[1]]
    return outs


def marks(flags) -> str:
    return "".join("C" if f else "." for f in flags)


def near_threshold(diffs, threshold, margin=1e-4) -> bool:
    """A diff this close to the threshold could fall either way under another kernel's rounding."""
    return any(d is not None and abs(d - threshold) <= margin * max(threshold, 1e-3) for d in diffs)


# -- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("head_blocks", 0), ("tail_blocks", -1), ("threshold", -0.1),
                                         ("threshold", float("nan")), ("warmup", 1.5), ("max_cached_steps", -1),
                                         ("max_consecutive_cached", 0), ("max_accumulated_diff", "x"),
                                         ("max_accumulated_diff", 0.0), ("warmup_interval", 0),
                                         ("forecast", "dmd"), ("hermite_scale", 0.0), ("forecast_order", 3), ("target", 0.0), ("target", 1.5),
                                         ("compute_first", 2)])
def test_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaptiveConfig(**{field: value})


# -- against the oracle -----------------------------------------------------------------------------

@given(family=st.sampled_from(["dit", "pixart", "flux"]), head=st.integers(1, 2), tail=st.integers(0, 1),
       threshold=st.floats(0.0, 0.5), warmup=st.integers(0, 3), interval=st.integers(1, 2),
       max_cached=st.none() | st.integers(0, 4), consecutive=st.none() | st.integers(1, 3),
       accumulated=st.none() | st.floats(0.05, 2.0), forecast=st.sampled_from(["reuse", "taylorseer", "hermite", "foca"]),
       order=st.integers(1, 2), batch=st.sampled_from([1, 2]))
def test_compiled_adaptive_equals_the_oracle(family, head, tail, threshold, warmup, interval, max_cached, consecutive,
                                             accumulated, forecast, order, batch):
    blocks = BLOCKS[family]
    assume(head + tail < len(blocks))
    torch._dynamo.reset()
    config = AdaptiveConfig(head_blocks=head, tail_blocks=tail, threshold=threshold, warmup=warmup,
                            warmup_interval=interval, max_cached_steps=max_cached, max_consecutive_cached=consecutive,
                            max_accumulated_diff=accumulated, forecast=forecast, forecast_order=order)
    model, fast = compile_tiny(family, config)
    oracle = AdaptiveReference(copy.deepcopy(model), config, blocks)
    got = denoise(lambda i, **kw: fast(**kw), family, model, 8, batch=batch)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, **kw), family, model, 8, batch=batch)
    made = decisions(fast)
    assume(not near_threshold([d["diff"] for d in made], threshold))
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {i}: {m}")
    s = duca_compile.stats(fast, flops=False)
    cached = sum(not d["computed"] for d in made)
    assert s["steps"]["skip"] == cached and s["steps"]["full"] == 8 - cached
    assert (s["cache_hits"] > 0) == (cached > 0)


@pytest.mark.smoke
def test_caches_hit_and_flops_drop():
    """At a threshold above every diff, every step after the first is cached: the middle block's
    work is gone from the FLOPs, and the REUSE graph runs no attention of the middle blocks."""
    model, fast = compile_tiny("dit", AdaptiveConfig(threshold=10.0))
    denoise(lambda i, **kw: fast(**kw), "dit", model, 6)
    assert marks(d["computed"] for d in decisions(fast)) == "C....."
    s = duca_compile.stats(fast)
    assert s["steps"] == {**s["steps"], "full": 1, "skip": 5} and s["cache_hits"] >= 5
    text = duca_compile.explain(fast)
    assert "adaptive: head ['transformer_blocks.0']" in text and "last request: C....." in text
    assert 0.5 < s["flop_ratio"] < 0.75          # 1 of 2 blocks after step 0, plus the prefix
    graphs = state_of(fast).pieces
    runner = next(iter(graphs))
    ops = {name: count_ops(g) for name, g in runner.variant_graphs.items()}
    assert ops["HEAD"]["sdpa"] == 1 and ops["COMPUTE"]["sdpa"] == 1 and ops["REUSE"]["sdpa"] == 0
    assert ops["REUSE"]["cache_write"] == 0 and ops["COMPUTE"]["cache_write"] == 1


def test_a_threshold_of_zero_computes_every_step_and_equals_the_plain_model():
    model, fast = compile_tiny("flux", AdaptiveConfig(threshold=0.0))
    plain = copy.deepcopy(model)
    got = denoise(lambda i, **kw: fast(**kw), "flux", model, 5)
    want = denoise(lambda i, **kw: plain(**kw), "flux", model, 5)
    assert all(d["computed"] for d in decisions(fast))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@given(family=st.sampled_from(["dit", "flux"]), target=st.floats(0.15, 1.0), steps=st.sampled_from([10, 20, 30]),
       warmup=st.integers(0, 2), seed=st.integers(0, 3))
def test_a_compute_target_is_met_within_one_step_and_decided_by_the_data(family, target, steps, warmup, seed):
    """``target`` replaces the threshold: the realised fraction of computed steps is the target
    (rounded to whole steps; warm-up steps count towards it) on either model, and the oracle,
    deciding from its own diffs, computes the same steps."""
    torch._dynamo.reset()
    config = AdaptiveConfig(target=target, warmup=warmup)
    model, fast = compile_tiny(family, config)
    oracle = AdaptiveReference(copy.deepcopy(model), config, BLOCKS[family])
    with sampling(fast, num_steps=steps):
        got = denoise(lambda i, **kw: fast(**kw), family, model, steps, seed=seed)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, num_steps=steps, **kw), family, model, steps,
                   seed=seed)
    made = decisions(fast)
    assume(not any(a is not None and b is not None and abs(a - b) < 1e-5
                   for a in (d["diff"] for d in made) for b in (d["diff"] for d in made) if a is not b))
    computed = sum(d["computed"] for d in made)
    assert computed == max(round(target * steps), min(warmup, steps), 1), marks(d["computed"] for d in made)
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)
    torch.testing.assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-4)


def test_a_target_needs_the_request_length():
    model, fast = compile_tiny("dit", AdaptiveConfig(target=0.5))
    with pytest.raises(ValueError, match="number of denoising steps"):
        denoise(lambda i, **kw: fast(**kw), "dit", model, 3)


# -- the same decisions as diffusers' FirstBlockCache --------------------------------------------------

def _first_block_cache(model, threshold):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    head = model.get_submodule(BLOCKS_OF[type(model).__name__][0])
    state = HookRegistry.check_if_exists_or_initialize(head).get_hook("fbc_leader_block_hook").state_manager
    state.set_context(CacheContext(name="cond"))      # what a pipeline's ``cache_context("cond")`` sets
    flags = []

    def call(i, **kw):
        out = model(**kw)
        flags.append(state.get_state().should_compute)
        return out
    return call, flags


BLOCKS_OF = {"DiTTransformer2DModel": BLOCKS["dit"], "PixArtTransformer2DModel": BLOCKS["pixart"],
             "FluxTransformer2DModel": BLOCKS["flux"]}


@given(family=st.sampled_from(["dit", "pixart", "flux"]), threshold=st.floats(0.02, 0.4), seed=st.integers(0, 3))
def test_first_block_cache_computes_the_same_steps(family, threshold, seed):
    """diffusers' hook computes the rest of the stack iff mean|r − p| / mean|p| > threshold, ``p``
    the first block's residual at the last computed step; cached steps add the tail residual to
    the first block's output. Same steps, same outputs."""
    torch._dynamo.reset()
    model, fast = compile_tiny(family, AdaptiveConfig(threshold=threshold))
    peer = copy.deepcopy(model)
    assert_same_as_peer(family, model, fast, peer, *_first_block_cache(peer, threshold), threshold, seed)


def assert_same_as_peer(family, model, fast, peer, call, flags, threshold, seed):
    """10 steps of the toy sampler through duca and through the peer (``call``, its computed-step
    ``flags``): the same steps computed and the same outputs (a near-tie is assumed away)."""
    got = denoise(lambda i, **kw: fast(**kw), family, model, 10, seed=seed)
    want = denoise(call, family, peer, 10, seed=seed)
    made = decisions(fast)
    assume(not near_threshold([d["diff"] for d in made], threshold))
    assert marks(d["computed"] for d in made) == marks(flags)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_first_block_cache_comparison_sees_both_kinds_of_step():
    """The property above is only worth something where both decisions occur: at these settings
    the peer caches some steps and computes others."""
    model, _ = compile_tiny("dit", AdaptiveConfig(threshold=0.15))
    call, flags = _first_block_cache(copy.deepcopy(model), 0.15)
    denoise(call, "dit", model, 10)
    assert 0 < sum(flags[1:]) < 9, marks(flags)


# -- the same decisions as cache-dit's DBCache ------------------------------------------------------

def _dbcache(model, head, tail, threshold, warmup, order=None):
    """cache-dit on a bare transformer: its context persists across calls (refreshed here before
    the request); which steps it cached is read from the context after each call."""
    import cache_dit
    from cache_dit import DBCacheConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    config = DBCacheConfig(Fn_compute_blocks=head, Bn_compute_blocks=tail, residual_diff_threshold=threshold,
                           max_warmup_steps=warmup)
    calibrator = (FoCaCalibratorConfig() if order == "foca" else
                  TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None)
    cache_dit.enable_cache(model, cache_config=config, calibrator_config=calibrator)
    cache_dit.refresh_context(model, cache_config=config, calibrator_config=calibrator)
    flags = []

    def call(i, **kw):
        out = model(**kw)
        ctx = model._context_manager.get_context(model._context_names[0])
        flags.append(ctx.get_current_step() not in ctx.get_cached_steps())
        return out
    return call, flags


@pytest.mark.parametrize("head,tail,order", [(1, 0, None), (2, 1, None), (1, 0, 1), (1, 1, 2), (1, 0, "foca"),
                                             (2, 1, "foca")])
@given(threshold=st.floats(0.1, 0.5), seed=st.integers(0, 3))
def test_dbcache_computes_the_same_steps(head, tail, order, threshold, seed):
    """cache-dit's DBCache on Flux (double and single blocks as one list, as its adapter makes it):
    F{head}B{tail}, with and without its TaylorSeer or FoCa calibrator, against AdaptiveConfig with
    the same settings. cache-dit caches iff diff < threshold, diffusers computes iff diff > threshold:
    the same but at an exact tie, which the property steers clear of."""
    pytest.importorskip("cache_dit")
    torch._dynamo.reset()
    forecast = {None: "reuse", "foca": "foca"}.get(order, "taylorseer")
    config = AdaptiveConfig(head_blocks=head, tail_blocks=tail, threshold=threshold, warmup=2,
                            forecast=forecast, forecast_order=order if isinstance(order, int) else 1)
    model, fast = compile_tiny("flux", config, single_layers=3)      # 4 blocks: F2B1 leaves one to cache
    peer = copy.deepcopy(model)
    assert_same_as_peer("flux", model, fast, peer, *_dbcache(peer, head, tail, threshold, warmup=2, order=order),
                        threshold, seed)


def test_dbcache_comparison_sees_both_kinds_of_step():
    pytest.importorskip("cache_dit")
    model, _ = compile_tiny("flux", AdaptiveConfig())
    call, flags = _dbcache(copy.deepcopy(model), 1, 0, 0.35, warmup=2, order=1)
    denoise(call, "flux", model, 10)
    assert 0 < sum(flags[2:]) < 8, marks(flags)


def test_foca_forecast_moves_the_first_cached_step_off_plain_reuse():
    """The FoCa comparison above is only worth something if FoCa forecasts: up to the first cached
    step (after the two warm-up steps) FoCa and plain reuse agree; there they differ."""
    runs = {}
    for forecast in ("reuse", "foca"):
        torch._dynamo.reset()
        model, fast = compile_tiny("flux", AdaptiveConfig(threshold=0.35, warmup=2, forecast=forecast), single_layers=3)
        runs[forecast] = (denoise(lambda i, **kw: fast(**kw), "flux", model, 10), [d["computed"] for d in decisions(fast)])
    (reuse, flags), (foca, _) = runs["reuse"], runs["foca"]
    first = flags.index(False)
    assert first >= 2, marks(flags)
    assert all(torch.equal(a, b) for a, b in zip(reuse[:first], foca[:first]))
    assert not torch.allclose(reuse[first], foca[first])


# -- run time: host reads, recompiles, slots, resets ------------------------------------------------

@pytest.mark.smoke
def test_one_host_read_per_decided_step_and_no_recompile_over_three_requests(scalar_reads):
    """fullgraph=True holds (compile_tiny), Dynamo compiles once, and inside sampling() the only
    tensor value the host reads is the decision scalar: one per step the threshold decides, none
    at step 0, in warm-up, or where a limit decides."""
    config = AdaptiveConfig(threshold=0.15, warmup=2, max_consecutive_cached=1)
    model, fast = compile_tiny("dit", config)
    kw = make_inputs("dit", model, batch=2)
    fast(**kw)                                    # compiles
    duca_compile.reset(fast)
    per_request = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for r in range(3):
            before = len(scalar_reads)
            with sampling(fast, num_steps=8):
                denoise(lambda i, **k: fast(**k), "dit", model, 8, seed=r)
            made = decisions(fast)
            read = sum(d["diff"] is not None for d in made)
            assert len(scalar_reads) - before == read, (scalar_reads[before:], made)
            per_request.append(read)
            # not read: steps 0 and 1 (warm-up) and each step after a cached one (the limit)
            assert all(d["diff"] is None for d in made[:2])
            for a, b in zip(made, made[1:]):
                assert b["diff"] is None or a["computed"]
    s = duca_compile.stats(fast, flops=False)
    assert s["decision_reads"] == sum(per_request) and s["variants_compiled"] == 3
    assert s["steps"]["skip"] > 0


@pytest.mark.parametrize("regional", [False, True])
def test_separate_cfg_calls_decide_per_branch(regional):
    """Two calls per step (cond, then uncond) get two cache slots: each compares with its own
    last computed step, as cache-dit's separate-CFG does."""
    config = AdaptiveConfig(threshold=0.12)
    model, fast = compile_regional("dit", config) if regional else compile_tiny("dit", config)
    oracle = AdaptiveReference(copy.deepcopy(model), config, BLOCKS["dit"])
    kw = make_inputs("dit", model, batch=1)
    x = {0: kw["hidden_states"].clone(), 1: kw["hidden_states"].clone() * 0.5}
    xr = {k: v.clone() for k, v in x.items()}
    with sampling(fast, num_steps=6, calls_per_step=2):
        for i in range(6):
            for branch in (0, 1):
                args = dict(kw, timestep=torch.full((1,), timesteps(6)[i]))
                out = fast(**{**args, "hidden_states": x[branch]})[0]
                ref = oracle.run(i, slot=branch, new_request=i == 0 and branch == 0,
                                 **{**args, "hidden_states": xr[branch]})[0]
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
                x[branch], xr[branch] = x[branch] - 0.05 * out[:, :4], xr[branch] - 0.05 * ref[:, :4]
    made = decisions(fast)
    assert [d["slot"] for d in made] == [0, 1] * 6
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)


@pytest.mark.parametrize("regional", [False, True])
def test_a_batch_change_mid_request_starts_over(regional):
    config = AdaptiveConfig(threshold=10.0)
    model, fast = compile_regional("dit", config) if regional else compile_tiny("dit", config)
    denoise(lambda i, **kw: fast(**kw), "dit", model, 3, batch=2)
    kw = make_inputs("dit", model, batch=1)
    fast(**dict(kw, timestep=torch.full((1,), timesteps(3)[2] - 1)))
    assert decisions(fast)[-1]["computed"] and duca_compile.stats(fast, flops=False)["shape_resets"] == 1


# -- what cannot be cut -----------------------------------------------------------------------------

def test_no_block_left_to_cache_warns_and_runs_plainly():
    with pytest.warns(UserWarning, match="leave no block to cache"):
        model, fast = compile_tiny("dit", AdaptiveConfig(head_blocks=1, tail_blocks=1))
        out = fast(**make_inputs("dit", model))[0]
    torch.testing.assert_close(out, model(**make_inputs("dit", model))[0])
    assert "leave no block" in " ".join(duca_compile.stats(fast, flops=False)["uncached"])


# -- regional compilation ---------------------------------------------------------------------------

@given(family=st.sampled_from(["dit", "pixart", "flux"]), head=st.integers(1, 2), tail=st.integers(0, 1),
       threshold=st.floats(0.0, 0.6), warmup=st.integers(0, 2), consecutive=st.none() | st.integers(1, 3),
       accumulated=st.none() | st.floats(0.5, 3.0), forecast=st.sampled_from(["reuse", "taylorseer", "hermite", "foca"]),
       order=st.integers(1, 2))
def test_regional_adaptive_equals_the_oracle(family, head, tail, threshold, warmup, consecutive, accumulated,
                                             forecast, order):
    """``compile_repeated_blocks``: the decision is taken between the block graphs, after block
    Fn − 1; cached middle blocks do not run their graph. Same decisions and outputs as the oracle."""
    blocks = BLOCKS[family]
    assume(head + tail < len(blocks))
    torch._dynamo.reset()
    config = AdaptiveConfig(head_blocks=head, tail_blocks=tail, threshold=threshold, warmup=warmup,
                            max_consecutive_cached=consecutive, max_accumulated_diff=accumulated, forecast=forecast,
                            forecast_order=order)
    twin, model = compile_regional(family, config)
    oracle = AdaptiveReference(copy.deepcopy(twin), config, blocks)
    got = denoise(lambda i, **kw: model(**kw), family, twin, 8)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, **kw), family, twin, 8)
    made = decisions(model)
    assume(not near_threshold([d["diff"] for d in made], threshold))
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {i}: {m}")
    cached = sum(not d["computed"] for d in made)
    s = duca_compile.stats(model)
    assert s["steps"]["skip"] == cached and s["steps"]["full"] == 8 - cached
    middle = blocks[head:len(blocks) - tail]
    ran = {b.name: b.piece.variant_calls["FULL"] for b in state_of(model).regional.views}
    assert all(ran[b] == 8 - cached for b in middle) and all(ran[b] == 8 for b in blocks if b not in middle)
    assert (s["cache_hits"] > 0) == (cached > 0) and (s["flop_ratio"] < 1) == (cached > 0)


def test_regional_equals_whole_model_adaptive():
    config = AdaptiveConfig(threshold=0.45, tail_blocks=1, forecast="taylorseer")
    model, whole = compile_tiny("flux", config)
    twin, regional = compile_regional("flux", config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    a = denoise(lambda i, **kw: whole(**kw), "flux", model, 8)
    b = denoise(lambda i, **kw: regional(**kw), "flux", twin, 8)
    assert [d["computed"] for d in decisions(whole)] == [d["computed"] for d in decisions(regional)]
    assert 0 < sum(d["computed"] for d in decisions(regional)) < 8
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.smoke
def test_regional_one_host_read_per_decided_step_and_no_recompile(scalar_reads):
    """F1B0 on Flux: the middle block hands the double block's (strided) streams on unchanged, in
    the strides its graph returns, so the next block graph's guards hold: no recompile over three
    requests, and inside sampling() one host read per step the threshold decides."""
    twin, model = compile_regional("flux", AdaptiveConfig(threshold=0.45))
    denoise(lambda i, **kw: model(**kw), "flux", twin, 1)      # compiles every block graph
    duca_compile.reset(model)
    with torch.compiler.set_stance("fail_on_recompile"):
        for r in range(3):
            before = len(scalar_reads)
            with sampling(model, num_steps=8):
                denoise(lambda i, **kw: model(**kw), "flux", twin, 8, seed=r)
            made = decisions(model)
            assert len(scalar_reads) - before == sum(d["diff"] is not None for d in made) == 7
    s = duca_compile.stats(model, flops=False)
    assert s["decision_reads"] == 21 and s["steps"]["skip"] > 0
    passed = {b.name: b.piece.variant_calls["PASS"] for b in state_of(model).regional.views}
    assert passed["single_transformer_blocks.0"] > 0


def test_regional_no_block_left_to_cache_warns_and_runs_plainly():
    twin, model = compile_regional("dit", AdaptiveConfig(head_blocks=1, tail_blocks=1, threshold=10.0))
    with pytest.warns(UserWarning, match="leave no block to cache"):
        got = denoise(lambda i, **kw: model(**kw), "dit", twin, 3)
    want = denoise(lambda i, **kw: twin(**kw), "dit", twin, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    s = duca_compile.stats(model, flops=False)
    assert s["steps"]["full"] == 3 and "leave no block" in " ".join(s["uncached"])


# -- Inductor, end to end ---------------------------------------------------------------------------

@pytest.mark.inductor
@pytest.mark.parametrize("tail,forecast", [(1, "taylorseer"), (0, "taylorseer"), (0, "foca")])
def test_inductor_adaptive_equals_the_oracle(tail, forecast):
    """With no tail block the forecast terms are written next to the output norm's loops: written in
    the caches' own shape, Inductor's CPU outer-loop fusion failed there (KeyError, torch 2.13)."""
    config = AdaptiveConfig(threshold=0.45, tail_blocks=tail, forecast=forecast)
    model, fast = compile_tiny("flux", config, inner="inductor", single_layers=3)
    oracle = AdaptiveReference(copy.deepcopy(model), config, [*BLOCKS["flux"], "single_transformer_blocks.2"])
    got = denoise(lambda i, **kw: fast(**kw), "flux", model, 8)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, **kw), "flux", model, 8)
    made = decisions(fast)
    assume_free = not near_threshold([d["diff"] for d in made], config.threshold, margin=1e-3)
    assert assume_free, made
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)
    assert not all(d["computed"] for d in made), "no step was cached: the test checks nothing"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)   # Inductor reorders float sums


# -- presets ----------------------------------------------------------------------------------------

def test_presets_equal_the_peers_defaults():
    from diffusers.hooks import FirstBlockCacheConfig

    fbc = duca_compile.presets("any", "fbcache")
    assert (fbc.head_blocks, fbc.tail_blocks, fbc.threshold, fbc.warmup) == (1, 0, FirstBlockCacheConfig().threshold, 0)
    cache_dit = pytest.importorskip("cache_dit")
    d = cache_dit.DBCacheConfig()
    for name, head in (("dbcache-f1b0", 1), ("dbcache-f8b0", d.Fn_compute_blocks)):
        c = duca_compile.presets("any", name)
        assert (c.head_blocks, c.tail_blocks, c.threshold, c.warmup, c.warmup_interval) == \
            (head, d.Bn_compute_blocks if name.endswith("f8b0") else 0, d.residual_diff_threshold,
             d.max_warmup_steps, d.warmup_interval)
        assert (c.max_cached_steps, c.max_consecutive_cached, c.max_accumulated_diff) == (None, None, None)
        assert d.max_cached_steps == -1 and d.max_continuous_cached_steps == -1
        assert d.max_accumulated_residual_diff_threshold is None


# -- the diffusers families -------------------------------------------------------------------------

CUT = ["dit", "pixart", "pixart-sigma", "flux", "sd3", "hunyuan-video", "wan", "cogvideox", "ltx-video", "sana",
       "qwen-image", "hunyuan-dit", "cogview3plus", "cogview4", "mochi", "allegro", "easyanimate", "cosmos"]
# single blocks on the concatenated text + image stream (cache-dit splits such stacks in two contexts)
REFUSED = {"auraflow": "no counterpart of its shape", "chroma": "no counterpart of its shape",
           "flux2": "no counterpart of its shape", "latte": "feeds a later block"}


@pytest.mark.parametrize("family", CUT)
def test_every_family_that_can_be_cut_caches_and_equals_the_oracle(family):
    """A threshold no diff reaches: every step after the first is cached, on every family whose
    stack can be cut after its first block, and the outputs equal the oracle's."""
    config = AdaptiveConfig(threshold=1e9)
    model, fast = compile_tiny(family, config)
    got = denoise(lambda i, **kw: fast(**kw), family, model, 4)
    blocks = next(g["blocks"] for g in duca_compile.explain(fast, as_text=False) if g["sites"])
    oracle = AdaptiveReference(copy.deepcopy(model), config, blocks)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, **kw), family, model, 4)
    assert marks(d["computed"] for d in decisions(fast)) == "C..." == marks(c for c, _ in oracle.decisions)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_stack_that_cannot_be_cut_warns_and_runs_plainly(family):
    with pytest.warns(UserWarning, match=REFUSED[family]):
        model, fast = compile_tiny(family, AdaptiveConfig())
        denoise(lambda i, **kw: fast(**kw), family, model, 2)
    assert REFUSED[family] in " ".join(duca_compile.stats(fast, flops=False)["uncached"])


@pytest.mark.inductor
def test_inductor_regional_adaptive_equals_the_oracle():
    config = AdaptiveConfig(threshold=0.3, forecast="taylorseer")
    twin, model = compile_regional("dit", config, inner="inductor")
    oracle = AdaptiveReference(copy.deepcopy(twin), config, BLOCKS["dit"])
    got = denoise(lambda i, **kw: model(**kw), "dit", twin, 8)
    want = denoise(lambda i, **kw: oracle.run(i, new_request=i == 0, **kw), "dit", twin, 8)
    made = decisions(model)
    assert marks(d["computed"] for d in made) == marks(c for c, _ in oracle.decisions)
    assert 0 < sum(d["computed"] for d in made) < 8
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert duca_compile.stats(model, flops=False)["variants_compiled"] == 1    # one block graph, shared


def test_flops_report_refuses_a_config_decided_at_run_time():
    from duca_compile.models import make_model

    with pytest.raises(ValueError, match="decides each step from the data"):
        duca_compile.flops_report(make_model("dit"), AdaptiveConfig(), num_steps=4)


def test_enable_on_a_pipeline_decides_each_request_afresh():
    """``enable(pipe, "any:fbcache")``: the pipeline's driver gives steps and requests, so the second
    request starts from a computed step and its own decisions, with caches hit in both."""
    from duca_compile.models import make_pipeline, pipeline_call_kwargs

    pipe = make_pipeline("flux")
    duca_compile.enable(pipe, dataclasses.replace(duca_compile.presets("any", "fbcache"), threshold=1e9),
                        inner="eager")
    for _ in range(2):
        pipe(**pipeline_call_kwargs("flux", pipe, num_inference_steps=5))
        assert marks(d["computed"] for d in decisions(pipe.transformer)) == "C...."
    s = duca_compile.stats(pipe.transformer, flops=False)
    assert s["requests"] == 2 and s["steps"]["skip"] == 8 and s["decision_reads"] == 8


def test_enable_with_regional_compilation_decides_between_the_block_graphs():
    from duca_compile.models import make_pipeline, pipeline_call_kwargs

    pipe = make_pipeline("flux")
    duca_compile.enable(pipe, dataclasses.replace(duca_compile.presets("any", "fbcache"), threshold=1e9),
                        inner="eager", regional=True)
    for _ in range(2):
        pipe(**pipeline_call_kwargs("flux", pipe, num_inference_steps=5))
        assert marks(d["computed"] for d in decisions(pipe.transformer)) == "C...."
    s = duca_compile.stats(pipe.transformer, flops=False)
    assert s["requests"] == 2 and s["steps"]["skip"] == 8 and s["decision_reads"] == 8
    assert "adaptive: head ['transformer_blocks.0']" in duca_compile.explain(pipe.transformer)
