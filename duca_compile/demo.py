"""Demo: a DiT sampling loop, plain torch.compile vs the duca backend, side by side.

    python -m duca_compile.demo [--method duca] [--steps 50] [--out duca_demo.png]

By default the DiT trained on upsampled digits (``benchmarks/``, run from the repository) samples
one digit of each class: prints each step's mode, the compile (warm-up) time, per-request
wall-clock of both, the speed-up, FLOPs and how close the cached samples stay (PSNR), and writes a
PNG of the uncached and the cached samples. ``--model tiny`` uses a random-init tiny DiT instead
(mechanics and cost only: its samples mean nothing).
"""
from __future__ import annotations

import argparse
import time

import torch

import duca_compile
from duca_compile import ClusCaConfig, DuCaConfig, FORAConfig, TaylorSeerConfig, ToCaConfig, duca_backend
from duca_compile.report import _LETTERS
from duca_compile.models import make_model

METHODS = {
    "duca": lambda a: DuCaConfig(interval=a.interval, ratio=a.ratio),
    "fora": lambda a: FORAConfig(interval=a.interval),
    "toca": lambda a: ToCaConfig(interval=a.interval, ratio=a.ratio, soft_fresh_weight=0.25),
    "taylorseer": lambda a: TaylorSeerConfig(interval=a.interval, max_order=2, first_enhance=2),
    "clusca": lambda a: ClusCaConfig(interval=a.interval, clusters=16, propagation=0.005, first_enhance=2),
}


def _setup(name: str, layers: int):
    """(model, scheduler factory, noise, labels, description)."""
    from diffusers import DDIMScheduler

    if name == "digits":
        try:
            from benchmarks.models import load_dit
            from benchmarks.sampling import scheduler, starts
        except (ImportError, FileNotFoundError) as e:
            print(f"(the trained digits DiT is not reachable: {e}; using --model tiny)")
        else:
            noise, labels = starts(10)
            return load_dit(), scheduler, noise, labels, "digits DiT (trained): 8 blocks, 256 tokens, 10 samples"
    torch.manual_seed(0)
    model = make_model("dit", layers=layers, sample=16, heads=4, head_dim=32)

    def tiny_scheduler(steps):
        s = DDIMScheduler(num_train_timesteps=1000)
        s.set_timesteps(steps)
        return s
    return model, tiny_scheduler, torch.randn(2, 4, 16, 16), torch.tensor([1, 3]), \
        f"tiny random DiT: {layers} blocks, 64 tokens, batch 2"


