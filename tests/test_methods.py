"""Every method, compiled, equals the eager oracle step by step; method-specific machinery engages."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import duca_compile
from duca_compile import ClusCaConfig, DuCaConfig, FORAConfig, ScriptedConfig, TaylorSeerConfig, ToCaConfig
from duca_compile.passes import vnorm_key
from duca_compile.policies import make_policy
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs

from helpers import FAMILIES, compile_regional, compile_tiny, oracle_for, run_against_oracle, timesteps

OPENSORA_CYCLES = (("self_attn", "FCA"), ("ff", "FCA"), ("cross_attn", "FCACCA"))
METHODS = {
    "fora": FORAConfig(interval=2),
    "toca": ToCaConfig(interval=3, ratio=0.5, soft_fresh_weight=0.25, spatial_grid=2, spatial_bonus=0.6),
    "duca-v1": DuCaConfig(interval=3, ratio=0.5, selection="kv-norm", soft_fresh_weight=0.25),
    "duca-v2": DuCaConfig(interval=3, ratio=0.5),
    "duca-cycles": DuCaConfig(ratio=0.5, cycles=OPENSORA_CYCLES, warmup=2),
    "taylorseer": TaylorSeerConfig(interval=3, max_order=2, first_enhance=2),
    "hicache": TaylorSeerConfig(interval=3, max_order=2, first_enhance=2, forecast="hermite", hermite_scale=0.6),
    "foca": TaylorSeerConfig(interval=5, first_enhance=2, forecast="foca"),     # forecasts 1..4 steps out
    "clusca": ClusCaConfig(interval=3, clusters=4, propagation=0.3, max_order=1, first_enhance=2),
    "compute-first": DuCaConfig(interval=3, ratio=0.4, compute_first=1),
}


@pytest.mark.filterwarnings("ignore:duca. .*not a square grid")
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_method_equals_oracle(family, method):
    model, fast = compile_tiny(family, METHODS[method])
    modes = run_against_oracle(family, model, fast, timesteps(9))
    s = duca_compile.stats(fast)
    assert modes[0] == "full" and len(set(modes)) > 1, modes
    assert s["cache_hits"] > 0 and s["tokens_computed"] < s["tokens_total"]


@given(family=st.sampled_from(FAMILIES), order=st.integers(0, 3), interval=st.integers(2, 4),
       first=st.integers(1, 3), gamma=st.floats(0, 1), clusters=st.integers(1, 5), clusca=st.booleans(),
       seed=st.integers(0, 2**16), hermite=st.none() | st.floats(0.2, 1.5), foca=st.booleans())
def test_taylor_and_cluster_methods_equal_oracle(family, order, interval, first, gamma, clusters, clusca, seed,
                                                 hermite, foca):
    """TaylorSeer and ClusCa, in the Taylor basis or HiCache's Hermite basis (``hermite``: its σ);
    TaylorSeer's schedule with FoCa's forecasts (``foca``; not offered with ClusCa)."""
    torch._dynamo.reset()
    basis = dict(forecast="hermite", hermite_scale=hermite) if hermite is not None else {}
    if foca and not clusca:
        basis = dict(forecast="foca")
    config = (ClusCaConfig(interval=interval, clusters=clusters, propagation=gamma, max_order=order,
                           first_enhance=first, seed=seed, **basis) if clusca else
              TaylorSeerConfig(interval=interval, max_order=order, first_enhance=first, seed=seed, **basis))
    model, fast = compile_tiny(family, config, seed=seed)
    run_against_oracle(family, model, fast, timesteps(2 * interval + first + 2), input_seed=seed)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_clusca_runs_the_cold_iterations_once_per_request_then_warm_starts(family, monkeypatch):
    import duca_compile.runner as runner_module

    runs, kmeans = [], runner_module.kmeans_l1
    monkeypatch.setattr(runner_module, "kmeans_l1", lambda x, k, iters, init=None, generator=None:
                        runs.append((iters, init is None)) or kmeans(x, k, iters, init, generator))
    model, fast = compile_tiny(family, ClusCaConfig(interval=2, clusters=4, first_enhance=1, kmeans_iters=2,
                                                    kmeans_cold_iters=5))
    for request in range(2):
        with duca_compile.sampling(fast, num_steps=3):
            for t in timesteps(3):                                # F C F: two clusterings
                fast(**make_inputs(family, model, timestep=t))
    per = len(runs) // 4                                          # clusterings per full step: one per stream
    assert per >= 1 and runs == ([(5, True)] * per + [(2, False)] * per) * 2


def _outputs(family, config, n=8):
    torch._dynamo.reset()
    model, fast = compile_tiny(family, config)
    return [fast(**make_inputs(family, model, timestep=t, seed=i))[0] for i, t in enumerate(timesteps(n))]


@pytest.mark.parametrize("family", FAMILIES)
def test_taylorseer_order_zero_equals_fora_and_order_two_forecasts(family):
    fora = _outputs(family, FORAConfig(interval=3))
    order0 = _outputs(family, TaylorSeerConfig(interval=3, max_order=0, first_enhance=1))
    order2 = _outputs(family, TaylorSeerConfig(interval=3, max_order=2, first_enhance=1))
    assert all(torch.equal(a, b) for a, b in zip(fora, order0))
    # steps 4, 5 come after two full steps: the first difference moves the forecast off the cache
    assert all(torch.equal(fora[i], order2[i]) for i in (0, 1, 2, 3))
    assert not torch.allclose(fora[4], order2[4]) and not torch.allclose(fora[5], order2[5])


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_clusca_with_every_token_a_cluster_and_no_propagation_computes_the_mlp_fully(family):
    tokens = 16
    config = ClusCaConfig(interval=3, clusters=tokens, propagation=0.0, max_order=0, first_enhance=1)
    model, fast = compile_tiny(family, config)
    oracle = None
    for i, t in enumerate(timesteps(3)):
        kw = make_inputs(family, model, timestep=t, seed=i)
        out = fast(**kw)[0]
        st_ = state_of(fast)
        oracle = oracle or oracle_for(model, fast)
        reps = st_.last_indices
        if i > 0:
            assert all(torch.equal(r.sort(1).values, torch.arange(tokens).expand_as(r)) for r in reps.values())
        # plain per-site plan: feed-forward computed, attention reused
        actions = {n: "compute" if i == 0 or k == "ff" else "reuse" for n, k in oracle.sites.items()}
        ref = oracle.run(actions, step=st_.step, slot=st_.slot, **kw)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def _block_streams(model, block, kw):
    """The streams leaving ``block`` in an uncompiled run, by token count."""
    seen = {}
    h = model.get_submodule(block).register_forward_hook(lambda m, a, out: seen.update(out=out))
    model(**kw)
    h.remove()
    outs = seen["out"] if isinstance(seen["out"], tuple) else (seen["out"],)
    return {o.shape[1]: o for o in outs}


@pytest.mark.parametrize("family, regional", [("dit", False), ("flux", False), ("flux", True)],
                         ids=["dit", "flux", "flux-regional"])
def test_clusca_clusters_each_stream_after_its_last_token_wise_block(family, regional, monkeypatch):
    """As the official code: DiT clusters its last block's output (block 27), FLUX its image and text
    streams after the last double block (18), not after the single blocks, which ClusCa forecasts."""
    import duca_compile.runner as runner_module

    clustered, kmeans = {}, runner_module.kmeans_l1

    def recording(x, k, iters, init=None, generator=None):
        clustered.setdefault(x.shape[1], x.clone())
        return kmeans(x, k, iters, init, generator)
    monkeypatch.setattr(runner_module, "kmeans_l1", recording)
    config = ClusCaConfig(interval=3, clusters=4, first_enhance=1)
    model, fast = compile_regional(family, config) if regional else compile_tiny(family, config)
    kw = make_inputs(family, model, timestep=900.0)
    with duca_compile.sampling(fast, num_steps=3):
        fast(**kw)
    expected = _block_streams(model, "transformer_blocks.1" if family == "dit" else "transformer_blocks.0", kw)
    assert set(clustered) == set(expected) == ({16} if family == "dit" else {16, 5})
    for tokens, x in clustered.items():
        torch.testing.assert_close(x, expected[tokens], atol=1e-5, rtol=1e-5)


def test_flux_clusca_preset_propagates_on_the_image_stream_only():
    """Official FLUX ClusCa propagates the image MLP's representatives and scatters the text ones
    plainly; the text stream is the one that sees the image only through joint attention."""
    config = dataclasses.replace(duca_compile.presets("flux-dev", "clusca"), clusters=4, first_enhance=1,
                                 interval=3, propagation=0.3)
    model, fast = compile_tiny("flux", config)
    with duca_compile.sampling(fast, num_steps=3):
        run_against_oracle("flux", model, fast, timesteps(3))
    runner, _ = state_of(fast).graphs()[0]
    latent = {s.name: s.latent for s in runner.sitemap.sites}
    assert latent == {"transformer_blocks.0.attn": True, "transformer_blocks.0.ff": True,
                      "transformer_blocks.0.ff_context": False, "single_transformer_blocks.0.proj_out": True,
                      "single_transformer_blocks.1.proj_out": True}
    assert runner.layout.plain_sites == {"transformer_blocks.0.ff_context"}
    subset = next(g for k, g in runner.variant_graphs.items() if any(a == "subset" for _, a in k[1]))
    # propagation builds a new cache (scatter out of place, then copy_); a plain site scatters in place
    assert sum(n.target is torch.ops.aten.scatter.src for n in subset.graph.nodes) == 1
    assert sum(n.target is torch.ops.aten.scatter_.src for n in subset.graph.nodes) == 1
    default = make_policy(dataclasses.replace(config, propagate_text=True))
    assert default.propagates(False) and not make_policy(config).propagates(False)


def test_clusca_with_more_clusters_than_tokens_names_the_field():
    model, fast = compile_tiny("dit", ClusCaConfig(interval=3, clusters=17, first_enhance=1))
    fast(**make_inputs("dit", model, timestep=900.0))
    with pytest.raises(ValueError, match="clusters=17 is more than the 16 tokens"):
        fast(**make_inputs("dit", model, timestep=800.0))


def _value_scores(model, block, kw):
    """Σ_heads (1 − ‖v_h‖) of one DiT block's self-attention, from the module itself."""
    attn = model.get_submodule(f"{block}.attn1")
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0] if args else
                                            kwargs["hidden_states"]), with_kwargs=True)
    model(**kw)
    handle.remove()
    v = attn.to_v(seen["x"])
    b, n, _ = v.shape
    return (1 - v.view(b, n, attn.heads, -1).norm(dim=-1)).sum(-1)        # [batch, tokens]


