"""Parallel blocks: Flux, Chroma and HunyuanVideo single blocks compute attention and MLP from one
input and merge them in one ``proj_out``. On SUBSET steps the MLP half runs on k tokens beside the
attention rows cached at the last FULL step, as ToCa-FLUX's single-stream blocks do
(``linear2(cat(cached attention rows, fresh MLP rows))``)."""
import pytest
import torch

import duca_compile
from duca_compile import ClusCaConfig, FORAConfig, ToCaConfig
from duca_compile.models import make_inputs
from duca_compile.passes.find_sites import module_path
from duca_compile.passes.layout import half_key
from duca_compile.report import _variant_name, count_ops
from duca_compile.runtime import state_of

from helpers import compile_tiny, run_against_oracle, timesteps

PARALLEL = ["flux", "chroma", "hunyuan-video"]


def _singles(fast):
    runner, piece = state_of(fast).graphs()[0]
    return runner, piece, [s for s in runner.sitemap.sites if s.block.startswith("single_transformer_blocks")]


@pytest.mark.parametrize("family", PARALLEL)
def test_single_blocks_run_their_mlp_half_on_k_tokens_as_the_oracle(family):
    model, fast = compile_tiny(family, ToCaConfig(interval=3, ratio=0.4))
    with duca_compile.sampling(fast, num_steps=6):
        modes = run_against_oracle(family, model, fast, timesteps(6))
    assert modes == ["full", "subset", "subset"] * 2
    runner, piece, singles = _singles(fast)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    assert singles and all(s.subsettable and s.attention_channels == (0, inner) for s in singles)
    last = state_of(fast).last_actions
    assert all(isinstance(last[s.name], int) and 2 <= last[s.name] < s.tokens[0] for s in singles)
    # FULL wrote each block's attention half: the cache holds the attention output, not zeros
    assert all(piece.slots[0].by_key[half_key(s.name)].abs().sum() > 0 for s in singles)


def test_the_subset_variant_drops_single_block_attention_and_reads_the_cached_half():
    model, fast = compile_tiny("flux", ToCaConfig(interval=3, ratio=0.4))
    with duca_compile.sampling(fast, num_steps=3):
        for i, t in enumerate(timesteps(3)):
            fast(**make_inputs("flux", model, timestep=t, seed=i))
    runner, _, singles = _singles(fast)
    v = {_variant_name(k).split("(")[0]: g for k, g in runner.variant_graphs.items()}
    halves = {n.name: n for n in v["SUBSET"].graph.nodes if n.op == "placeholder"
              and n.name in {runner.layout.spec(half_key(s.name)).placeholder for s in singles}}
    assert len(halves) == len(singles) and all(n.users for n in halves.values())    # read on SUBSET
    for s in singles:
        inside = [n for n in v["SUBSET"].graph.nodes if n.op == "call_function" and module_path(n).startswith(s.block)]
        assert not [n for n in inside if module_path(n).startswith(f"{s.block}.attn")]   # attention gone
        mlp = [n for n in inside if module_path(n) == f"{s.block}.proj_mlp"]
        assert mlp and all(n.meta["example_value"].shape[1] < s.tokens[0] for n in mlp)  # on k tokens
    assert count_ops(v["SUBSET"])["sdpa"] == 0
    # FULL copies each half into its cache
    written = {n.args[0].name for n in v["FULL"].graph.nodes if n.op == "call_function"
               and n.target is torch.ops.aten.copy_.default}
    assert {runner.layout.spec(half_key(s.name)).placeholder for s in singles} <= written


def test_a_subset_step_reads_the_attention_rows_from_the_cache():
    """Overwriting the cached halves changes the next SUBSET output; putting them back restores it."""
    model, fast = compile_tiny("flux", ToCaConfig(interval=3, ratio=0.4))
    kw = [make_inputs("flux", model, timestep=t, seed=i) for i, t in enumerate(timesteps(2))]
    with duca_compile.sampling(fast, num_steps=2):
        fast(**kw[0])
        _, piece, singles = _singles(fast)
        state = {k: c.clone() for k, c in piece.slots[0].by_key.items()}
        for s in singles:
            piece.slots[0].by_key[half_key(s.name)].mul_(3.0)
        changed = fast(**kw[1])[0]
    torch._dynamo.reset()
    model, fast = compile_tiny("flux", ToCaConfig(interval=3, ratio=0.4))
    with duca_compile.sampling(fast, num_steps=2):
        fast(**kw[0])
        _, piece, _ = _singles(fast)
        assert all(torch.equal(piece.slots[0].by_key[k], v) for k, v in state.items())   # same start
        same = fast(**kw[1])[0]
    assert state_of(fast).last_plan.mode.value == "subset"
    assert not torch.allclose(changed, same, atol=1e-4)


@pytest.mark.parametrize("config", [FORAConfig(interval=2), ClusCaConfig(interval=4, clusters=4, first_enhance=1)],
                         ids=["fora", "clusca"])
def test_methods_that_never_subset_single_blocks_cache_no_attention_half(config):
    """FORA never runs SUBSET; ClusCa forecasts single blocks whole (official FLUX ClusCa)."""
    model, fast = compile_tiny("flux", config)
    with duca_compile.sampling(fast, num_steps=4):
        modes = run_against_oracle("flux", model, fast, timesteps(4))
    assert "full" in modes and len(set(modes)) == 2
    runner, _, singles = _singles(fast)
    assert not [c for c in runner.layout.caches if c.key.endswith(":attention-half")]
    if isinstance(config, ClusCaConfig):
        assert all("reuses a parallel block" in s.subset_reason for s in singles)
        assert all(state_of(fast).last_actions[s.name] == "reuse" for s in singles)


def test_kv_norm_scores_the_joint_tokens_of_a_single_block():
    model, fast = compile_tiny("flux", ToCaConfig(interval=3, ratio=0.4, selection="kv-norm"))
    with duca_compile.sampling(fast, num_steps=3):
        run_against_oracle("flux", model, fast, timesteps(3))
    _, _, singles = _singles(fast)
    assert all(state_of(fast).last_indices[s.name].shape[1] >= 2 for s in singles)
