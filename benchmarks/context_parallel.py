"""``python -m benchmarks speed --world 2``: duca on diffusers' context parallelism (Ulysses).

Launches ``torchrun --nproc_per_node=<world>`` on this file; each rank holds a shard of the tokens
of a random-init Flux-like transformer. Per row (plain ``torch.compile`` under CP, duca FULL every
step, FORA, DuCa), one request of ``steps`` transformer calls: wall-clock (median of ``repeats``
after a warm-up request), its ratio to plain CP compile, the per-rank FLOP ratio, and the
collectives each kind of step runs (counted in the graphs: Dynamo's for plain, each variant's for
duca). Every row is compiled and warmed up first, then the timed requests go round robin over
the rows. On CPU the ranks talk over gloo; on GPU over NCCL.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
             num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
             axes_dims_rope=(8, 12, 12))
SIDE, TEXT = 16, 16          # 256 image tokens, 16 text tokens: both split over the ranks


def launch(world: int, steps: int, repeats: int, inner: str, out: str) -> dict:
    """Run the ranks; rank 0's findings (JSON)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           out, str(steps), str(repeats), inner]
    subprocess.run(cmd, env=env, check=True)
    with open(out) as f:
        return json.load(f)


def _rank_main(out: str, steps: int, repeats: int, inner: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, FluxTransformer2DModel

    import duca_compile
    from duca_compile.report import _variant_name, count_collectives
    from duca_compile.runtime import state_of

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", dist.get_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1       # diffusers divides by it; a CPU-only torch says 0
    world = dist.get_world_size()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    rows, found = [], {}

    def inputs(t):
        f, r, c = torch.meshgrid(torch.zeros(1), torch.arange(SIDE).float(), torch.arange(SIDE).float(), indexing="ij")
        img_ids = torch.stack([f.flatten(), r.flatten(), c.flatten()], -1)
        return {k: v.to(device) for k, v in dict(
            hidden_states=torch.randn(1, SIDE * SIDE, MODEL["in_channels"], generator=g),
            encoder_hidden_states=torch.randn(1, TEXT, MODEL["joint_attention_dim"], generator=g),
            pooled_projections=torch.randn(1, MODEL["pooled_projection_dim"], generator=g),
            timestep=torch.full((1,), t), img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3)).items()}

    calls = [inputs(1.0 - i / steps) for i in range(steps)]
    configs = {"plain torch.compile": None, "duca FULL only": duca_compile.ScriptedConfig(modes=("full",)),
               "FORA (N=2)": duca_compile.FORAConfig(interval=2),
               "DuCa (N=3, r=0.3)": duca_compile.DuCaConfig(interval=3, ratio=0.3)}
    fast, graphs, warm = {}, {}, {}
    torch._dynamo.reset()
    for name, config in configs.items():      # one model each; 4 entries stay under Dynamo's recompile limit
        model = FluxTransformer2DModel(**MODEL).eval().to(device)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        graphs[name] = []

        def capture(gm, example_inputs, seen=graphs[name]):
            seen.append(gm)
            if inner != "inductor":
                return gm.forward
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)

        backend = capture if config is None else duca_compile.duca_backend(config, inner=inner)
        fast[name] = torch.compile(model, backend=backend, dynamic=False)

    def request(fn):
        dist.barrier()
        start = time.perf_counter()
        for kw in calls:
            fn(**kw, return_dict=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        for name in configs:                   # warm-up: every compile happens here
            warm[name] = request(fast[name])
        times = {name: [] for name in configs}
        for _ in range(repeats):               # round robin: no row gets the quiet or the noisy minute
            for name in configs:
                times[name].append(request(fast[name]))
    for name, config in configs.items():
        row = {"method": name, "seconds": statistics.median(times[name]), "warmup": warm[name]}
        if config is None:
            row.update(flop_ratio=1.0, collectives={"every step": sum(sum(count_collectives(gm).values())
                                                                      for gm in graphs[name])})
        else:
            try:
                s = duca_compile.stats(fast[name])
            except Exception:            # noqa: BLE001 - FLOP counting of a variant with collectives
                s = {**duca_compile.stats(fast[name], flops=False), "flop_ratio": float("nan")}
            runner, _ = state_of(fast[name]).graphs()[0]
            row.update(flop_ratio=s["flop_ratio"], steps=s["steps"],
                       collectives={_variant_name(k): sum(count_collectives(v).values())
                                    for k, v in runner.variant_graphs.items()})
        rows.append(row)
    found.update(world=world, device=str(device), steps=steps, repeats=repeats, inner=inner, rows=rows,
                 model=MODEL, tokens=SIDE * SIDE + TEXT, threads=torch.get_num_threads())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(found, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def table(found: dict) -> str:
    rows = found["rows"]
    base = rows[0]["seconds"]
    lines = ["| method | request s | vs plain CP compile | FLOP ratio per rank | steps F/R/C/A | collectives per kind of step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        steps = r.get("steps")
        modes = "/".join(str(steps[m]) for m in ("full", "reuse", "subset", "skip")) if steps else "-"
        coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items())
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {base / r['seconds']:.2f}x | {r['flop_ratio']:.1%} | "
                     f"{modes} | {coll} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