def test_kv_norm_selects_the_tokens_with_the_smallest_value_norms():
    config = DuCaConfig(interval=3, ratio=0.25, selection="kv-norm")
    model, fast = compile_tiny("dit", config)
    kw0 = make_inputs("dit", model, timestep=900.0)
    fast(**kw0)
    fast(**make_inputs("dit", model, timestep=800.0, seed=1))                # conservative step
    runner, piece = state_of(fast).graphs()[0]
    for block in runner.sitemap.blocks:
        expected = _value_scores(model, block, kw0)
        torch.testing.assert_close(piece.slots[0].by_key[vnorm_key(block, 16)], expected, atol=1e-4, rtol=1e-4)
        score = torch.nn.functional.normalize(expected.view(2, 1, -1).mean(0), dim=-1)
        want = score.topk(4, dim=1).indices.expand(2, -1)
        got = state_of(fast).last_indices[f"{block}.ff"]
        assert torch.equal(got.sort(1).values, want.sort(1).values)


@pytest.mark.parametrize("model, per_row", [("dit-xl-2", True), ("pixart-alpha", False)])
def test_kv_norm_presets_score_cfg_halves_as_the_official_code(model, per_row):
    """Official DiT scores every batch row by its own value norms (the CFG halves may differ);
    PixArt averages the halves and both use that selection."""
    from duca_compile.policies.token_selection import TokenSelector

    config = duca_compile.presets(model, "duca-v1")
    assert config.share_cfg_indices is not per_row and duca_compile.presets(model, "duca").share_cfg_indices
    selector = TokenSelector(dataclasses.replace(config, soft_fresh_weight=0.0, spatial_bonus=0.0), print)
    scores = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))     # cond rows 0-1, uncond 2-3
    got = selector.select("b.0.ff", 4, 64, 8, "cpu", None, value_score=scores).sort(1).values
    mean = scores.view(2, 2, 64).mean(0)
    want = (scores if per_row else torch.cat([mean, mean])).topk(8, dim=1).indices.sort(1).values
    assert torch.equal(got, want) and torch.equal(got[:2], got[2:]) is not per_row


