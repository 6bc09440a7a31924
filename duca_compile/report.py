"""What a compiled model did (``stats``) and how its graphs were rewritten (``explain``)."""
from __future__ import annotations

from collections import Counter

import torch

from . import _torch
from .passes.graph_paths import is_collective
from .policies import Mode
from .policies.base import effective_mode
from .runtime import state_of

__all__ = ["stats", "explain"]

_HEAVY = {"linear": (_torch.linear_op, torch.ops.aten.linear.default, torch.ops.aten.addmm.default,
                     torch.ops.aten.mm.default),
          "sdpa": (torch.nn.functional.scaled_dot_product_attention,
                   torch.ops.aten.scaled_dot_product_attention.default),
          "gather": (torch.ops.aten.gather.default,),
          "scatter": (torch.ops.aten.scatter_.src, torch.ops.aten.scatter.src),
          "cache_write": (torch.ops.aten.copy_.default,)}


def _require(model):
    st = state_of(model)
    if st is None:
        raise ValueError(f"{type(model).__name__} was not compiled with the duca backend, or has not been called "
                         "yet (the caching state of a model is made by its first call)")
    return st


def stats(model, flops: bool = True) -> dict:
    """Calls per mode, tokens computed, requests seen, cache hits (in total and per block),
    resets, compile time, ``cache_bytes`` (memory held by caches and Taylor terms, every slot and
    shape), ``uncached``: why graphs of the model (if any) run plainly, and ``fallbacks``: where
    duca did something other than the method asked, reason -> places (``duca_compile.fallbacks``;
    ``explain()`` lists each).

    With ``flops`` (counted lazily here, once per variant, on fake tensors: see ``duca_compile.flops``):
    ``flops_run`` (FLOPs of every call so far), ``flops_full`` (what the uncached model would have
    run for the same calls), ``flop_ratio``, ``tokens_per_site`` (tokens computed per site) and
    ``flops_clustering`` (ClusCa's k-means, an analytic estimate not included in ``flops_run``).
    """
    st = _require(model)
    if flops:
        from .flops import model_flops

        counted = model_flops(st)          # first: counting can add a fallback
    out = st.stats.as_dict()
    out["config"] = st.config
    out["uncached"] = list(st.uncached)
    out["cache_bytes"] = sum(piece.cache_bytes() for _, piece in st.graphs())
    if st.regional is not None and st.regional.adaptive is not None:
        out["cache_bytes"] += st.regional.adaptive.cache_bytes()
    out["token_ratio"] = out["tokens_computed"] / out["tokens_total"] if out["tokens_total"] else 1.0
    if flops:
        out.update(counted)
    return out


def count_ops(gm) -> dict:
    """How many heavy ops (linear, SDPA), gathers, scatters and cache writes a graph contains."""
    counts = {k: 0 for k in _HEAVY}
    for n in gm.graph.nodes:
        for k, targets in _HEAVY.items():
            if n.op == "call_function" and n.target in targets:
                counts[k] += 1
    return counts


def count_collectives(gm) -> Counter:
    """The collectives a graph issues, by name (``all_to_all_single``, ...; waits not counted): what a
    step of it communicates under context parallelism."""
    return Counter(str(n.target).replace("_c10d_functional.", "").replace(".default", "") for n in gm.graph.nodes
                   if is_collective(n) and not is_collective(n, "wait_tensor"))


_LETTERS = {"full": "F", "subset": "C", "skip": "A", "reuse": "R", "partial": "P"}


def _plan(runner, num_steps: int | None) -> list[dict]:
    """The policy's plan for every step: mode and the per-site actions that are not "reuse"."""
    if num_steps is None:
        return []
    steps = []
    for step in range(num_steps):
        plan, actions, skip = runner.plan_step(step, num_steps)
        mode = "full" if step == 0 else plan.mode.value          # a request's first step is always FULL
        steps.append({"step": step, "mode": mode,
                      "computed": {} if mode == "full" else
                      {k: a for k, a in actions.items() if a != "reuse"}})
    return steps


def _site_entry(s) -> dict:
    entry = {"name": s.name, "kind": s.kind, "outputs": len(s.outputs), "tokens": s.tokens,
             "subset": s.subsettable or s.subset_reason, "latent": s.latent}
    if s.parallel_subset:   # computed on k tokens beside its cached attention channels
        entry["attention_channels"] = list(s.attention_channels)
    return entry


