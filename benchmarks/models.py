"""The benchmark's two models and their checkpoints: a class-conditional DiT (256 tokens) and a small
CNN classifier whose penultimate features give the FID-like distance."""
from __future__ import annotations

import json
import pathlib

import torch

__all__ = ["DIT_CONFIG", "CHECKPOINTS", "make_dit", "load_dit", "Classifier", "load_classifier", "save",
           "calibration"]

CHECKPOINTS = pathlib.Path(__file__).parent / "checkpoints"
# DiT-XL/2's layout (adaLN-Zero, patch 2, 256 tokens) at a width a 2-core CPU trains in an hour.
DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=8,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
NULL_CLASS = 10    # the label embedding's extra row: classifier-free guidance's unconditional class


def make_dit(**overrides) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**{**DIT_CONFIG, **overrides})


class Classifier(torch.nn.Module):
    """32×32 digits -> 10 logits; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GroupNorm(8, o),
                                                torch.nn.SiLU(), torch.nn.MaxPool2d(2))
        self.body = torch.nn.Sequential(conv(1, 32), conv(32, 64), conv(64, 64), torch.nn.Flatten(),
                                        torch.nn.Linear(64 * 4 * 4, 128), torch.nn.SiLU())
        self.head = torch.nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save(model: torch.nn.Module, name: str, meta: dict) -> None:
    from safetensors.torch import save_file

    CHECKPOINTS.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, CHECKPOINTS / f"{name}.safetensors")
    (CHECKPOINTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def _load(model: torch.nn.Module, name: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = CHECKPOINTS / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m benchmarks train`")
    model.load_state_dict(load_file(path))
    return model.eval()


def load_dit() -> torch.nn.Module:
    return _load(make_dit(), "dit_digits")


def load_classifier() -> torch.nn.Module:
    return _load(Classifier(), "classifier")


def meta(name: str) -> dict:
    return json.loads((CHECKPOINTS / f"{name}.json").read_text())


def calibration(model: torch.nn.Module, steps: int = 50, guidance: float = 1.5, refresh: bool = False):
    """The trained DiT's MagCache ratios, kept next to its checkpoint: one uncached request of 8
    samples (seed 123, not the benchmarks' seeds), DDIM ``steps``, guidance as given."""
    from duca_compile import Calibration, calibrate

    from .sampling import sample, starts

    path = CHECKPOINTS / "dit_digits_calibration.json"
    if path.exists() and not refresh:
        return Calibration.load(path)
    noise, labels = starts(8, seed=123)
    found = calibrate(model, lambda: sample(lambda x, t, y: model(x, timestep=t, class_labels=y).sample,
                                            noise, labels, steps, guidance))
    found.save(path)
    return found
