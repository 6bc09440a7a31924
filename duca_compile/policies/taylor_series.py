"""TaylorSeer bookkeeping for one cache slot: which difference orders each site has, and the
per-call coefficient tables the compiled variants read (``taylor_coef``, ``taylor_w``)."""
from __future__ import annotations

import torch

from .forecasts import FoCa, coefficient

__all__ = ["TaylorClock"]


class TaylorClock:
    def __init__(self, sites: list[str], orders: int, first_enhance: int, basis: tuple = ("taylor", 1.0)):
        self.sites, self.orders, self.first_enhance, self.basis = sites, orders, first_enhance, basis
        self.last: dict[str, int] = {}      # site -> step it was last computed
        self.valid: dict[str, int] = {}     # site -> Taylor terms available (1 .. orders + 1)
        self._tensors: dict[tuple, torch.Tensor] = {}

        self.foca: dict[str, FoCa] = {}     # site -> its FoCa clock, with basis "foca"

    def reset(self) -> None:
        self.last, self.valid, self.foca = {}, {}, {}

    def tables(self, actions: dict, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients for this call; advances the clock for the sites computed in full."""
        if self.basis[0] == "foca":
            return self._foca_tables(actions, step, device)
        coef, w = [], []
        for site in self.sites:
            last, valid = self.last.get(site), self.valid.get(site, 1)
            if actions[site] == "compute":
                fresh = last is None or step <= self.first_enhance - 2
                valid = 1 if fresh else min(valid + 1, self.orders + 1)
                inv_d = 0.0 if last is None else 1.0 / (step - last)
                w.append([inv_d if m < valid - 1 else 0.0 for m in range(self.orders)])
                coef.append([1.0] + [0.0] * self.orders)
                self.last[site], self.valid[site] = step, valid
            else:
                k = step - last if last is not None else 0
                coef.append([coefficient(self.basis, k, m) if m < valid else 0.0 for m in range(self.orders + 1)])
                w.append([0.0] * self.orders)
        return self._tensor(coef, device), self._tensor(w, device)

    def _foca_tables(self, actions: dict, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        coef, w = [], []
        for site in self.sites:
            clock = self.foca.setdefault(site, FoCa())
            if actions[site] == "compute":
                w.append(clock.computed(step))
                coef.append([1.0, 0.0, 0.0])
            else:
                coef.append(clock.cached(step))
                w.append([0.0, 0.0])
        return self._tensor(coef, device), self._tensor(w, device)

    def _tensor(self, rows: list, device) -> torch.Tensor:
        key = (str(device), tuple(map(tuple, rows)))
        t = self._tensors.get(key)
        if t is None:                          # the same tables recur every request: copy them once
            t = self._tensors[key] = torch.tensor(rows, dtype=torch.float32, device=device)
        return t
