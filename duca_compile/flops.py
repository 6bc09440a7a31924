"""FLOP accounting: exact FLOPs of each compiled variant, per request and per method.

Every variant graph is counted once (memoized per runner and variant) by running it under
``torch.utils.flop_counter.FlopCounterMode`` on fake tensors shaped like the graph's inputs, so
nothing real runs and full-size models count on a CPU without their weights:

    duca_compile.stats(fast)["flop_ratio"]               # FLOPs run / FLOPs of the uncached model
    duca_compile.flops_report("dit-xl-2", FORAConfig(interval=3), num_steps=50, batch=2)   # full_size_flops.py

Conventions (those of ``FlopCounterMode``): a multiply-add is 2 FLOPs; only matmuls, convolutions
and attention are counted (norms, activations, gathers, cache copies count 0). CPU's fused
attention kernel, which ``FlopCounterMode`` does not know, is counted like the CUDA ones.
ClusCa's k-means runs outside the graph: it is estimated analytically and reported apart, as
``flops_clustering``, never inside ``flops_run``.
"""
from __future__ import annotations

import weakref
from collections import Counter

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import _torch
from .fallbacks import Fallback
from .policies import ClusCaConfig

__all__ = ["flop_counter", "count_flops", "variant_flops", "full_key", "runner_flops", "model_flops", "clustering_flops"]

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA fused attention kernels and the math path (bmm), not CPU's fused one.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode(display=False)`` that also counts CPU's fused attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` (no grad), counted by ``flop_counter()``."""
    with torch.no_grad(), flop_counter() as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# -- one variant --------------------------------------------------------------------------------

_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # graph -> {layout terms: {key: FLOPs}}


def full_key(runner) -> tuple:
    """The key of the variant computing every site (the uncached model, plus cache writes)."""
    return runner.key({s.name: "compute" for s in runner.sitemap.sites}, False)


def _actions_of(runner, key) -> tuple[dict, bool]:
    skip, items = key
    if skip:                    # a SKIP key names only the sites it still computes
        return {s.name: dict(items).get(s.name, "reuse") for s in runner.sitemap.sites}, True
    return dict(items), False


def _variant_graph(runner, key) -> fx.GraphModule:
    """The graph that runs plan ``key``: compiled for it apart, or its pattern's (any SUBSET k)."""
    if key not in runner.variant_graphs and runner.pattern(key) not in runner.variant_graphs:
        runner.variant(*_actions_of(runner, key))     # builds (and compiles with the inner compiler) once
    return runner.variant_graphs.get(key, runner.variant_graphs.get(runner.pattern(key)))


def _fake_inputs(runner, gm: fx.GraphModule, key, fake_mode) -> list:
    """One fake tensor per placeholder: duca's added ones shaped by the layout for this plan (a
    pattern's graph was built at other SUBSET sizes), Dynamo's by their ``example_value``."""
    specs = {c.placeholder: c for c in runner.layout.caches}
    specs.update({s.placeholder: s for s in runner.layout.inputs(_actions_of(runner, key)[0])})
    return _placeholder_fakes(gm, specs, fake_mode)


def _placeholder_fakes(gm: fx.GraphModule, specs: dict, fake_mode) -> list:
    out = []
    with fake_mode:
        for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
            val = node.meta.get("example_value")
            if node.name in specs:
                s = specs[node.name]
                out.append(torch.empty(s.shape, dtype=s.dtype, device=s.device))
            elif isinstance(val, torch.Tensor):
                out.append(torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype,
                                               device=val.device))
            elif val is not None and not isinstance(val, (torch.SymInt, torch.SymFloat)):
                out.append(val)          # a Python constant input
            else:
                raise ValueError(f"duca flops: no static example value for graph input {node.name!r}")
    return out


def variant_flops(runner, key) -> int:
    """FLOPs of one call of the variant ``key`` of ``runner``'s graph (memoized). Counted on
    fake tensors in a fresh ``FakeTensorMode``: nothing real runs, any model size works. A
    variant not built yet is built first, with the runner's inner compiler. Plans sharing one
    compiled SUBSET graph are counted once, with each site's k symbolic."""
    memo = _memo(runner)[0]
    if key not in memo:
        per_k = _symbolic_flops(runner, key) if key not in runner.variant_graphs else None
        if per_k is not None:
            memo[key] = per_k(key)
        else:
            gm = _variant_graph(runner, key)
            fake_mode = _torch.FakeTensorMode(allow_non_fake_inputs=True)
            inputs = _fake_inputs(runner, gm, key, fake_mode)
            with fake_mode:
                memo[key] = count_flops(gm, *inputs)
    return memo[key]


_GRAPH_FLOPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # graph -> FLOPs of one call


def graph_flops(gm: fx.GraphModule) -> int:
    """FLOPs of one call of a graph whose placeholders all carry example values (adaptive caching's
    three graphs and the graph they were cut from), on fake tensors (memoized)."""
    if gm not in _GRAPH_FLOPS:
        fake_mode = _torch.FakeTensorMode(allow_non_fake_inputs=True)
        inputs = _placeholder_fakes(gm, {}, fake_mode)
        with fake_mode:
            _GRAPH_FLOPS[gm] = count_flops(gm, *inputs)
    return _GRAPH_FLOPS[gm]


def _memo(runner) -> tuple[dict, dict]:
    """(variant key -> FLOPs, SUBSET pattern -> per-k FLOPs or None), shared by the runners of one
    Dynamo graph whose caches hold the same terms: a variant's FLOPs depend on its graph and
    actions alone, so ``flops_report`` counts each pattern once for every config of a model."""
    layout = runner.layout
    graph = getattr(getattr(runner, "build", None), "gm", runner)
    per_graph = _MEMO.setdefault(graph, {})
    return per_graph.setdefault((layout.orders, layout.propagation, bool(layout.value_norms)), ({}, {}))


def _symbolic_flops(runner, key):
    """FLOPs of ``key``'s pattern graph as a function of a plan's SUBSET sizes, counted once with
    one symbol per index input's k (``FlopCounterMode`` then sums symbolic FLOPs); None when the
    pattern has no SUBSET site, or when counting fixed a k (the expression would not hold)."""
    pattern = runner.pattern(key)
    known = _memo(runner)[1]
    if pattern in known:
        return known[pattern]
    known[pattern] = None
    actions = _actions_of(runner, key)[0]
    specs = [s for s in runner.layout.inputs(actions) if s.kind == "index"]
    if not specs:
        return None
    gm = _variant_graph(runner, key)
    shape_env = _torch.ShapeEnv(duck_shape=False)
    fake_mode = _torch.FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
    inputs = _fake_inputs(runner, gm, key, fake_mode)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = {}
    try:
        with fake_mode:
            for spec in specs:
                sym = shape_env.create_symbol(spec.shape[1], _torch.ConstantSource(f"duca_k_{spec.placeholder}"))
                k = shape_env.create_symintnode(sym, hint=spec.shape[1])
                inputs[placeholders.index(spec.placeholder)] = torch.empty((spec.shape[0], k), dtype=spec.dtype,
                                                                           device=spec.device)
                symbols[spec.site] = sym
            total = count_flops(gm, *inputs)
        expr = total.node.expr if isinstance(total, torch.SymInt) else None
        fixed = any(sym in shape_env.replacements for sym in symbols.values())
    except RuntimeError as e:      # symbolic shapes could not follow k (a guard on it, data dependence)
        return _per_plan(runner, pattern, f"{type(e).__name__}: {e}"[:200])
    if fixed or (expr is not None and not expr.free_symbols <= set(symbols.values())):
        return _per_plan(runner, pattern, "counting fixed a k" if fixed else "the count depends on more than k")

    def per_k(plan_key) -> int:
        if expr is None:
            return int(total)
        sizes = {sym: dict(plan_key[1])[site] for site, sym in symbols.items()}
        return int(expr.xreplace(sizes))

    known[pattern] = per_k
    return per_k


def _per_plan(runner, pattern, why: str) -> None:
    """Count ``pattern``'s plans one by one (``variant_flops`` builds each plan's graph), and say so."""
    runner.fallbacks.append(Fallback("flops_per_plan", _pattern_text(pattern), why))
    return None


def _pattern_text(pattern) -> str:
    skip, items = pattern
    return f"{'SKIP' if skip else 'SUBSET'} pattern of {sum(a == 'subset' for _, a in items)} SUBSET sites"


def _site_tokens(site, action, skip) -> int:
    if action == "reuse" or (skip and action != "compute"):
        return 0
    return sum(site.tokens) if action == "compute" else int(action)


def clustering_flops(runner, cold: bool = False) -> int:
    """Analytic FLOPs of ClusCa's k-means after one FULL call of ``runner``'s graph (0 for other
    methods): per token count N, ``(5·iters + 3)·B·N·K·C`` — each Lloyd step is an L1 ``cdist``
    (subtract, abs, add: 3 per element pair and channel) plus the one-hot centroid matmul (2),
    and a last ``cdist`` assigns the tokens. Representative picking is O(B·N·K), ignored.
    ``cold``: a request's first clustering (``kmeans_cold_iters``)."""
    config = runner.config
    if runner.layout.propagation is None or not isinstance(config, ClusCaConfig):
        return 0
    from .passes import order_key

    shapes = {c.key: c.shape for c in runner.layout.caches}
    stack = [shapes[f"stack:{i}"] for i in range(len(runner.sitemap.stack_outputs))]
    total = 0
    for tokens in sorted({s.tokens[0] for s in runner.sitemap.sites if s.subsettable}):
        shape = next((s for s in stack if len(s) == 3 and s[1] == tokens), None)
        if shape is None:
            last = [s for s in runner.sitemap.sites if s.subsettable and s.tokens[0] == tokens][-1]
            shape = shapes[order_key(last.name, 0)]
        b, n, c = shape[0], shape[1], shape[-1]
        iters = config.kmeans_cold_iters if cold else config.kmeans_iters
        total += (5 * iters + 3) * b * n * min(config.clusters, n) * c
    return total


def runner_flops(runner, calls: Counter | dict, cold_clusterings: int = 0) -> dict:
    """FLOP accounting of ``calls`` (variant key -> calls) of ``runner``'s graph; ClusCa clustered
    after every FULL call, ``cold_clusterings`` of them from random tokens."""
    calls = {k: n for k, n in calls.items() if n}
    full = variant_flops(runner, full_key(runner)) if calls else 0
    run = sum(n * variant_flops(runner, k) for k, n in calls.items())
    tokens = Counter()
    for (skip, items), n in calls.items():
        actions = dict(items)
        for site in runner.sitemap.sites:
            tokens[site.name] += n * _site_tokens(site, actions.get(site.name, "reuse"), skip)
    full_calls = calls.get(full_key(runner), 0)
    return {"flops_run": run, "flops_full": full * sum(calls.values()),
            "flops_clustering": (full_calls - cold_clusterings) * clustering_flops(runner)
                                + cold_clusterings * clustering_flops(runner, cold=True),
            "tokens_per_site": {s.name: tokens[s.name] for s in runner.sitemap.sites}}


def model_flops(state) -> dict:
    """What ``duca_compile.stats`` adds: FLOPs run and FLOPs the uncached model would have run
    over every call so far, their ratio, ClusCa's clustering estimate and tokens computed per site
    (summed over calls and, for a model split into several graphs, over graphs)."""
    out = {"flops_run": 0, "flops_full": 0, "flops_clustering": 0, "tokens_per_site": Counter()}
    for runner, piece in state.graphs():
        r = runner.flops(piece) if hasattr(runner, "flops") else \
            runner_flops(runner, piece.variant_calls, piece.cold_clusterings)
        state.note_fallbacks(runner.fallbacks)          # counting may have had to go plan by plan
        if piece.names is not None and state.regional is not None:      # a block of a regional model
            r["tokens_per_site"] = {piece.names[k]: v for k, v in r["tokens_per_site"].items()}
            if not any(b.piece is piece and state.regional.is_last(b) for b in state.regional.views):
                r["flops_clustering"] = 0          # clustered once per model call, after the last block
        for k in ("flops_run", "flops_full", "flops_clustering"):
            out[k] += r[k]
        out["tokens_per_site"].update(r["tokens_per_site"])
    out["tokens_per_site"] = dict(out["tokens_per_site"])
    out["flop_ratio"] = out["flops_run"] / out["flops_full"] if out["flops_full"] else 1.0
    return out
