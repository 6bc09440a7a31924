"""Which tokens a SUBSET site recomputes: DuCa/ToCa scores and top-k, on the device, no host syncs.

score = base (random, or kv-norm: normalised Σ_heads (1 − ‖v_h‖) from the last step that ran
self-attention) + λ3 · staleness / interval (s3), then the best token of each g×g patch gets
``+ bonus · score`` (s4). The top k are recomputed. With an even batch and ``share_cfg_indices``
the two classifier-free-guidance halves share one selection (their scores averaged), as the
official code does.
"""
from __future__ import annotations

import math

import torch

__all__ = ["TokenSelector"]


class TokenSelector:
    def __init__(self, config, warn_once):
        self.config, self.warn_once = config, warn_once
        self.selection = getattr(config, "selection", "random")
        self.soft_weight = float(getattr(config, "soft_fresh_weight", 0.0))
        self.interval = getattr(config, "interval", 1)
        self.grid, self.bonus = getattr(config, "spatial_grid", 0), float(getattr(config, "spatial_bonus", 0.0))
        self.staleness: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.staleness = {}

    def full(self, site: str) -> None:
        self.staleness.pop(site, None)         # every token fresh

    def _rows(self, batch: int) -> int:
        share = self.config.share_cfg_indices and batch % 2 == 0 and batch > 1
        return batch // 2 if share else batch

    def select(self, site: str, batch: int, tokens: int, k: int, device, generator,
               value_score: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(batch)
        if self.selection == "kv-norm" and value_score is not None:
            s = value_score.float()
            s = s.view(batch // rows, rows, tokens).mean(0) if rows != batch else s
            score = torch.nn.functional.normalize(s, dim=-1)
        else:
            if self.selection == "kv-norm":
                self.warn_once(f"kvnorm:{site}", f"duca: no self-attention value norms match the tokens of {site}; "
                               "it uses random selection")
            score = torch.rand(rows, tokens, generator=generator, device=device)
        stale = self.staleness.get(site)
        if stale is None or stale.shape != (rows, tokens):
            stale = torch.zeros(rows, tokens, device=device)
        if self.soft_weight:
            score = score + self.soft_weight * stale / self.interval
        if self.grid and self.bonus:
            score = self._spatial_bonus(site, score)
        idx = score.topk(k, dim=1).indices
        # s3 bookkeeping: everyone ages one step, the recomputed tokens are fresh again.
        self.staleness[site] = (stale + 1).scatter_(1, idx, 0.0)
        return torch.cat([idx] * (batch // rows)) if rows != batch else idx

    def _spatial_bonus(self, site: str, score: torch.Tensor) -> torch.Tensor:
        rows, n = score.shape
        side, g = math.isqrt(n), self.grid
        if side * side != n or side % g:
            self.warn_once(f"grid:{site}", f"duca: {site} has {n} tokens, not a square grid divisible by "
                           f"spatial_grid={g}; the spatial bonus is off there")
            return score
        patches = score.view(rows, side // g, g, side // g, g).permute(0, 1, 3, 2, 4).reshape(rows, -1, g * g)
        best = torch.nn.functional.one_hot(patches.argmax(-1), g * g).to(score.dtype)
        best = best.view(rows, side // g, side // g, g, g).permute(0, 1, 3, 2, 4).reshape(rows, n)
        return score * (1 + self.bonus * best)
