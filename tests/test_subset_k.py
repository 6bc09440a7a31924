"""One compile per pattern of actions: a SUBSET variant serves every token count k its sites get
(k is its one symbolic size), so a 50-step request of any preset compiles at most FULL, REUSE,
SKIP, one SUBSET pattern and what ``compute_first`` adds, and never warns about ``max_variants``."""
import dataclasses
import warnings

import pytest
import torch

import duca_compile
from duca_compile import RatioSchedule, ToCaConfig, presets
from duca_compile.flops import _fake_inputs, count_flops, variant_flops
from duca_compile.passes import build_variant
from duca_compile.runtime import state_of
from duca_compile.settings import inner_compiler
from duca_compile.models import make_inputs

from helpers import compile_tiny, run_against_oracle, timesteps

FAMILY = {"dit-xl-2": "dit", "pixart-alpha": "pixart", "flux-dev": "flux"}
PRESETS = [(m, meth) for m, methods in presets().items() if m in FAMILY for meth in methods]


def _request(family, model, fast, steps):
    with duca_compile.sampling(fast, num_steps=steps):
        for i, t in enumerate(timesteps(steps, 999.0, 1.0)):
            fast(**make_inputs(family, model, timestep=t, seed=i))


@pytest.mark.parametrize("registry, method", PRESETS)
def test_a_50_step_preset_request_compiles_one_variant_per_pattern(registry, method):
    family, config = FAMILY[registry], presets(registry, method)
    if method == "clusca":                                 # tiny Flux has 5 text tokens, not 16
        config = dataclasses.replace(config, clusters=4)
    model, fast = compile_tiny(family, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # a max_variants warning fails the test
        _request(family, model, fast, 50)
    runner, piece = state_of(fast).graphs()[0]
    plans = [k for k, n in piece.variant_calls.items() if n]
    patterns = {runner.pattern(k) for k in plans}
    assert runner.compiles == len(patterns) == duca_compile.stats(fast, flops=False)["variants_compiled"]
    # FULL, REUSE, SKIP, SUBSET (+ compute_first's); the per-layer schedule's steps full in block 0
    # only add block-0-full SUBSET, SKIP and REUSE (PARTIAL) patterns
    assert len(patterns) <= 5 + 3 * (getattr(config, "step_types", "") == "per-layer")
    sized = [k for k in plans if runner.pattern(k) != k]
    if len(sized) > 1:                                     # ratio schedules: many k, one compile
        assert len({runner.pattern(k) for k in sized}) < len(sized)


def test_one_subset_compile_serves_a_new_k_every_step_and_site():
    """A layer- and step-dependent ratio schedule gives every conservative step and site its own k;
    every call equals the oracle, and tokens counted are the k that ran."""
    schedule = RatioSchedule(step_weight=0.9, layer_weight=0.6, module_weight=1.0, module_tau=0.6)
    config = ToCaConfig(interval=2, ratio=0.4, ratio_schedule=schedule)
    model, fast = compile_tiny("pixart", config)
    with duca_compile.sampling(fast, num_steps=8):
        modes = run_against_oracle("pixart", model, fast, timesteps(8))
    assert modes.count("subset") == 4
    runner, piece = state_of(fast).graphs()[0]
    sized = [k for k in piece.variant_calls if runner.pattern(k) != k]
    assert len(sized) == 4 and len({runner.pattern(k) for k in sized}) == 1 and runner.compiles == 2
    ks = {a for k in sized for _, a in k[1] if isinstance(a, int)}
    assert len(ks) >= 4                                    # several k, per step and per site
    for key in sized:               # FLOPs of each k, counted on the shared graph, are those of its own graph
        static = build_variant(runner.build.gm, runner.sitemap, runner.layout, dict(key[1]), False,
                               runner.build.fake_mode)
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
        inputs = _fake_inputs(runner, static, key, fake_mode)
        with fake_mode:
            assert variant_flops(runner, key) == count_flops(static, *inputs)
    assert len({variant_flops(runner, k) for k in sized}) > 1
    s = duca_compile.stats(fast)
    ran = sum(a for k in sized for _, a in k[1] if isinstance(a, int))
    computed = sum(sum(x.tokens) for x in runner.sitemap.sites) * 4 + ran   # 4 FULL steps, 4 SUBSET steps
    assert s["tokens_computed"] == computed


def test_a_one_token_subset_computes_two():
    """k = 1 would be a size the symbolic compile cannot take (0 and 1 are specialised): it runs 2,
    and stats count the 2."""
    model, fast = compile_tiny("dit", ToCaConfig(interval=2, ratio=0.07))      # 16 tokens: int(1.12) = 1
    run_against_oracle("dit", model, fast, timesteps(2))
    ks = {a for a in state_of(fast).last_actions.values() if isinstance(a, int)}
    assert ks == {2}


def test_the_symbolic_compile_says_which_k_it_takes():
    """Inductor's assumptions about k (k >= 2 here) are checked before a compiled variant runs a new
    k-tuple; a k it does not take gets a compile of its own."""
    def f(x, idx):
        return (torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).sum(1),)

    gm = torch.fx.symbolic_trace(f)
    x, idx = torch.randn(2, 16, 4), torch.arange(5).expand(2, 5).contiguous()
    fn, accepts = inner_compiler("aot_eager", None, {}).compile_generic(gm, [x, idx], [1])
    for k in (2, 5, 16):
        i = torch.arange(k).expand(2, k).contiguous()
        assert accepts([i])
        torch.testing.assert_close(fn(x, i)[0], f(x, i)[0])
    assert not accepts([torch.zeros(2, 1, dtype=torch.int64)])


