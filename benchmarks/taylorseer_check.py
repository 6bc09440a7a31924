"""``python -m benchmarks.taylorseer_check``: duca's TaylorSeer against diffusers' TaylorSeerCache
at the same schedule (interval 4, order 1, 6 warm-up steps), and the DiT-XL/2 preset's schedule
(2 warm-up steps) at orders 1 and 4 — to tell the forecast from the schedule in the fidelity table.

40 samples, DDIM 50, guidance 1.5, eager (fidelity only: nothing is timed); PSNR against the
uncached samples of the same noise, FLOP ratio as in ``fidelity``. About 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import warnings

import torch

from duca_compile import TaylorSeerConfig, presets

from .fidelity import Setup, _denoiser, _duca, _peer, _requests
from .metrics import psnr
from .models import load_dit
from .peers import TaylorSeerCache
from .sampling import starts


def main() -> None:
    warnings.simplefilter("ignore")
    setup = Setup(samples=40, batch=20, steps=50, guidance=1.5, inner="eager", sweep=())
    model = load_dit()
    noise, labels = starts(setup.samples)
    with torch.no_grad():
        reference, *_ = _requests(_denoiser(model), setup, noise, labels)
        for name, config in [("duca TaylorSeer N=4 O=1, 6 warm-up", TaylorSeerConfig(interval=4, max_order=1, first_enhance=6)),
                             ("duca TaylorSeer N=4 O=4, 2 warm-up (preset)", presets("dit-xl-2", "taylorseer")),
                             ("duca TaylorSeer N=4 O=1, 2 warm-up", TaylorSeerConfig(interval=4, max_order=1, first_enhance=2))]:
            out, flop_ratio, *_ = _duca(model, config, setup, noise, labels)
            print(f"{name}: PSNR {psnr(out, reference):.2f} dB, FLOPs {flop_ratio:.1%}", flush=True)
        peer = TaylorSeerCache("diffusers TaylorSeerCache", "diffusers", {}, interval=4, warmup=6, order=1)
        out, flop_ratio, *_ = _peer(model, peer, setup, noise, labels)
        print(f"diffusers TaylorSeerCache N=4 O=1, 6 warm-up: PSNR {psnr(out, reference):.2f} dB, FLOPs {flop_ratio:.1%}")


if __name__ == "__main__":
    main()
