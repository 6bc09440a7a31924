"""Run by ``tests/test_context_parallel.py`` under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Per family: a tiny model in one process and its seeded twin split over the ranks with diffusers'
context parallelism (``enable_parallelism``), both compiled with the same duca backend (eager
inner); per step both outputs, and per variant of the CP graph its collectives and attentions.
Then DuCa with SUBSET steps under CP, per step against the eager oracle (``subset_vs_oracle``).
Rank 0 writes the findings as JSON to argv[1].

Test-only shims, not the product: a CPU-only torch reports ``torch.accelerator.device_count() == 0``
(diffusers divides by it); the text is 6 tokens so that it splits over 2 ranks; Wan's CP split hook
logs a warning (a graph break: the logger is ignored) and inspects its block's signature on first
use (one eager forward first).
"""
import dataclasses
import json
import logging
import sys

import torch
import torch.distributed as dist

STEPS = 6
MODES = ("full", "reuse", "skip")


def _variant_ops(runner) -> dict:
    """Per variant its collectives and attentions (the CPU flash kernel ring attention runs included)."""
    from duca_compile.report import _variant_name, count_collectives

    out = {}
    for key, graph in runner.variant_graphs.items():
        ops = count_collectives(graph)
        ops["sdpa"] = sum(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in graph.graph.nodes)
        out[_variant_name(key)] = {k: v for k, v in ops.items() if v}
    return out


