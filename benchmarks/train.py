"""Train the benchmark's models on this CPU: ``python -m benchmarks train [dit|classifier]``.

The DiT learns epsilon-prediction on the upsampled digits under a DDPM cosine schedule, with 10 %
of labels dropped to the null class (classifier-free guidance); the checkpoint holds the EMA
weights. Training stops after ``--minutes`` (default 55) and records what it did next to the
weights. The classifier trains on the digits' train split and reports its test accuracy.
"""
from __future__ import annotations

import copy
import math
import platform
import time

import torch

from .data import digits
from .models import DIT_CONFIG, Classifier, make_dit, save

__all__ = ["TRAIN", "train_dit", "train_classifier", "noise_scheduler"]

TRAIN = dict(seed=0, batch=64, lr=1e-3, warmup_steps=200, weight_decay=0.0, ema=0.999, label_dropout=0.1,
             num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN["num_train_timesteps"], beta_schedule=TRAIN["beta_schedule"],
                         prediction_type=TRAIN["prediction_type"], clip_sample=True)


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def train_dit(minutes: float = 55.0, log=print) -> dict:
    torch.manual_seed(TRAIN["seed"])
    x_all, y_all = digits("all")
    model = make_dit().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    sched = noise_scheduler()
    g = torch.Generator().manual_seed(TRAIN["seed"])
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < minutes * 60:
        idx = torch.randint(0, len(y_all), (TRAIN["batch"],), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=g) < TRAIN["label_dropout"]] = DIT_CONFIG["num_embeds_ada_norm"]
        t = torch.randint(0, TRAIN["num_train_timesteps"], (len(y),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = model(sched.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for group in opt.param_groups:                  # linear warm-up, then constant
            group["lr"] = TRAIN["lr"] * min(1.0, (step + 1) / TRAIN["warmup_steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(TRAIN["ema"], (1 + step) / (10 + step))     # warm-up: the random init fades fast
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            elapsed = time.perf_counter() - start
            log(f"step {step}  loss {sum(losses[-100:]) / 100:.4f}  {step / elapsed:.2f} steps/s  {elapsed / 60:.1f} min")
        if step % 500 == 0:
            _save_dit(ema, step, time.perf_counter() - start, losses)
    return _save_dit(ema, step, time.perf_counter() - start, losses)


def _save_dit(ema, steps: int, seconds: float, losses: list) -> dict:
    meta = {"model": {"class": "DiTTransformer2DModel", **DIT_CONFIG}, "train": TRAIN, "steps": steps,
            "minutes": round(seconds / 60, 1), "final_loss_mean_last_100": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
            "params": sum(p.numel() for p in ema.parameters()), "data": "sklearn digits (1797), bilinear 8x8 -> 32x32, [-1, 1]",
            "versions": _versions()}
    save(ema, "dit_digits", meta)
    return meta


def train_classifier(epochs: int = 30, log=print) -> dict:
    torch.manual_seed(TRAIN["seed"])
    x, y = digits("train")
    xt, yt = digits("test")
    model = Classifier().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(TRAIN["seed"])
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            # small shifts and noise, so generated digits (never pixel-perfect) are judged fairly
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,), generator=g).tolist()), dims=(2, 3))
            xb = xb + 0.1 * torch.randn(xb.shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / epochs))
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    log(f"classifier: test accuracy {acc:.4f} after {epochs} epochs ({time.perf_counter() - start:.0f} s)")
    meta = {"epochs": epochs, "test_accuracy": round(acc, 4), "train_images": len(y), "test_images": len(yt),
            "seed": TRAIN["seed"], "augment": "random shifts of up to 2 px, Gaussian noise 0.1",
            "versions": _versions()}
    save(model, "classifier", meta)
    return meta
