"""duca_compile.enable / disable on real diffusers pipelines (tiny random DiT, PixArt-α, Flux, Flux
img2img, SD3, SD3 with Heun, Wan, CogVideoX, LTX-Video, HunyuanVideo, Sana, QwenImage).

Every pipeline runs end to end (eager inner compiler); the step comes from the scheduler, never
from the timestep, and separate cond / uncond calls get their cache slot from cache_context.
"""
import contextlib
from pathlib import Path

import pytest
import torch

import duca_compile
from duca_compile import DuCaConfig, FORAConfig, TaylorSeerConfig, duca_backend
from duca_compile.integrations.diffusers import disable, enable
from duca_compile.runtime import state_of, states_of
from duca_compile.models import PIPELINE_FAMILIES, make_pipeline, needs_transformers, pipeline_call_kwargs
from duca_compile.models.pipelines import PIPELINES
from helpers import recorded_calls
from works_with import works_with

# a step that ran without the compiled transformer fails the test
pytestmark = pytest.mark.filterwarnings("error:duca_compile. denoising step")

STEPS = 4


def _pipe(family, seed=0):
    if needs_transformers(family):
        pytest.importorskip("transformers", reason="diffusers' PixArt / Flux / SD3 pipelines need transformers")
    pipe = make_pipeline(family, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(family, pipe, steps=STEPS, **kw):
    return pipe(**pipeline_call_kwargs(family, pipe, steps, **kw))[0]


def _unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_enabled_pipeline_caches_and_is_deterministic(family):
    pipe = _pipe(family)
    transformer = pipe.transformer
    assert enable(pipe, FORAConfig(interval=2), inner="eager") is pipe
    assert pipe.transformer is transformer                      # compiled in place
    first = _run(family, pipe)
    n = len(pipe.scheduler.timesteps) - (getattr(pipe.scheduler, "begin_index", None) or 0)   # steps that ran (img2img: a tail)
    s = duca_compile.stats(pipe.transformer)
    passes = s["calls"] // n
    assert s["requests"] == 1 and s["calls"] == n * passes and s["fallback_calls"] == 0
    assert s["steps"]["full"] == passes * ((n + 1) // 2) and s["steps"]["reuse"] == passes * (n // 2)   # F R F R
    assert s["cache_hits"] > 0 and state_of(pipe.transformer).num_steps == n

    with torch.compiler.set_stance("fail_on_recompile"), recorded_calls(pipe) as calls:
        second = _run(family, pipe)
    assert torch.equal(first, second)
    # One request: steps 0..n-1 counted by scheduler.step; separate cond / uncond calls (Wan,
    # QwenImage) are slots 0 and 1 by their cache_context names, batched CFG is one call.
    contexts = [c[4] for c in calls[:passes]]
    assert calls == [(i == 0 and j == 0, i, j, n, contexts[j]) for i in range(n) for j in range(passes)]
    assert passes == (2 if family in ("wan", "qwen-image") else 1)
    assert duca_compile.stats(pipe.transformer)["requests"] == 2
    assert not state_of(pipe.transformer).driver.active         # the request ended with the last step

    # A fresh pipeline of the same seed, enabled the same way: the very same first result.
    torch._dynamo.reset()
    fresh = enable(_pipe(family), FORAConfig(interval=2), inner="eager")
    assert torch.equal(_run(family, fresh), first)
    spec = PIPELINES[family]
    works_with(f"pipeline-{family}", f"`{spec.cls}` ({spec.about})",
               f"cached, FORA(2): {STEPS} inference steps = {n} scheduler steps × {passes} call(s), "
               f"{s['cache_hits']} cache hits; same seed again: identical, no recompile; = a fresh pipeline")


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_full_every_step_equals_plain_and_disable_restores(family):
    pipe = _pipe(family)
    transformer, scheduler = pipe.transformer, pipe.scheduler
    gs = 2.0 if family in ("flux", "hunyuan-video") else None   # true CFG: two passes per step
    plain = _run(family, pipe, guidance_scale=gs)
    enable(pipe, FORAConfig(interval=1), inner="eager")
    cached = _run(family, pipe, guidance_scale=gs)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    passes = 2 if family in ("flux", "hunyuan-video", "wan", "qwen-image") else 1    # separate cond / uncond
    steps = len(pipe.scheduler.timesteps) - (getattr(pipe.scheduler, "begin_index", None) or 0)
    assert duca_compile.stats(pipe.transformer)["steps"]["full"] == steps * passes

    assert disable(pipe) is pipe and disable(pipe) is pipe      # idempotent
    assert pipe.transformer is transformer and pipe.scheduler is scheduler
    assert transformer._compiled_call_impl is None
    assert not {"set_timesteps", "step", "set_begin_index"} & set(vars(scheduler))
    assert "cache_context" not in vars(transformer) and "maybe_free_model_hooks" not in vars(pipe)
    assert state_of(transformer).driver is None
    calls = duca_compile.stats(transformer)["calls"]
    assert torch.equal(_run(family, pipe, guidance_scale=gs), plain)
    assert duca_compile.stats(transformer)["calls"] == calls    # the compiled graph is no longer called


def test_flux_true_cfg_passes_get_their_cache_context_slot(monkeypatch):
    pipe = _pipe("flux")
    import diffusers.hooks.hooks as hooks

    names = []
    original = hooks._set_cache_context
    monkeypatch.setattr(hooks, "_set_cache_context",
                        lambda module, ctx: (names.append(ctx and ctx.name), original(module, ctx))[1])
    enable(pipe, FORAConfig(interval=2), inner="eager")
    first = _run("flux", pipe, guidance_scale=3.0)
    s = duca_compile.stats(pipe.transformer)
    assert s["requests"] == 1 and s["calls"] == 2 * STEPS
    assert s["steps"]["full"] == 4 and s["steps"]["reuse"] == 4
    assert names[:4] == ["cond", None, "uncond", None]           # diffusers' own cache_context still runs

    with recorded_calls(pipe) as calls:
        assert torch.equal(_run("flux", pipe, guidance_scale=3.0), first)
    expected = [(i == 0 and name == "cond", i, slot, STEPS, name)
                for i in range(STEPS) for slot, name in enumerate(("cond", "uncond"))]
    assert calls == expected

    # The driver gives the same (step, slot) as timestep tracking does for this scheduler, so a
    # plain torch.compile with the duca backend (no enable) computes the very same latents.
    disable(pipe)
    reference = _pipe("flux")
    reference.transformer = torch.compile(reference.transformer, dynamic=False,
                                          backend=duca_backend(FORAConfig(interval=2), inner="eager"))
    assert torch.equal(_run("flux", reference, guidance_scale=3.0), first)
    assert duca_compile.stats(reference.transformer)["steps"] == s["steps"]


def test_steps_come_from_the_scheduler_not_the_timesteps():
    # Heun repeats every inner timestep; timestep tracking would take each repeat for a second
    # pass of the same step. The driver counts scheduler.step calls: one step, slot 0, per call.
    pipe = _pipe("sd3")
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    enable(pipe, FORAConfig(interval=2), inner="eager")
    _run("sd3", pipe, steps=3)
    n = len(pipe.scheduler.timesteps)
    assert n == 5 and len(set(pipe.scheduler.timesteps.tolist())) == 3
    with recorded_calls(pipe) as calls:
        _run("sd3", pipe, steps=3)
    assert calls == [(i == 0, i, 0, n, None) for i in range(n)]
    s = duca_compile.stats(pipe.transformer)
    assert s["requests"] == 2 and s["calls"] == 2 * n and s["steps"]["reuse"] == 4


def test_new_steps_batch_and_resolution_give_fresh_results():
    config = DuCaConfig(interval=3, ratio=0.5)                  # F C A F: subset and skip steps
    settings = [dict(), dict(steps=3), dict(batch_size=2), dict(height=64, width=96), dict()]
    pipe = enable(_pipe("flux"), config, inner="eager")
    before = _unique_graphs()
    outs = []
    for kw in settings:
        new_shape = not outs or kw.get("batch_size", 1) != 1 or "height" in kw
        with contextlib.nullcontext() if new_shape else torch.compiler.set_stance("fail_on_recompile"):
            outs.append(_run("flux", pipe, **kw))
    assert _unique_graphs() - before == 3                       # one graph per shape, none per step count
    s = duca_compile.stats(pipe.transformer)
    assert s["requests"] == len(settings) and s["steps"]["subset"] > 0 and s["steps"]["skip"] > 0
    assert s["shape_resets"] >= 3
    assert torch.equal(outs[-1], outs[0])                       # back to the first shape: no stale cache
    # A fresh pipeline whose first run is the new resolution: the same result as after three other runs.
    fresh = enable(_pipe("flux"), config, inner="eager")
    torch.testing.assert_close(_run("flux", fresh, **settings[3]), outs[3], atol=1e-6, rtol=1e-6)


def test_enable_twice_does_not_double_wrap_and_reenable_switches_config():
    pipe = _pipe("dit")
    enable(pipe, FORAConfig(interval=2), inner="eager")
    step = pipe.scheduler.step
    enable(pipe, FORAConfig(interval=2), inner="eager")                       # same arguments: a no-op
    assert pipe.scheduler.step is step
    assert not hasattr(step.__wrapped__, "_duca_compile_patch")               # wraps the original, once
    first = _run("dit", pipe)
    s = duca_compile.stats(pipe.transformer)
    assert (s["requests"], s["calls"], s["steps"]["reuse"]) == (1, STEPS, 2)

    enable(pipe, FORAConfig(interval=4), inner="eager")                       # other config: re-enabled
    _run("dit", pipe)
    s = duca_compile.stats(pipe.transformer)
    assert s["config"] == FORAConfig(interval=4) and s["steps"]["reuse"] == 3 and s["calls"] == STEPS

    disable(pipe)
    enable(pipe, FORAConfig(interval=4), inner="eager")                       # same again: Dynamo's graph reused
    with torch.compiler.set_stance("fail_on_recompile"):
        _run("dit", pipe)
    enable(pipe, FORAConfig(interval=2), inner="eager")
    assert torch.equal(_run("dit", pipe), first)
    disable(pipe)


def test_signatures_and_begin_index_follow_the_scheduler():
    import inspect

    from duca_compile.integrations.diffusers import _BACKENDS

    pipe = _pipe("flux")
    params = {name: set(inspect.signature(getattr(pipe.scheduler, name)).parameters)
              for name in ("set_timesteps", "step", "set_begin_index")}
    enable(pipe, FORAConfig(interval=2), inner="eager")
    for name, before in params.items():                       # retrieve_timesteps inspects these
        assert set(inspect.signature(getattr(pipe.scheduler, name)).parameters) == before
    driver = _BACKENDS[pipe.transformer].driver
    pipe.scheduler.set_timesteps(10, mu=1.0)
    assert driver.active and driver.num_steps == 10
    pipe.scheduler.set_begin_index(4)                         # img2img with strength 0.6
    assert driver.num_steps == 6
    latents = torch.zeros(1, 4, 16)
    with pytest.warns(UserWarning, match="denoising step 0 ended without a call"):   # no transformer here
        for i, t in enumerate(pipe.scheduler.timesteps[4:]):
            assert driver.active and driver.step == i
            latents = pipe.scheduler.step(latents, t, latents, return_dict=False)[0]
    assert not driver.active                                  # the request ended with its last step


def test_bad_input_raises_value_error_and_leaves_pipe_alone():
    with pytest.raises(ValueError, match="transformer"):
        enable(object(), FORAConfig())
    pipe = _pipe("dit")
    with pytest.raises(ValueError, match="CacheConfig"):
        enable(pipe, FORAConfig)
    with pytest.raises(ValueError, match="CacheConfig"):
        enable(pipe, 3)
    with pytest.raises(ValueError, match="inner"):
        enable(pipe, FORAConfig(), inner="tensorrt")
    with pytest.raises(ValueError, match="no preset"):
        enable(pipe, "dit-xl-2:no-such-method")
    with pytest.raises(ValueError, match="CacheConfig"):
        enable(pipe, ("dit-xl-2",))
    assert not {"set_timesteps", "step"} & set(vars(pipe.scheduler))
    assert pipe.transformer._compiled_call_impl is None
    assert disable(pipe) is pipe


def test_presets_by_name_get_num_steps_from_the_scheduler():
    # DiT's DuCa preset counts its interval down from the number of steps: it cannot run without it.
    pipe = enable(_pipe("dit"), "duca", inner="eager")          # model inferred: dit-xl-2
    _run("dit", pipe, steps=6)
    s = duca_compile.stats(pipe.transformer)
    assert s["config"] == duca_compile.presets("dit-xl-2", "duca")
    assert s["calls"] == 6 and s["steps"]["full"] < 6 and state_of(pipe.transformer).num_steps == 6
    with pytest.raises(ValueError, match="no preset model is known for SD3Transformer2DModel"):
        enable(_pipe("sd3"), "fora")


def test_enable_without_a_config_runs_the_default_the_readme_gives():
    """``enable(pipe)`` alone: TaylorSeer N=3, order 1, 6 full steps first (chosen from the fronts,
    README "Which method"); it caches, and the README names that config as the default."""
    pipe = enable(_pipe("dit"), inner="eager")
    _run("dit", pipe, steps=12)
    s = duca_compile.stats(pipe.transformer)
    assert s["config"] == TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)
    assert 6 < s["steps"]["full"] < 12 and s["cache_hits"] > 0
    which = (Path(__file__).parents[1] / "README.md").read_text().split("## Which method")[1].split("\n## ")[0]
    assert "`enable(pipe)` without a config uses `TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)`" in which


def test_compiled_transformer_is_swapped_back_and_shared_parts_are_refused():
    pipe = _pipe("dit")
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer)               # compiled by the user, never run
    compiled = pipe.transformer
    enable(pipe, FORAConfig(interval=2), inner="eager")
    assert pipe.transformer is transformer                      # duca compiles the original module
    twin = type(pipe)(**pipe.components)                        # shares the scheduler and transformer
    with pytest.raises(ValueError, match="already patched"):
        enable(twin, FORAConfig(interval=2), inner="eager")
    disable(pipe)
    assert pipe.transformer is compiled and transformer._compiled_call_impl is None
    enable(twin, FORAConfig(interval=2), inner="eager")         # free again once the first is disabled
    disable(twin)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_regional_enable_caches_every_block_like_the_whole_model(family):
    """``enable(pipe, regional=True)`` compiles each block; FORA draws no tokens, so its images equal
    whole-model duca's, with the same hits, and ``disable`` restores every block."""
    pipe = _pipe(family)
    enable(pipe, FORAConfig(interval=2), inner="eager")
    whole = _run(family, pipe)
    whole_stats = duca_compile.stats(pipe.transformer, flops=False)
    disable(pipe)
    torch._dynamo.reset()
    regional_pipe = _pipe(family)
    enable(regional_pipe, FORAConfig(interval=2), inner="eager", regional=True)
    blocks = [m for m in regional_pipe.transformer.modules() if m.__dict__.get("_compiled_call_impl") is not None]
    assert blocks and regional_pipe.transformer.__dict__.get("_compiled_call_impl") is None
    first = _run(family, regional_pipe)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = _run(family, regional_pipe)
    torch.testing.assert_close(first, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second)
    s = duca_compile.stats(regional_pipe.transformer, flops=False)
    assert len(states_of(regional_pipe.transformer)) == 1      # no other module taken for a model of its own
    assert s["requests"] == 2 and s["calls"] == 2 * whole_stats["calls"]
    assert s["steps"] == {mode: 2 * n for mode, n in whole_stats["steps"].items()}
    assert s["cache_hits"] == 2 * whole_stats["cache_hits"] and set(s["block_hits"]) == set(whole_stats["block_hits"])
    disable(regional_pipe)
    assert all(m.__dict__.get("_compiled_call_impl") is None for m in blocks)
