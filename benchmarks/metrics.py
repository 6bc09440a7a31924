"""Fidelity metrics: PSNR / SSIM against the uncached samples, class accuracy, and a FID-like
Fréchet distance between classifier features of samples and of the real digits."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["psnr", "ssim", "accuracy", "frechet_distance", "features"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-1, 1) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) on [0, 1] pixels; identical images count as 100 dB."""
    mse = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp_max(100).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian 11×11 window, σ 1.5, K1 0.01, K2 0.03) on [0, 1] pixels."""
    x, y = _unit(a).double(), _unit(b).double()
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    blur = lambda z: torch.nn.functional.conv2d(z, kernel)          # noqa: E731 - valid region only
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.flatten(1).mean(1).mean())


@torch.no_grad()
def accuracy(classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classifier(x).argmax(1) == labels).float().mean())


@torch.no_grad()
def features(classifier, x: torch.Tensor) -> np.ndarray:
    return torch.cat([classifier.features(c) for c in x.split(256)]).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between Gaussian fits of two feature sets (FID's formula,
    in the benchmark classifier's 128-d feature space, not Inception's)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