def sample(model, make_scheduler, steps, noise, labels):
    """One request; steps are tracked from the timesteps (a repeated first timestep starts a new request)."""
    scheduler = make_scheduler(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        out = model(x, timestep=t.expand(x.shape[0]).float(), class_labels=labels, return_dict=False)[0]
        x = scheduler.step(out[:, :x.shape[1]], t, x).prev_sample
    return x.clamp(-1, 1)


def timed(fn, repeats, label: str = ""):
    """(last result, median seconds) of ``repeats`` calls; with ``label``, one progress line per call."""
    times = []
    for i in range(repeats):
        if label:
            print(f"  {label}" + (f", request {i + 1}/{repeats}" if repeats > 1 else "") + " ...", end="", flush=True)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if label:
            print(f" {times[-1]:.1f} s", flush=True)
    return result, sorted(times)[len(times) // 2]


def timed_round_robin(fns: dict, repeats: int):
    """name -> (last result, median seconds): the requests run in turns, one of each per round, so
    a machine that slows down or speeds up mid-run affects every candidate alike."""
    times = {name: [] for name in fns}
    results = {}
    for i in range(repeats):
        for name, fn in fns.items():
            print(f"  {name}, request {i + 1}/{repeats} ...", end="", flush=True)
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f" {times[name][-1]:.1f} s", flush=True)
    return {name: (results[name], sorted(t)[len(t) // 2]) for name, t in times.items()}


def _psnr(a, b) -> float:
    mse = ((a - b) / 2).pow(2).mean().clamp_min(1e-10)
    return float(10 * torch.log10(1 / mse))


def write_image_rows(path, rows: dict, title: str = "", column_titles=None, columns: int | None = None):
    """A PNG with one row of grayscale images in [-1, 1] per ``rows`` entry (name -> [n, C, H, W]),
    the same sample index in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = columns or min(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.85 + 0.6), squeeze=False)
    for i, (name, images) in enumerate(rows.items()):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(((images[j, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and column_titles is not None:
                ax.set_title(str(column_titles[j]), fontsize=8)
        axes[i][0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=["digits", "tiny"])
    p.add_argument("--method", default="duca", choices=sorted(METHODS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=4, help="blocks of the tiny model")
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="compiler for both plain and duca variants (eager: mechanics only, no speed)")
    p.add_argument("--out", default="duca_demo.png",
                   help="side-by-side PNG of the samples ('' to skip); the default is git-ignored")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    model, make_scheduler, noise, labels, what = _setup(args.model, args.layers)
    config = METHODS[args.method](args)
    plain = torch.compile(model, backend=args.inner, fullgraph=True, dynamic=False)
    fast = torch.compile(model, backend=duca_backend(config, inner=args.inner), fullgraph=True, dynamic=False)

    with torch.no_grad():
        print(f"{what}, DDIM {args.steps} steps; {config}", flush=True)
        run = lambda m: lambda: sample(m, make_scheduler, args.steps, noise, labels)  # noqa: E731
        compiles = "one compile" if args.inner == "eager" else "a cold Inductor compile takes ~30 s on 2 cores"
        print(f"warm-up requests: compiling plain {args.inner} and duca's variants ({compiles})", flush=True)
        _, warm_plain = timed(run(plain), 1, f"plain {args.inner} warm-up")
        _, warm_duca = timed(run(fast), 1, "duca warm-up")
        print(f"warm-up (compile) request: plain {args.inner} {warm_plain:.1f} s, duca {warm_duca:.1f} s")
        calls_before = duca_compile.stats(fast)["calls"]
        timed_runs = timed_round_robin({"eager": run(model), f"plain {args.inner}": run(plain), "duca": run(fast)},
                                       args.repeats)
        (eager, t_eager), (ref, t_plain), (out, t_duca) = timed_runs.values()

    stats = duca_compile.stats(fast)
    plan = duca_compile.explain(fast, as_text=False, num_steps=args.steps)[0]["plan"]
    print("step modes: " + " ".join(_LETTERS[s["mode"]] for s in plan)
          + " (F=full, C=conservative SUBSET, A=aggressive SKIP, R=reuse/forecast)")
    print(f"per request (median of {args.repeats}, timed in turns): eager {t_eager * 1e3:.0f} ms, plain {args.inner} "
          f"{t_plain * 1e3:.0f} ms, duca {t_duca * 1e3:.0f} ms")
    speedup = t_plain / t_duca
    print(f"speedup vs plain {args.inner}: {speedup:.2f}x; tokens computed: {stats['token_ratio']:.0%} "
          f"of uncached; FLOPs: {stats['flop_ratio']:.0%} of uncached; calls since warm-up: "
          f"{stats['calls'] - calls_before}")
    print(f"cached vs uncached samples: PSNR {_psnr(out, ref):.1f} dB, max |diff| {(out - ref).abs().max():.4f} "
          f"(plain vs eager: {(ref - eager).abs().max().item():.2e})")
    if args.out:
        write_image_rows(args.out, {"uncached": ref, "cached": out}, f"{what}, DDIM {args.steps}: {args.method} {speedup:.2f}x vs plain "
                   f"{args.inner}, FLOPs {stats['flop_ratio']:.0%}, PSNR {_psnr(out, ref):.1f} dB")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
