"""ClusCa's token clustering: batched k-means with L1 distance, on the device, without host syncs."""
from __future__ import annotations

import torch

__all__ = ["kmeans_l1", "cluster_representatives"]


def kmeans_l1(x: torch.Tensor, k: int, iters: int, init: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the tokens of ``x`` [batch, tokens, channels] into ``k`` groups per sample.

    Starts from ``init`` centroids (warm start) or from ``k`` random distinct tokens; runs exactly
    ``iters`` Lloyd steps (a converged clustering is a fixed point, so skipping the early-stop test
    changes nothing but saves a device-to-host sync). Empty clusters keep their centroid.
    Returns (assignment [batch, tokens] int64, centroids [batch, k, channels]).
    """
    x = x.float()
    b, n, c = x.shape
    if init is None:
        start = torch.rand(b, n, generator=generator, device=x.device).argsort(dim=1)[:, :k]
        centroids = x.gather(1, start.unsqueeze(-1).expand(-1, -1, c))
    else:
        centroids = init.float().clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)          # [b, n, k]
        counts = onehot.sum(1).unsqueeze(-1)                                  # [b, k, 1]
        sums = onehot.transpose(1, 2) @ x
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    assign = torch.cdist(x, centroids, p=1).argmin(dim=-1)
    return assign, centroids


def cluster_representatives(assign: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly random member per cluster: ``[batch, k]`` token indices, cluster c at column c.

    An empty cluster gets a random token (nobody maps to it, so it only adds one computed row).
    """
    b, n = assign.shape
    noise = torch.rand(b, n, 1, generator=generator, device=assign.device)
    member = (assign.unsqueeze(-1) == torch.arange(k, device=assign.device)).to(noise.dtype)
    return (noise + member).argmax(dim=1)
