"""The benchmark's data: scikit-learn's 8×8 digits, upsampled to 32×32 and scaled to [-1, 1]."""
from __future__ import annotations

import torch

__all__ = ["digits", "SIDE"]

SIDE = 32          # 32×32 pixels at patch 2: 256 tokens, as DiT-XL/2 at 256² (32×32 latents)


def digits(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 1, 32, 32] in [-1, 1], labels [n]); ``split`` is "train" (80 %), "test" or "all",
    drawn with a fixed permutation so the classifier never sees its test images."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0          # 0..16 -> -1..1
    x = torch.nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    y = torch.tensor(raw.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    idx = {"train": order[:cut], "test": order[cut:], "all": order}[split]
    return x[idx], y[idx]
