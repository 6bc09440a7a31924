"""One sampling request: DDIM over the DiT, classifier-free guidance batched into one call per step,
fixed noise and labels, so every method denoises exactly the same starting points."""
from __future__ import annotations

import contextlib

import torch

import duca_compile

from .data import SIDE
from .models import NULL_CLASS

__all__ = ["scheduler", "starts", "sample", "request_starter"]


def scheduler(num_steps: int):
    from diffusers import DDIMScheduler

    from .train import TRAIN

    s = DDIMScheduler(num_train_timesteps=TRAIN["num_train_timesteps"], beta_schedule=TRAIN["beta_schedule"],
                      prediction_type=TRAIN["prediction_type"], clip_sample=True)
    s.set_timesteps(num_steps)
    return s


def starts(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise [n, 1, 32, 32], class labels 0..9 cycling) for ``n`` samples."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, SIDE, SIDE, generator=g), torch.arange(n) % 10


@torch.no_grad()
def sample(denoise, noise: torch.Tensor, labels: torch.Tensor, num_steps: int, guidance: float) -> torch.Tensor:
    """Samples in [-1, 1]. ``denoise(x, t, y)`` returns epsilon for a batch; with ``guidance > 1`` it
    sees ``[uncond; cond]`` in one call per step (the order diffusers' FasterCache requires)."""
    sched = scheduler(num_steps)
    x = noise.clone()
    cfg = guidance > 1
    y = torch.cat([torch.full_like(labels, NULL_CLASS), labels]) if cfg else labels
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        eps = denoise(inp, t.expand(len(inp)).to(inp.device), y.to(inp.device))
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


@contextlib.contextmanager
def request_starter(fast, num_steps: int):
    """Yields ``before()``: called ahead of each request, it ends the previous duca ``sampling()``
    request and opens the next; the last one ends on exit."""
    with contextlib.ExitStack() as stack:
        def before():
            stack.close()
            stack.enter_context(duca_compile.sampling(fast, num_steps=num_steps))
        yield before
