"""Demo: a tiny DiT sampling loop, plain Inductor vs the duca backend.

    python -m duca_compile.demo [--method duca] [--steps 20] [--layers 4] [--interval 3] [--ratio 0.3]

Prints each step's mode, the compile (warm-up) time, per-request wall-clock of both, the speedup and
the largest difference of the final samples. Random weights: it shows mechanics and cost, not
image quality.
"""
from __future__ import annotations

import argparse
import time

import torch

import duca_compile
from duca_compile import ClusCaConfig, DuCaConfig, FORAConfig, TaylorSeerConfig, ToCaConfig, duca_backend
from duca_compile.policies import make_policy
from duca_compile.tiny import make_model


METHODS = {
    "duca": lambda a: DuCaConfig(interval=a.interval, ratio=a.ratio),
    "fora": lambda a: FORAConfig(interval=a.interval),
    "toca": lambda a: ToCaConfig(interval=a.interval, ratio=a.ratio, soft_fresh_weight=0.25),
    "taylorseer": lambda a: TaylorSeerConfig(interval=a.interval, max_order=2, first_enhance=2),
    "clusca": lambda a: ClusCaConfig(interval=a.interval, clusters=16, propagation=0.005, first_enhance=2),
}


def sample(model, scheduler, steps, noise, labels):
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        out = model(x, timestep=t.expand(x.shape[0]).float(), class_labels=labels, return_dict=False)[0]
        x = scheduler.step(out[:, :4], t, x).prev_sample
    return x


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="duca", choices=sorted(METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="compiler for both plain and duca variants (eager: mechanics only, no speed)")
    args = p.parse_args(argv)
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    model = make_model("dit", layers=args.layers, sample=16, heads=4, head_dim=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    noise, labels = torch.randn(2, 4, 16, 16), torch.tensor([1, 3])
    config = METHODS[args.method](args)
    plain = torch.compile(model, backend=args.inner, fullgraph=True, dynamic=False)
    fast = torch.compile(model, backend=duca_backend(config, inner=args.inner), fullgraph=True, dynamic=False)

    with torch.no_grad():
        print(f"tiny DiT: {args.layers} blocks, 64 tokens, batch 2, DDIM {args.steps} steps; {config}")
        eager, t_eager = timed(lambda: sample(model, scheduler, args.steps, noise, labels), 1)
        _, warm_plain = timed(lambda: sample(plain, scheduler, args.steps, noise, labels), 1)
        _, warm_duca = timed(lambda: sample(fast, scheduler, args.steps, noise, labels), 1)
        print(f"warm-up (compile) request: plain Inductor {warm_plain:.1f} s, duca {warm_duca:.1f} s")
        ref, t_plain = timed(lambda: sample(plain, scheduler, args.steps, noise, labels), args.repeats)
        calls_before = duca_compile.stats(fast)["calls"]
        out, t_duca = timed(lambda: sample(fast, scheduler, args.steps, noise, labels), args.repeats)

    stats = duca_compile.stats(fast)
    policy = make_policy(config)
    letters = {"full": "F", "subset": "C", "skip": "A", "reuse": "R"}
    modes = " ".join(letters[policy.plan(step, args.steps).mode.value] for step in range(args.steps))
    print(f"step modes: {modes} (F=full, C=conservative SUBSET, A=aggressive SKIP, R=reuse/forecast)")
    print(f"per request (median of {args.repeats}): eager {t_eager * 1e3:.0f} ms, plain Inductor "
          f"{t_plain * 1e3:.0f} ms, duca {t_duca * 1e3:.0f} ms")
    print(f"speedup vs plain {args.inner}: {t_plain / t_duca:.2f}x; tokens computed: {stats['token_ratio']:.0%} "
          f"of uncached; FLOPs: {stats['flop_ratio']:.0%} of uncached; calls since warm-up: "
          f"{stats['calls'] - calls_before}")
    print(f"max |duca - plain| on final samples: {(out - ref).abs().max().item():.4f} "
          f"(plain vs eager: {(ref - eager).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