def _attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """TEST-ONLY forward of diffusers' native attention: ring attention merges the ranks' partial
    results by their log-sum-exp, which the native op refuses to return; the CPU flash kernel has it."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))          # [B, S, H, D] -> [B, H, S, D]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                       attn_mask=attn_mask, scale=scale)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _inputs(family, model, t, seed):
    from duca_compile.models import make_inputs

    kw = make_inputs(family, model, timestep=t, seed=seed)
    if family == "flux2":        # its _cp_plan splits the ids as [batch, seq, 4]
        for k in ("img_ids", "txt_ids"):
            kw[k] = kw[k].unsqueeze(0).expand(2, -1, -1).contiguous()
    if family == "ltx-video":    # LTX's CP cross-attention cannot reshape a text mask (fails uncached too)
        kw["encoder_attention_mask"] = None
    return kw


def run_family(name: str) -> dict:
    import diffusers.models.attention_dispatch as dispatch
    from diffusers import ContextParallelConfig

    import duca_compile
    from duca_compile import ScriptedConfig
    from duca_compile.models import make_model
    from duca_compile.runtime import state_of

    def inputs(model, t, seed):
        return _inputs(family, model, t, seed)

    family, ring = name.removesuffix("-ring"), name.endswith("-ring")
    world = dist.get_world_size()
    if ring:
        dispatch._native_attention_forward_op = _attention_with_lse
    config = ScriptedConfig(modes=MODES)
    single_model, cp_model = make_model(family), make_model(family)
    cp_model.enable_parallelism(config=ContextParallelConfig(ring_degree=world) if ring else
                                ContextParallelConfig(ulysses_degree=world))
    ts = [900.0 - i * 800.0 / (STEPS - 1) for i in range(STEPS)]
    if family == "wan":
        cp_model(**inputs(cp_model, 950.0, 99))
    single = torch.compile(single_model, backend=duca_compile.duca_backend(config, inner="eager"), dynamic=False)
    cp = torch.compile(cp_model, backend=duca_compile.duca_backend(config, inner="eager"), dynamic=False)
    steps = []
    for request in range(2):
        with torch.compiler.set_stance("fail_on_recompile") if request else torch.no_grad():
            for i, t in enumerate(ts):
                kw = inputs(single_model, t, i)
                want, got = single(**kw)[0], cp(**kw)[0]
                steps.append({"mode": state_of(cp).last_plan.mode.value,
                              "single_mode": state_of(single).last_plan.mode.value,
                              "diff": (got - want).abs().max().item()})
    cp_runner, _ = state_of(cp).graphs()[0]
    single_runner, _ = state_of(single).graphs()[0]
    s = duca_compile.stats(cp, flops=False)
    return {"steps": steps,
            "sites": [x.name for x in cp_runner.sitemap.sites],
            "single_sites": [x.name for x in single_runner.sitemap.sites],
            "variants": _variant_ops(cp_runner), "single_variants": _variant_ops(single_runner),
            "cache_hits": s["cache_hits"], "requests": s["requests"], "uncached": s["uncached"]}
    # (the ring shim stays for the rest of the run: later families are Ulysses, which never asks for the LSE)


def _global_positions(local: torch.Tensor, tokens: int, rank: int, world: int, streams: tuple[int, int]):
    """A rank's token indices of a site as positions in one process's sequence. Every stream is
    split in contiguous shards. A parallel block (Flux's single blocks) concatenates each rank's
    text shard before its image shard, while one process holds all text before all image tokens."""
    text, image = streams
    if tokens != text + image:
        return rank * tokens + local
    return torch.where(local < text, rank * text + local, world * text + rank * image + (local - text))


def _stream_tokens(sites) -> tuple[int, int]:
    """(text, image) tokens per rank, read off the first dual-stream block's feed-forwards; (0, 0)
    for a model without one."""
    by_name = {x.name: x.tokens[0] for x in sites}
    ff = next((n for n in by_name if n.endswith(".ff") and n + "_context" in by_name), None)
    return (by_name[ff + "_context"], by_name[ff]) if ff else (0, 0)


def subset_vs_oracle(name: str) -> dict:
    """DuCa (conservative steps: SUBSET) under CP, every step against the eager oracle on the
    one-process twin given the same global token set (the ranks' shares, gathered), and the
    kv-norm scores each rank recorded against one process's for the same tokens."""
    from diffusers import ContextParallelConfig

    import duca_compile
    from duca_compile.models import make_model
    from duca_compile.reference import ReferenceCache
    from duca_compile.runtime import state_of

    family, ring = name.removesuffix("-ring"), name.endswith("-ring")
    world = dist.get_world_size()
    # ring attention runs through the test's LSE kernel, which kv-norm cannot read a value from
    # the step weight gives the two SUBSET steps other k's: one variant serves both
    config = duca_compile.DuCaConfig(interval=3, ratio=0.5, selection="random" if ring else "kv-norm",
                                     soft_fresh_weight=0.25, spatial_grid=2, spatial_bonus=0.4,
                                     ratio_schedule=duca_compile.RatioSchedule(step_weight=0.5))
    single_model, cp_model, oracle_model = make_model(family), make_model(family), make_model(family)
    cp_model.enable_parallelism(config=ContextParallelConfig(ring_degree=world) if ring else
                                ContextParallelConfig(ulysses_degree=world))
    if family == "wan":
        cp_model(**_inputs(family, cp_model, 950.0, 99))
    backend = duca_compile.duca_backend(config, inner="eager")
    cp = torch.compile(cp_model, backend=backend, dynamic=False)
    single = torch.compile(single_model, backend=backend, dynamic=False)
    refused = None
    if ring:                    # kv-norm has no value to read there: refused when the graph compiles
        kv = torch.compile(cp_model, backend=duca_compile.duca_backend(
            dataclasses.replace(config, selection="kv-norm", ratio_schedule=None), inner="eager"), dynamic=False)
        try:
            kv(**_inputs(family, cp_model, 900.0, 0))
        except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
            refused = f"{type(e).__name__}: {e}"[:500]
        torch._dynamo.reset()
    steps, score_diff, scored = [], 0.0, 0
    driver = duca_compile.sampling(cp, num_steps=6)
    driver.__enter__()
    for i, t in enumerate(900.0 - j * 160.0 for j in range(6)):
        kw = _inputs(family, single_model, t, i)
        got = cp(**kw)[0]
        st = state_of(cp)
        if i == 0:
            oracle = ReferenceCache.from_compiled(oracle_model, cp)
            cp_runner, cp_piece = st.graphs()[0]
            sites = cp_runner.sitemap.sites
            streams = _stream_tokens(sites)
        idx, per_rank = {}, {}          # site -> global indices [batch, world x k]; and each rank's share
        for site, local in st.last_indices.items():
            shares = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(shares, local.contiguous())
            tokens = next(x.tokens[0] for x in sites if x.name == site)
            per_rank[site] = [_global_positions(s, tokens, r, world, streams) for r, s in enumerate(shares)]
            idx[site] = torch.cat(per_rank[site], 1)
        actions = {n: a * world if isinstance(a, int) else a for n, a in st.last_actions.items()}
        want = oracle.run(actions, st.last_skip, idx, slot=st.slot, step=st.step, **kw)[0]
        steps.append({"mode": st.last_plan.mode.value, "diff": (got - want).abs().max().item(),
                      "tokens": {s: [v[0].tolist() for v in shares] for s, shares in per_rank.items()}})
        if i == 0 and config.selection == "kv-norm":
            single(**kw)
            _, single_piece = state_of(single).graphs()[0]
            for key, local in cp_piece.slots[0].by_key.items():
                if key.startswith("vnorm:"):
                    shares = [torch.empty_like(local) for _ in range(world)]
                    dist.all_gather(shares, local)
                    block, tokens = key.rsplit(":", 1)[0], int(key.rsplit(":", 1)[1])
                    one = single_piece.slots[0].by_key[f"{block}:{tokens * world}"]
                    pos = torch.cat([_global_positions(torch.arange(tokens), tokens, r, world, streams)
                                     for r in range(world)])
                    score_diff = max(score_diff, (torch.cat(shares, 1) - one[:, pos]).abs().max().item())
                    # scores mixed with staleness are normalised over the global tokens
                    unit = [torch.empty_like(local) for _ in range(world)]
                    dist.all_gather(unit, st.selector._normalize(local))
                    want = torch.nn.functional.normalize(one[:, pos], dim=-1)
                    score_diff = max(score_diff, (torch.cat(unit, 1) - want).abs().max().item())
                    scored += 1
    driver.__exit__(None, None, None)
    s = duca_compile.stats(cp)
    stats, offsets = [None] * world, [None] * world
    dist.all_gather_object(offsets, st.seed_offset)
    dist.all_gather_object(stats, {k: s[k] for k in ("cache_hits", "steps", "tokens_per_site", "flop_ratio")})
    subset_ops = next(ops for name, ops in _variant_ops(cp_runner).items() if name.startswith("SUBSET"))
    return {"steps": steps, "score_diff": score_diff, "scored": scored, "stats": stats, "subset_ops": subset_ops,
            "subsettable": [x.name for x in sites if x.subsettable],
            "site_tokens": {x.name: x.tokens[0] for x in sites}, "seed_offsets": offsets, "kv_norm_refused": refused,
            "reasons": {x.name: x.subset_reason for x in sites if getattr(x, "subset_reason", None)}}


def pipeline_under_cp() -> dict:
    """``duca_compile.enable(pipe)`` on a Flux pipeline whose transformer runs context-parallel,
    against the same pipeline in one process."""
    from diffusers import ContextParallelConfig

    import duca_compile
    from duca_compile.models import make_pipeline, pipeline_call_kwargs

    def run(pipe):
        g = torch.Generator().manual_seed(1)
        kw = pipeline_call_kwargs("flux", pipe, 4, prompt_embeds=torch.randn(1, 6, 24, generator=g))
        return pipe(**kw)[0]

    outs = []
    for parallel in (False, True):
        torch._dynamo.reset()
        pipe = make_pipeline("flux")
        pipe.set_progress_bar_config(disable=True)
        if parallel:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
        duca_compile.enable(pipe, duca_compile.FORAConfig(interval=2), inner="eager")
        outs.append(run(pipe))
        s = duca_compile.stats(pipe.transformer, flops=False)
    return {"diff": (outs[1] - outs[0]).abs().max().item(), "cache_hits": s["cache_hits"], "steps": s["steps"]}


def adaptive_under_cp() -> dict:
    """AdaptiveConfig on Flux split over the ranks (Ulysses) against one process: the decisions,
    per rank, and the outputs of a request with the same inputs; then a request whose inputs differ
    per rank (each rank's shard comes from its own tensor), whose decisions must still agree."""
    from diffusers import ContextParallelConfig

    import duca_compile
    from duca_compile import AdaptiveConfig
    from duca_compile.adaptive import decisions
    from duca_compile.models import make_model

    world, rank = dist.get_world_size(), dist.get_rank()
    config = AdaptiveConfig(threshold=0.3)
    single_model, cp_model = make_model("flux"), make_model("flux")
    cp_model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    single = torch.compile(single_model, backend=duca_compile.duca_backend(config, inner="eager"), dynamic=False,
                           fullgraph=True)
    cp = torch.compile(cp_model, backend=duca_compile.duca_backend(config, inner="eager"), dynamic=False)

    def request(fn, nudge=0.0):
        kw = _inputs("flux", single_model, 900.0, 0)
        x, outs = kw.pop("hidden_states"), []
        x = x + nudge * torch.randn(x.shape, generator=torch.Generator().manual_seed(rank))
        for i in range(8):
            kw["timestep"] = torch.full_like(kw["timestep"], 900.0 - i * 100.0)
            out = fn(**kw, hidden_states=x)[0]
            outs.append(out)
            x = x - 0.05 * out
        return outs

    want, got = request(single), request(cp)
    same = [[d["computed"] for d in decisions(cp)], [d["computed"] for d in decisions(single)]]
    diffs = [[d["diff"] for d in decisions(cp)], [d["diff"] for d in decisions(single)]]
    request(cp, nudge=0.5)
    local = [d["computed"] for d in decisions(cp)]
    local_diffs = [d["diff"] for d in decisions(cp)]
    every = [None] * world
    dist.all_gather_object(every, (local, local_diffs))
    s = duca_compile.stats(cp, flops=False)
    from duca_compile.report import count_collectives
    from duca_compile.runtime import state_of

    runner = next(r for r, _ in state_of(cp).graphs())
    return {"head_collectives": dict(count_collectives(runner.variant_graphs["HEAD"])), "cp": same[0], "single": same[1], "cp_diffs": diffs[0], "single_diffs": diffs[1],
            "worst": max((a - b).abs().max().item() for a, b in zip(got, want)),
            "per_rank": [e[0] for e in every], "per_rank_diffs": [e[1] for e in every],
            "decision_reads": s["decision_reads"], "uncached": s["uncached"]}


def main(out_path: str, families: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    import transformers.utils.logging  # noqa: F401  (installs Logger.warning_once)

    from duca_compile.models import inputs as recipes

    recipes.TEXT_LEN = 6
    torch._dynamo.config.ignore_logging_functions.add(logging.Logger.warning_once)
    found = {}
    with torch.no_grad():
        for family in families:
            torch._dynamo.reset()
            try:
                found[family] = run_family(family)
                torch._dynamo.reset()
                found[family]["oracle"] = subset_vs_oracle(family)
            except Exception as e:       # noqa: BLE001 - reported to the test, which fails on it
                found[family] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        try:
            torch._dynamo.reset()
            found["adaptive"] = adaptive_under_cp()
        except Exception as e:           # noqa: BLE001
            found["adaptive"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        try:
            found["pipeline"] = pipeline_under_cp()
        except Exception as e:           # noqa: BLE001
            found["pipeline"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(found, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