def _joint_value_scores(model, block, kw):
    """Per stream, Σ_heads (1 − ‖v_h‖) of a joint-attention block (Flux, QwenImage): the image
    values from ``to_v``, the text values from ``add_v_proj``, read off the modules themselves."""
    attn = model.get_submodule(f"{block}.attn")
    seen = {}
    hooks = [getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.update({name: out}))
             for name in ("to_v", "add_v_proj") if getattr(attn, name, None) is not None]
    model(**kw)
    for h in hooks:
        h.remove()

    def score(v):
        b, n, _ = v.shape
        return (1 - v.view(b, n, attn.heads, -1).norm(dim=-1)).sum(-1)
    if "add_v_proj" not in seen:            # a Flux single block: one value over [text, image]
        return (score(seen["to_v"]),)
    return score(seen["add_v_proj"]), score(seen["to_v"])


@pytest.mark.parametrize("family", ["flux", "qwen-image", "wan"])
def test_kv_norm_finds_values_passed_by_keyword_and_each_stream_of_joint_attention(family):
    # diffusers' attention dispatch calls SDPA with value=...; joint attention holds [text, image]
    config = DuCaConfig(interval=3, ratio=0.25, selection="kv-norm")
    model, fast = compile_tiny(family, config)
    kw0 = make_inputs(family, model, timestep=900.0)
    fast(**kw0)
    fast(**make_inputs(family, model, timestep=800.0, seed=1))            # conservative step
    runner, piece = state_of(fast).graphs()[0]
    by_key = piece.slots[0].by_key
    for block in runner.sitemap.blocks:
        subsettable = [s for s in runner.sitemap.sites if s.block == block and s.subsettable]
        assert subsettable                                  # Flux single blocks too: their MLP half
        if family == "wan":
            attn = model.get_submodule(f"{block}.attn1")
            seen = {}
            h = attn.to_v.register_forward_hook(lambda m, a, out: seen.update(v=out))
            model(**kw0)
            h.remove()
            b, n, _ = seen["v"].shape
            expected = {n: (1 - seen["v"].view(b, n, attn.heads, -1).norm(dim=-1)).sum(-1)}
        else:
            expected = {v.shape[1]: v for v in _joint_value_scores(model, block, kw0)}
        for site in subsettable:
            want = expected[site.tokens[0]]
            torch.testing.assert_close(by_key[vnorm_key(block, site.tokens[0])], want, atol=1e-4, rtol=1e-4)
            k = state_of(fast).last_indices[site.name].shape[1]
            top = torch.nn.functional.normalize(want.view(2, 1, -1).mean(0), dim=-1).topk(k, dim=1).indices
            assert torch.equal(state_of(fast).last_indices[site.name].sort(1).values,
                               top.expand(2, -1).sort(1).values)


