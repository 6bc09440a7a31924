"""Which tokens a SUBSET site recomputes: DuCa/ToCa scores and top-k, on the device, no host syncs.

score = base (random, or kv-norm: normalised Σ_heads (1 − ‖v_h‖) from the last step that ran
self-attention) + λ3 · staleness / interval (s3), then the best token of each g×g patch gets
``+ bonus · score`` (s4). The top k are recomputed. A step's sites with the same batch and token
count are scored and ranked together (one ``rand``/``topk`` for all of them, each taking its own k
off the ranking): a handful of small ops per step instead of a handful per site, which on a GPU
are kernel launches. With an even batch and ``share_cfg_indices``
the two classifier-free-guidance halves share one selection (their scores averaged), as the
official code does.

Under context parallelism (``world`` and ``group``, set from the model's parallel config) each
rank holds a contiguous shard of every token stream and selects its own share, k / world,
from scores that mean what they mean on one GPU: kv-norm scores are normalised over the global
tokens (one all-reduce of a sum of squares, only where staleness is mixed in and the scale
matters), and the spatial bonus works on the rank's rows of the global grid.
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
        self._masks: dict[tuple, torch.Tensor] = {}
        self.world, self.group = 1, None      # context parallelism: set by the model's state

    def reset(self) -> None:
        self.staleness = {}

    def full(self, site: str) -> None:
        self.staleness.pop(site, None)         # every token fresh

    def _rows(self, batch: int) -> int:
        share = self.config.share_cfg_indices and batch % 2 == 0 and batch > 1
        return batch // 2 if share else batch

    def select(self, site: str, batch: int, tokens: int, k: int, device, generator,
               value_score: torch.Tensor | None = None) -> torch.Tensor:
        return self.select_many([(site, batch, tokens, k, value_score)], device, generator)[0]

    def select_many(self, requests: list, device, generator) -> list[torch.Tensor]:
        """``[batch, k]`` indices for each ``(site, batch, tokens, k, value_score)``. Sites with the
        same batch and token count are scored together, one top-k over them all (each site takes
        the first k of the largest k's ranking), so a step's selection is a few ops, not a few per site."""
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (site, batch, tokens, k, score) in enumerate(requests):
            scored = self.selection == "kv-norm" and score is not None
            if self.selection == "kv-norm" and not scored:    # the layout checks this at compile time
                raise RuntimeError(f"duca: selection='kv-norm' but no value-norm scores for {site}")
            groups.setdefault((batch, tokens, scored), []).append(i)
        for (batch, tokens, scored), members in groups.items():
            sites, ks = [requests[i][0] for i in members], [requests[i][3] for i in members]
            rows = self._rows(batch)
            if scored:
                s = torch.stack([requests[i][4] for i in members]).float()
                s = s.view(len(members), batch // rows, rows, tokens).mean(1) if rows != batch else s
                score = self._normalize(s)
            else:
                score = torch.rand(len(members), rows, tokens, generator=generator, device=device)
            stale = torch.stack([self._stale(site, rows, tokens, device) for site in sites])
            if self.soft_weight:
                score = score + self.soft_weight * stale / self.interval
            if self.grid and self.bonus:
                score = self._spatial_bonus(sites[0], score.view(-1, tokens)).view(score.shape)
            top = score.topk(max(ks), dim=-1).indices            # best first
            # s3 bookkeeping: everyone ages one step, the recomputed tokens are fresh again.
            fresh = torch.zeros_like(stale).scatter_(2, top, self._taken(ks, device).expand_as(top))
            aged = (stale + 1) * (1 - fresh)
            for j, (i, site) in enumerate(zip(members, sites)):
                self.staleness[site] = aged[j]
                idx = top[j, :, :ks[j]]
                out[i] = (idx.repeat(batch // rows, 1) if rows != batch else idx).contiguous()
        return out

    def _normalize(self, s: torch.Tensor) -> torch.Tensor:
        """Unit L2 norm over the tokens, the global ones under context parallelism. Alone, the
        scale does not change a ranking; with staleness added to it, it does."""
        if self.world == 1 or not self.soft_weight:
            return torch.nn.functional.normalize(s, dim=-1)
        squares = s.square().sum(-1, keepdim=True)
        torch.distributed.all_reduce(squares, group=self.group)
        return s / squares.sqrt().clamp_min(1e-12)

    def _taken(self, ks: list, device) -> torch.Tensor:
        """[sites, 1, max k]: 1 where a rank is within the site's k (made once per k-tuple: no copy per call)."""
        key = (tuple(ks), str(device))
        if key not in self._masks:
            ranks = torch.arange(max(ks)).view(1, 1, -1) < torch.tensor(ks).view(-1, 1, 1)
            self._masks[key] = ranks.float().to(device)
        return self._masks[key]

    def _stale(self, site: str, rows: int, tokens: int, device) -> torch.Tensor:
        stale = self.staleness.get(site)
        return stale if stale is not None and stale.shape == (rows, tokens) else torch.zeros(rows, tokens, device=device)

    def _spatial_bonus(self, site: str, score: torch.Tensor) -> torch.Tensor:
        """s4 on the square grid of the (global) tokens: a rank's shard is ``side / world`` whole rows of it."""
        rows, n = score.shape
        side, g = math.isqrt(n * self.world), self.grid
        height = side // self.world
        if side * side != n * self.world or side % g or side % self.world or height % g:
            shard = f" ({n} on this rank of {self.world})" if self.world > 1 else ""
            self.warn_once(f"grid:{site}", f"duca: {site} has {n * self.world} tokens{shard}, not a square grid "
                           f"whose rows split into spatial_grid={g} patches per rank; the spatial bonus is off there")
            return score
        patches = score.view(rows, height // g, g, side // g, g).permute(0, 1, 3, 2, 4).reshape(rows, -1, g * g)
        best = torch.nn.functional.one_hot(patches.argmax(-1), g * g).to(score.dtype)
        best = best.view(rows, height // g, side // g, g, g).permute(0, 1, 3, 2, 4).reshape(rows, n)
        return score * (1 + self.bonus * best)