def explain(model, as_text: bool = True, num_steps: int | None = None):
    """Blocks and branch sites found in each graph, the ops of each variant built so far and, given
    ``num_steps`` (or after a request whose length is known), the plan of every step."""
    st = _require(model)
    num_steps = num_steps or st.num_steps
    graphs = [_regional_entry(st.regional, num_steps)] if st.regional is not None else []
    for runner, _ in st.pieces.items():
        graphs.append({
            "blocks": list(runner.sitemap.blocks),
            "sites": [_site_entry(s) for s in runner.sitemap.sites],
            "stack_outputs": list(runner.sitemap.stack_outputs),
            "variants": {k if isinstance(k, str) else _variant_name(k): count_ops(g)
                         for k, g in runner.variant_graphs.items()},
            "plan": _plan(runner, num_steps) if hasattr(runner, "plan_step") else [],
        })
        if hasattr(runner, "split"):           # adaptive caching: where the graph was cut, what was decided
            piece = st.pieces[runner]
            graphs[-1]["adaptive"] = {"head": list(runner.split.head), "middle": list(runner.split.middle),
                                      "tail": list(runner.split.tail), "crossing": len(runner.split.crossing),
                                      "decisions": [dict(d) for d in piece.decisions]}
    if not as_text:
        return graphs
    lines = [f"duca: {st.config!r}"]
    if not graphs:
        lines.append("no graph of this model is cached; it runs plainly")
    for why in st.uncached:
        lines.append(f"uncached graph piece: {why}")
    for fb in st.fallbacks.values():
        lines.append(f"fallback [{fb.reason}] at {fb.where}: {fb.detail}")
    for i, g in enumerate(graphs):
        if g.get("regional"):
            lines.append(f"regional: {len(g['blocks'])} blocks compiled one by one in {len(g['graphs'])} block "
                         f"graphs ({', '.join(g['graphs'])}), {len(g['sites'])} sites")
            lines.append(f"  {g['skip']}")
        else:
            lines.append(f"graph {i}: {len(g['blocks'])} blocks, {len(g['sites'])} sites, "
                         f"stack output {g['stack_outputs']}")
        if "adaptive" in g:
            a = g["adaptive"]
            lines.append(f"  adaptive: head {a['head']}, {len(a['middle'])} middle blocks cached as one residual, "
                         f"tail {a['tail']}" + (f"; {a['crossing']} values cross from HEAD in caches"
                                                if a["crossing"] is not None else ""))
            if a["decisions"]:
                lines.append("  last request: " + "".join("C" if d["computed"] else "." for d in a["decisions"])
                             + "  (C computed, . cached)")
        for s in g["sites"]:
            if "adaptive" in g:                # no per-site caching: the sites only say what was found
                lines.append(f"  {s['name']:45s} {s['kind']:10s} tokens={s['tokens']}")
                continue
            sub = "subset ok" if s["subset"] is True else f"no subset: {s['subset']}"
            if "attention_channels" in s:
                sub += ", attention half cached (channels {}:{})".format(*s["attention_channels"])
            lines.append(f"  {s['name']:45s} {s['kind']:10s} tokens={s['tokens']} ({sub})")
        for name, ops in g["variants"].items():
            lines.append(f"  variant {name:20s} " + " ".join(f"{k}={v}" for k, v in ops.items()))
        if g["plan"]:
            lines.append("  plan: " + " ".join(_LETTERS[p["mode"]] for p in g["plan"])
                         + "  (F full, C conservative, A aggressive, R reuse, P partial)")
            for p in g["plan"]:
                if p["computed"]:
                    lines.append(f"    step {p['step']:3d} {p['mode']:8s} " +
                                 ", ".join(f"{k.rsplit('.', 2)[-2]}.{k.rsplit('.', 1)[-1]}={a}"
                                           for k, a in p["computed"].items()))
    return "\n".join(lines)


def _regional_entry(stack, num_steps: int | None) -> dict:
    """``explain``'s entry for a model compiled block by block: its blocks and sites under their
    real names, each block graph's variants, and the plan the blocks share."""
    from .adaptive_blocks import ADAPTIVE_IN_REGIONAL
    from .regional import SKIP_IN_REGIONAL

    runners = list(dict.fromkeys(r for r, _ in stack.graphs()))
    label = {}
    for r in runners:
        served = [b.name for b in stack.blocks if b.runner() is r]
        label[r] = served[0] if len(served) == 1 else f"{served[0]} ... {served[-1]} ({len(served)} blocks)"
        if getattr(r, "leader", None) in runners:
            label[r] += f": runs graph {runners.index(r.leader)}'s variants"
    return {
        "regional": True,
        "blocks": [b.name for b in stack.blocks],
        "graphs": [label[r] for r in runners],
        "sites": [_site_entry(s) for s in stack.sites],
        "stack_outputs": list(runners[-1].sitemap.stack_outputs) if runners else [],
        "variants": {f"graph {i}: {_variant_name(k)}": count_ops(g) for i, r in enumerate(runners)
                     if getattr(r, "leader", None) not in runners for k, g in r.variant_graphs.items()},
        "plan": _plan(stack, num_steps) if stack.adaptive is None else [],
        "skip": SKIP_IN_REGIONAL if stack.adaptive is None else ADAPTIVE_IN_REGIONAL,
        **({"adaptive": _adaptive_blocks_entry(stack)} if stack.adaptive is not None else {}),
    }


def _adaptive_blocks_entry(stack) -> dict:
    a, names = stack.adaptive, [b.name for b in stack.blocks]
    fn, bn = a.config.head_blocks, a.config.tail_blocks
    middle = names[fn:len(names) - bn] if a.length is not None and not a.refused else []
    return {"head": names[:fn], "middle": middle, "tail": names[len(names) - bn:] if middle and bn else [],
            "crossing": None, "decisions": [dict(d) for d in a.decisions]}


def _variant_name(key) -> str:
    if isinstance(key, str):                   # adaptive caching's graphs: named
        return key
    skip, actions = key
    mode = effective_mode(dict(actions), skip)
    computed = sum(a == "compute" for _, a in actions)
    if mode is Mode.PARTIAL:
        return f"PARTIAL({computed} computed)"
    if mode is Mode.SKIP and computed:
        return f"SKIP({computed} computed)"     # full blocks refreshing their caches
    if mode is not Mode.SUBSET:
        return mode.name
    ks = sorted({a for _, a in actions if isinstance(a, int)})
    sized = f"k={','.join(map(str, ks))}" if ks else f"any k at {sum(a == 'subset' for _, a in actions)} sites"
    return f"SUBSET({sized}" + (f"; {computed} computed)" if computed else ")")