def test_kv_norm_without_a_value_to_score_fails_loudly():
    # Sana's self-attention is linear (no SDPA): kv-norm cannot score the tokens of its cross-attention
    model, fast = compile_tiny("sana", DuCaConfig(interval=3, ratio=0.5, selection="kv-norm"))
    with pytest.raises(Exception, match="selection='kv-norm' needs the self-attention value"):
        fast(**make_inputs("sana", model, timestep=900.0))


def test_staleness_makes_the_next_selection_pick_unpicked_tokens():
    config = ToCaConfig(interval=10, ratio=0.25, soft_fresh_weight=100.0)
    model, fast = compile_tiny("dit", config)
    picked = []
    for i, t in enumerate(timesteps(5)):
        fast(**make_inputs("dit", model, timestep=t, seed=i))
        if i:
            picked.append(set(state_of(fast).last_indices["transformer_blocks.0.ff"][0].tolist()))
    assert all(len(p) == 4 for p in picked)
    assert len(set().union(*picked)) == 16            # 4 steps x 4 tokens: every token exactly once


def test_spatial_bonus_raises_the_best_token_of_each_patch():
    from duca_compile.policies.token_selection import TokenSelector

    sel = TokenSelector(ToCaConfig(spatial_grid=2, spatial_bonus=10.0), lambda *a: None)
    score = torch.rand(1, 16)
    boosted = sel._spatial_bonus("s", score)
    patches = score.view(1, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(1, 4, 4)
    best = patches.argmax(-1)
    top = boosted.topk(4).indices.sort().values
    grid_best = torch.tensor([[(p // 2) * 8 + (p % 2) * 2 + (b // 2) * 4 + b % 2 for p, b in enumerate(best[0].tolist())]])
    assert torch.equal(top, grid_best.sort().values)


@pytest.mark.parametrize("world", [2, 4])
def test_spatial_bonus_of_a_context_parallel_shard_is_its_rows_of_the_global_grid(world):
    """Under context parallelism a rank holds side / world whole rows of the token grid: its bonus
    is the one-process bonus of the global scores, restricted to its rows (not "off: not square")."""
    from duca_compile.policies.token_selection import TokenSelector

    warned = []
    one = TokenSelector(ToCaConfig(spatial_grid=2, spatial_bonus=3.0), lambda *a: warned.append(a))
    shard = TokenSelector(ToCaConfig(spatial_grid=2, spatial_bonus=3.0), lambda *a: warned.append(a))
    shard.world = world
    score = torch.rand(3, 64)                                       # 8 x 8 grid
    want = one._spatial_bonus("s", score)
    rows = 64 // world
    got = torch.cat([shard._spatial_bonus("s", score[:, r * rows:(r + 1) * rows]) for r in range(world)], 1)
    assert torch.equal(got, want) and not torch.equal(want, score) and not warned
    shard.world = 8                                                 # one row per rank: patches would span ranks
    assert torch.equal(shard._spatial_bonus("s", score[:, :8]), score[:, :8]) and warned


def test_too_many_variants_warns():
    model, fast = compile_tiny("dit", ScriptedConfig(modes=("full", "reuse", "subset", "skip"), max_variants=2))
    with pytest.warns(UserWarning, match="variants compiled for one graph"):
        for t in timesteps(4):
            fast(**make_inputs("dit", model, timestep=t))


def test_explain_shows_the_plan_of_every_step_and_per_site_variants():
    model, fast = compile_tiny("pixart", DuCaConfig(interval=3, ratio=0.5, compute_first=1))
    for t in timesteps(3):
        fast(**make_inputs("pixart", model, timestep=t))
    text = duca_compile.explain(fast, num_steps=6)
    assert "plan: F C P F C P" in text                     # aggressive steps keep block 0 computed
    assert "variant SUBSET(any k at 2 sites; 3 computed)" in text and "variant PARTIAL(3 computed)" in text
    plan = duca_compile.explain(fast, as_text=False, num_steps=6)[0]["plan"]
    assert plan[1]["computed"]["transformer_blocks.1.ff"] == 8


def test_subset_of_every_token_when_tokens_equal_head_dim():
    """k = all tokens (a ratio schedule clamped at 1, ClusCa with a cluster per token) on a model
    whose token count equals head_dim: reshapes keep their sizes instead of guessing the token axis."""
    config = ToCaConfig(interval=2, ratio=1.0)
    model, fast = compile_tiny("pixart", config, sample_size=8, attention_head_dim=16)     # 16 tokens
    assert run_against_oracle("pixart", model, fast, timesteps(4)) == ["full", "subset", "full", "subset"]
    tokens = duca_compile.stats(fast)["tokens_per_site"]
    assert {n: t for n, t in tokens.items() if not n.endswith("attn1")} == {
        n: 4 * 16 for n in tokens if not n.endswith("attn1")}              # every token, every step


@pytest.mark.parametrize("order", [2])
def test_taylorseer_in_diffusers_phase_equals_diffusers_taylorseer_cache(order):
    """Users switching from diffusers' TaylorSeerCache get its outputs: the trained digits DiT, DDIM
    12 steps with guidance, cache_interval 4, 3 warm-up steps, the same attention and MLP outputs
    forecast (float32 factors), against duca's TaylorSeer with ``phase="diffusers"``."""
    from benchmarks.fidelity import Setup, _duca, _peer
    from benchmarks.models import load_dit
    from benchmarks.peers import TaylorSeerCache
    from benchmarks.sampling import starts

    setup = Setup(samples=4, batch=4, steps=12, guidance=1.5, inner="eager", sweep=())
    model = load_dit()
    noise, labels = starts(4, seed=5)
    with torch.no_grad():
        peer = TaylorSeerCache("diffusers", "diffusers", {}, interval=4, warmup=3, order=order)
        want, *_ = _peer(model, peer, setup, noise, labels)
        config = TaylorSeerConfig(interval=4, max_order=order, first_enhance=3, phase="diffusers")
        got, flop_ratio, *_ = _duca(model, config, setup, noise, labels)
        official, *_ = _duca(model, dataclasses.replace(config, phase="official"), setup, noise, labels)
    assert (got - want).abs().max().item() < 1e-4 and flop_ratio < 0.75       # the same, and cached
    assert (official - want).abs().max().item() > 1e-3                       # the phase is what differs


# x counts down 6..0 with I = round(2 / (1.8 − 1.6·x/7)), forced to 2 for x = 1: the official
# per-block rule gives F | F+A | C | F+C | F | F+C | F (F+A: block 0 full, the others aggressive)
PER_LAYER = DuCaConfig(interval=2, ratio=0.5, selection="kv-norm", soft_fresh_weight=0.25, count_down=True,
                       interval_weight=0.8, forced_interval=((0.2, 0.4, 2),), step_types="per-layer")


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_full_in_block_zero_only_refresh_its_caches_and_equal_the_oracle(family):
    model, fast = compile_tiny(family, PER_LAYER)
    oracle = stale = None
    with duca_compile.sampling(fast, num_steps=7):
        for i, t in enumerate(timesteps(7)):
            kw = make_inputs(family, model, timestep=t, seed=i)
            out = fast(**kw)[0]
            st = state_of(fast)
            oracle = oracle or oracle_for(model, fast)
            stale = stale or oracle_for(model, fast)       # the same run, but step 1 a plain SKIP
            computed = {n for n, a in st.last_actions.items() if a == "compute"}
            block0 = duca_compile.explain(fast, as_text=False)[0]["blocks"][0]
            first = {n for n in oracle.sites if n.rsplit(".", 1)[0] == block0}
            if i in (1, 3, 5):
                assert computed == first and st.last_skip == (i == 1), (i, computed)
            torch.testing.assert_close(out, oracle.replay(fast, **kw)[0], atol=1e-5, rtol=1e-4)
            if i == 1:
                stale.run({n: "reuse" for n in stale.sites}, True, **kw)
            else:
                ref = stale.replay(fast, **kw)[0]
                if i == 2:      # block 0 of step 2 reads the caches step 1 refreshed: a plain SKIP differs
                    assert (ref - out).abs().max() > 1e-4
    graphs = duca_compile.explain(fast, as_text=False)[0]["variants"]
    head = graphs[f"SKIP({len(first)} computed)"]
    assert 0 < head["linear"] < graphs["FULL"]["linear"] and head["cache_write"] > 0
    steps = duca_compile.stats(fast)["steps"]     # tiny Flux: block 0 is its one double block, the
    assert steps["full"] == 3 and steps["skip"] == 1 and steps["subset"] + steps["partial"] == 3  # rest reused


def test_hermite_coefficients_are_hicaches_and_order_one_at_the_root_half_scale_is_taylors():
    """HiCache's ``σ^i H_i(σk) / i!`` (physicists' Hermite): its closed forms, the values at the FLUX
    default σ = 0.5, and σ = 1/√2, where order 1 is TaylorSeer's ``k``."""
    from duca_compile.policies.forecasts import coefficient, hermite

    assert [hermite(n, 0.5) for n in range(4)] == [1.0, 1.0, -1.0, -5.0]
    for s_ in (0.5, 0.7):
        for k in range(1, 7):
            assert coefficient(("hermite", s_), k, 0) == 1.0
            assert coefficient(("hermite", s_), k, 1) == pytest.approx(2 * s_ ** 2 * k)
            assert coefficient(("hermite", s_), k, 2) == pytest.approx(2 * s_ ** 4 * k ** 2 - s_ ** 2)
            assert coefficient(("hermite", s_), k, 3) == pytest.approx(s_ ** 3 * (8 * s_ ** 3 * k ** 3 - 12 * s_ * k) / 6)
    assert [round(coefficient(("hermite", 0.5), k, 2), 3) for k in (1, 2, 3)] == [-0.125, 0.25, 0.875]
    assert coefficient(("hermite", 2 ** -0.5), 3, 1) == pytest.approx(coefficient(("taylor", 1.0), 3, 1)) == 3


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_hermite_forecast_differs_from_taylor_only_on_forecast_steps(family):
    taylor = _outputs(family, TaylorSeerConfig(interval=3, max_order=2, first_enhance=1))
    hicache = _outputs(family, TaylorSeerConfig(interval=3, max_order=2, first_enhance=1, forecast="hermite"))
    # full steps 0, 3, 6; steps 1 and 2 have one anchor (Δ⁰ alone, weight 1 in both bases)
    for i, (a, b) in enumerate(zip(taylor, hicache)):
        assert torch.equal(a, b) == (i not in (4, 5, 7)), i


@given(plan=st.lists(st.booleans(), min_size=2, max_size=30), seed=st.integers(0, 2**16))
def test_foca_clock_equals_cache_dits_foca_calibrator_on_any_plan(plan, seed):
    """duca's FoCa is coefficient rows on ``[F, D, C]`` (``FoCa``) and one update at full steps
    (``next_terms``); cache-dit's ``FoCaState`` keeps the tensors and recurses. Same values on any
    plan of full (True) and forecast steps, with step 0 full; the eager oracle's too."""
    import operator

    from duca_compile.policies.forecasts import FoCa, next_terms
    from duca_compile.reference import _FoCaTerms

    foca = pytest.importorskip("cache_dit.caching.cache_contexts.calibrators.foca")
    gen = torch.Generator().manual_seed(seed)
    peer, oracle, clock = foca.FoCaState(), _FoCaTerms(), FoCa()
    terms, forecasts = [torch.zeros(6, dtype=torch.float64)] * 3, 0
    for step, full in enumerate([True, *plan]):
        peer.mark_step_begin()
        if full:
            y = torch.randn(6, generator=gen, dtype=torch.float64)
            peer.update(y)
            oracle.compute(y, step)
            terms = next_terms("foca", y, terms, clock.computed(step), operator.sub, operator.mul)
            continue
        ours = sum(t * c for t, c in zip(terms, clock.cached(step)))
        torch.testing.assert_close(ours, peer.approximate())
        torch.testing.assert_close(ours, oracle.forecast(step))
        forecasts += 1


def test_foca_forecasts_follow_the_heun_rule_and_are_damped_past_three_steps():
    """Full steps 0 and 1 (F = 1, D = 1, C = 1), then forecasts: ``F + e/2 (D + local)``, the local
    difference from the last two values, forecasts included; from e = 4 the e = 3 form times 3/e."""
    from duca_compile.policies.forecasts import FoCa

    clock = FoCa()
    assert clock.computed(0) == [0.0, 0.0] and clock.cached(1) == [1.0, 0.0, 0.0]   # one anchor: reuse
    clock.computed(1)
    rows = [clock.cached(step) for step in range(2, 7)]
    values = [c[0] * 1 + c[1] * 1 + c[2] * 1 for c in rows]      # F = D = C = 1
    assert values == [2.0, 3.0, 4.0, pytest.approx(3.25), pytest.approx(1.225)]
    assert clock.computed(7) == rows[-1][1:]      # C = D − α·D_old − β·C_old of the last forecast


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_foca_differs_from_taylor_only_on_forecast_steps_after_two_anchors(family):
    taylor = _outputs(family, TaylorSeerConfig(interval=3, max_order=1, first_enhance=1))
    foca = _outputs(family, TaylorSeerConfig(interval=3, first_enhance=1, forecast="foca"))
    for i, (a, b) in enumerate(zip(taylor, foca)):        # full steps 0, 3, 6: steps 1 and 2 reuse in both
        assert torch.equal(a, b) == (i not in (4, 5, 7)), i
