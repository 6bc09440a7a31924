"""Graph-level checks: what each variant must and must not contain."""
import pytest
import torch

from duca_compile import ScriptedConfig
from duca_compile.passes.find_sites import module_path
from duca_compile.report import count_ops
from duca_compile.runtime import state_of
from duca_compile.models import make_inputs

from helpers import FAMILIES, compile_tiny, timesteps

RATIO = 0.5


def _variants(family):
    model, fast = compile_tiny(family, ScriptedConfig(modes=("full", "reuse", "skip", "subset"), ratio=RATIO))
    for t in timesteps(4):
        fast(**make_inputs(family, model, timestep=t))
    runner, _ = state_of(fast).graphs()[0]
    by_name = {}
    from duca_compile.report import _variant_name
    for key, gm in runner.variant_graphs.items():
        by_name[_variant_name(key).split("(")[0]] = gm
    return runner, by_name


def _inside(gm, prefixes):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and any(module_path(n) == p or module_path(n).startswith(p + ".") for p in prefixes)]


@pytest.mark.parametrize("family", FAMILIES)
def test_variant_contents(family):
    runner, v = _variants(family)
    assert set(v) == {"FULL", "REUSE", "SKIP", "SUBSET"}
    sites = runner.sitemap.sites
    site_names = [s.name for s in sites]
    halves = [s for s in sites if s.attention_half and s.subsettable]     # Flux single blocks
    n_caches = sum(len(s.outputs) for s in sites) + len(runner.sitemap.stack_outputs) + len(halves)

    full = count_ops(v["FULL"])
    assert full["cache_write"] == n_caches            # FULL writes every cache...
    written = [n.args[0].name for n in v["FULL"].graph.nodes if n.op == "call_function"
               and n.target.__name__ == "copy_.default"]
    assert len(set(written)) == n_caches               # ...each exactly once
    assert full["sdpa"] >= sum(s.kind != "ff" for s in sites)

    reuse = count_ops(v["REUSE"])
    assert reuse["sdpa"] == 0 and not _inside(v["REUSE"], site_names)   # branch computation gone
    assert reuse["cache_write"] == len(runner.sitemap.stack_outputs)
    assert reuse["linear"] < full["linear"]

    skip = count_ops(v["SKIP"])
    assert skip["sdpa"] == 0 and skip["cache_write"] == 0 and not _inside(v["SKIP"], site_names)
    assert skip["linear"] < reuse["linear"] or family == "dit"

    subset = count_ops(v["SUBSET"])
    subsettable = [s for s in sites if s.subsettable]
    # one gather per site (its tokens), one more per parallel block (its cached attention rows)
    assert subset["gather"] - len(halves) == subset["scatter"] == len(subsettable) > 0
    assert subset["sdpa"] == sum(s.kind == "cross_attn" for s in sites)   # self-attention reused
    index_shapes = sorted(tuple(n.meta["example_value"].shape) for n in v["SUBSET"].graph.nodes
                          if n.op == "placeholder" and n.name.startswith("duca_index"))
    assert index_shapes == sorted((runner.layout.batch, int(RATIO * s.tokens[0])) for s in subsettable)
    assert not _inside(v["SUBSET"], [s.name for s in sites if not s.subsettable])


def _graphs(family, config, n=6):
    model, fast = compile_tiny(family, config)
    for i, t in enumerate(timesteps(n)):
        fast(**make_inputs(family, model, timestep=t, seed=i))
    runner, _ = state_of(fast).graphs()[0]
    from duca_compile.report import _variant_name
    return runner, {_variant_name(k).split("(")[0]: g for k, g in runner.variant_graphs.items()}


def _targets(gm):
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def test_taylor_variants_forecast_without_the_branches():
    from duca_compile import TaylorSeerConfig
    runner, v = _graphs("pixart", TaylorSeerConfig(interval=3, max_order=2, first_enhance=1))
    sites = runner.sitemap.sites
    reuse = v["REUSE"]
    assert count_ops(reuse)["sdpa"] == 0 and not _inside(reuse, [s.name for s in sites])
    coef = next(n for n in reuse.graph.nodes if n.op == "placeholder" and n.name.startswith("duca_taylor_coef"))
    assert len(coef.users) == 2 * len(sites)                 # a coefficient per site and order...
    assert _targets(reuse).count("mul.Tensor") >= 2 * len(sites)    # ...times orders 1 and 2
    # FULL writes the three Taylor terms of every site output and the stack output
    n_outputs = sum(len(s.outputs) for s in sites)
    assert count_ops(v["FULL"])["cache_write"] == 3 * n_outputs + len(runner.sitemap.stack_outputs)


def test_clusca_subset_propagates_and_kv_norm_full_records_value_norms():
    from duca_compile import ClusCaConfig, DuCaConfig
    runner, v = _graphs("dit", ClusCaConfig(interval=3, clusters=4, propagation=0.1, first_enhance=1))
    subset = v["SUBSET"]
    assigns = [n for n in subset.graph.nodes if n.op == "placeholder" and n.name.startswith("duca_assign")]
    assert len(assigns) == len(runner.sitemap.blocks) and all(n.users for n in assigns)
    assert _targets(subset).count("scatter.src") == len(runner.sitemap.blocks)
    assert count_ops(subset)["sdpa"] == 0                     # attention is forecast

    torch._dynamo.reset()
    runner, v = _graphs("dit", DuCaConfig(interval=3, ratio=0.25, selection="kv-norm"), n=3)
    assert _targets(v["FULL"]).count("linalg_vector_norm.default") == len(runner.sitemap.blocks)
    assert "linalg_vector_norm.default" not in _targets(v["SUBSET"])   # self-attention is not run there


def test_dead_code_removal_understands_in_place_writes():
    """Writes into a buffer nobody reads die (Wan's slice-by-slice RoPE kept a whole block alive in
    SKIP under FX's DCE); in-place writes into read buffers and graph inputs live."""
    import operator

    from duca_compile.passes.remove_dead_code import remove_dead_code

    g = torch.fx.Graph()
    x, cache = g.placeholder("x"), g.placeholder("cache")
    first = g.call_function(operator.getitem, (x, (Ellipsis, 0)))
    dead = g.call_function(torch.empty_like, (x,))                          # filled, never read: goes
    g.call_function(operator.setitem, (dead, (Ellipsis, 0), g.call_function(operator.mul, (first, 2))))
    live = g.call_function(torch.zeros_like, (x,))                          # filled, then read: stays
    g.call_function(operator.setitem, (live, (Ellipsis, 0), first))
    g.call_method("add_", (cache, 1))                                      # a graph input: stays
    y = g.call_method("clone", (x,))
    g.call_method("mul_", (y, 5))                                           # result unused, y read: stays
    g.output(g.call_function(operator.add, (live, y)))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)

    assert remove_dead_code(gm.graph) == 3                                  # empty_like, its setitem, the mul
    gm.recompile()
    assert [n.args[0] for n in gm.graph.nodes if n.target is operator.setitem] == [live]
    xv, cv = torch.randn(3, 4), torch.zeros(2)
    expected = torch.zeros(3, 4)
    expected[..., 0] = xv[..., 0]
    torch.testing.assert_close(gm(xv, cv), expected + 5 * xv)
    torch.testing.assert_close(cv, torch.ones(2))