def test_a_k_the_compile_does_not_take_is_compiled_apart():
    """A k-tuple the pattern's compile rejects gets a static compile of its own, equal to the oracle."""
    model, fast = compile_tiny("dit", ToCaConfig(interval=2, ratio=0.5))
    ts = timesteps(4)
    run_against_oracle("dit", model, fast, ts[:2])
    runner, _ = state_of(fast).graphs()[0]
    pattern = next(p for p in runner.variants if any(a == "subset" for _, a in p[1]))
    fn, _ = runner.variants[pattern]
    runner.variants[pattern] = (fn, lambda indices: False)       # as if Inductor had assumed this k
    runner.by_plan.clear()
    run_against_oracle("dit", model, fast, ts, input_seed=7)
    assert runner.compiles == 3 and any(isinstance(a, int) for k in runner.variant_graphs for _, a in k[1])


@pytest.mark.parametrize("apart", [False, True])
def test_subset_of_every_token_when_tokens_equal_width(apart):
    """Wan at 32 tokens and width 32 with ratio 1.0 (k = N = D) equals the oracle, through the one
    generic compile and through a plan compiled apart (built at its own k, the width axis was once
    taken for the token axis: 0.133 off)."""
    from duca_compile import ScriptedConfig

    model, fast = compile_tiny("wan", ScriptedConfig(modes=("full", "subset", "skip", "reuse"), ratio=1.0))
    assert run_against_oracle("wan", model, fast, timesteps(4)) == ["full", "subset", "skip", "reuse"]
    runner, _ = state_of(fast).graphs()[0]
    assert {s.tokens[0] for s in runner.sitemap.sites if s.subsettable} == {32} == {model.config.num_attention_heads
                                                                                * model.config.attention_head_dim}
    if apart:                                  # as when a symbolic compile rejects a k: every plan on its own
        runner.variants = {p: (fn, lambda indices: False) for p, (fn, _) in runner.variants.items()}
        runner.by_plan.clear()
    compiles = runner.compiles
    assert run_against_oracle("wan", model, fast, timesteps(4)) == ["full", "subset", "skip", "reuse"]
    assert runner.compiles - compiles == (1 if apart else 0)           # the k = 32 SUBSET plan, built apart
