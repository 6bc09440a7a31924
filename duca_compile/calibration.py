"""``calibrate``: MagCache's per-step magnitude ratios, measured once on one uncached request.

The block stack's residual r_t (last block's output minus first block's input, image stream) is
recorded at every step; the ratio of step t is the mean over tokens of ``‖r_t‖ / ‖r_{t−1}‖`` (1 at
step 0; separate CFG calls of one step are compared with their own previous call and averaged).
The ratios are what ``CalibratedConfig`` turns into a static schedule; save them next to the
model as a small JSON and load them with ``CalibratedConfig.from_file``.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch

from . import _torch
from .integrations.diffusers import repeated_blocks
from .regional import _timestep_parameter
from .runtime import TimestepTracker, timestep_value

__all__ = ["Calibration", "calibrate"]


@dataclass(frozen=True)
class Calibration:
    mag_ratios: tuple
    model: str = ""

    @property
    def num_steps(self) -> int:
        return len(self.mag_ratios)

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(json.dumps({"model": self.model, "num_steps": self.num_steps,
                                    "mag_ratios": list(self.mag_ratios)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        data = json.loads(pathlib.Path(path).read_text())
        return cls(tuple(data["mag_ratios"]), data.get("model", ""))


def _metadata(block):
    """(hidden-states argument name, index of hidden states in a tuple output or None) from
    diffusers' block registry, which MagCache reads too; defaults where a class is not listed."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
        meta = TransformerBlockRegistry.get(type(block))
        return meta.hidden_states_argument_name, meta.return_hidden_states_index
    except (ImportError, ValueError, KeyError):     # an older diffusers, or a class it does not list
        return "hidden_states", None


def _stream(output, like: torch.Tensor, index) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if index is not None:
        return output[index]
    same = [o for o in output if isinstance(o, torch.Tensor) and o.shape == like.shape]
    if len(same) != 1:
        raise ValueError(f"calibrate: cannot tell which output of {len(output)} is the hidden states "
                         "(the block class is not in diffusers' TransformerBlockRegistry)")
    return same[0]


def _residual(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    if out.shape == inp.shape:
        return out - inp
    if out.ndim == inp.ndim == 3 and out.shape[2] == inp.shape[2] and out.shape[1] > inp.shape[1]:
        return out[:, -inp.shape[1]:] - inp        # a fused text + image sequence: image tokens last
    raise ValueError(f"calibrate: the last block's output {tuple(out.shape)} does not match the first "
                     f"block's input {tuple(inp.shape)}")


@torch.no_grad()
def calibrate(model: torch.nn.Module, run) -> Calibration:
    """Magnitude ratios of one request: ``run()`` must run exactly one uncached request through
    ``model`` itself (not a compiled copy: its hooks would not fire), e.g.
    ``calibrate(pipe.transformer, lambda: pipe(prompt, num_inference_steps=50))``."""
    if isinstance(model, _torch.OptimizedModule):
        raise ValueError("calibrate: pass the uncompiled model (`compiled._orig_mod`) and run the request "
                         "through it: hooks do not fire inside compiled code")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"calibrate: no transformer blocks found in {type(model).__name__}")
    first, last = blocks[0], blocks[-1]
    arg, _ = _metadata(first)
    _, out_index = _metadata(last)
    tparam = _timestep_parameter(model)
    tracker, calls = TimestepTracker(), []
    prev: dict[int, torch.Tensor] = {}              # slot -> per-token norms of its last residual
    ratios: dict[int, list] = {}                    # step -> ratio of every call of that step
    now = {"step": 0, "slot": 0, "input": None}

    def on_model(module, args, kwargs):
        calls.append(1)
        t = None if tparam is None else kwargs.get(tparam[1], args[tparam[0]] if len(args) > tparam[0] else None)
        if t is None:
            new, step, slot = len(calls) == 1, len(calls) - 1, 0
        else:
            new, step, slot = tracker.observe(timestep_value(t))
        if new and len(calls) > 1:
            raise ValueError("calibrate: run() started a second request; calibrate on exactly one")
        now.update(step=step, slot=slot)

    def on_first(module, args, kwargs):
        now["input"] = kwargs[arg] if arg in kwargs else args[0]

    def on_last(module, args, kwargs, output):
        inp = now["input"]
        norms = torch.linalg.norm(_residual(_stream(output, inp, out_index), inp).float(), dim=-1)
        before = prev.get(now["slot"])
        ratio = 1.0 if before is None else float((norms / (before + 1e-8)).mean())
        ratios.setdefault(now["step"], []).append(ratio)
        prev[now["slot"]] = norms

    hooks = [model.register_forward_pre_hook(on_model, with_kwargs=True),
             first.register_forward_pre_hook(on_first, with_kwargs=True),
             last.register_forward_hook(on_last, with_kwargs=True)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    if not ratios:
        raise RuntimeError(f"calibrate: run() made no call of this {type(model).__name__}'s blocks "
                           "(run the uncompiled model: hooks do not fire inside a compiled one)")
    steps = sorted(ratios)
    return Calibration(tuple(sum(ratios[s]) / len(ratios[s]) for s in steps), type(model).__name__)
