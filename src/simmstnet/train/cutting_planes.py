"""Cutting planes for the sim2real constraint h(lambda, theta) <= eps (paper section 2.2).

A plane l is the half-space ``a_l . lambda + b_l . theta + c_l <= 0``, the linearization of
``h - eps`` at the point where it was cut (eq. 6-7). Each plane carries a dual ``gamma_l >= 0``.

Storage is a fixed-size pool of ``p_max`` slots so that memory is known up front:
``a`` is dense over the N simulated windows (p_max x N floats: 4 MB for N = 100k, p_max = 10)
and ``b`` is a flat copy of the model parameters per slot (p_max x D floats: mind this for
large models; 10 slots of a 1M-parameter model are 40 MB).
"""
from __future__ import annotations

import torch


class CuttingPlanes:
    """A pool of at most ``p_max`` planes ``a . lam + b . theta + c <= 0`` with duals.

    Shapes: ``a`` (p_max, N), ``b`` (p_max, D), ``c``, ``gamma`` (p_max,), ``active`` (p_max,)
    bool, ``born`` (p_max,) int64 (iteration at which the slot's plane was cut).
    """

    def __init__(self, n_sim: int, n_params: int, p_max: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if p_max < 1:
            raise ValueError("p_max must be >= 1")
        self.p_max = p_max
        self.a = torch.zeros(p_max, n_sim, device=device, dtype=dtype)
        self.b = torch.zeros(p_max, n_params, device=device, dtype=dtype)
        self.c = torch.zeros(p_max, device=device, dtype=dtype)
        self.gamma = torch.zeros(p_max, device=device, dtype=dtype)
        self.active = torch.zeros(p_max, dtype=torch.bool, device=device)
        self.born = torch.full((p_max,), -1, dtype=torch.int64, device=device)
        self.n_added = 0
        self.n_dropped = 0
        self.n_evicted = 0

    def __len__(self) -> int:
        return int(self.active.sum())

    # -- evaluation -------------------------------------------------------------------------
    def values(self, lam: torch.Tensor, theta_flat: torch.Tensor) -> torch.Tensor:
        """(p_max,) plane values ``a . lam + b . theta + c`` (0 in empty slots).

        lam (N,), theta_flat (D,)."""
        v = self.a @ lam + self.b @ theta_flat + self.c
        return torch.where(self.active, v, torch.zeros_like(v))

    def weighted_normals(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_l coef_l a_l, sum_l coef_l b_l)`` over active planes: shapes (N,), (D,).

        With coef = gamma this is the gradient of the plane part of the Lagrangian; with
        coef = rho * max(0, value) that of the phase-2 penalty."""
        coef = torch.where(self.active, coef, torch.zeros_like(coef))
        return coef @ self.a, coef @ self.b

    # -- maintenance ------------------------------------------------------------------------
    def add(self, a: torch.Tensor, b: torch.Tensor, c: float | torch.Tensor, step: int) -> int:
        """Insert a plane; when the pool is full evict the least active one (smallest gamma,
        then the oldest). Returns the slot used."""
        free = (~self.active).nonzero()
        if len(free):
            slot = int(free[0])
        else:
            # the plane whose dual contributes least goes first; among equals, the oldest
            gamma, born = self.gamma.tolist(), self.born.tolist()
            slot = min(range(self.p_max), key=lambda i: (gamma[i], born[i]))
            self.n_evicted += 1
        self.a[slot] = a.to(self.a)
        self.b[slot] = b.to(self.b)
        self.c[slot] = torch.as_tensor(c, dtype=self.c.dtype, device=self.c.device)
        self.gamma[slot] = 0.0
        self.active[slot] = True
        self.born[slot] = step
        self.n_added += 1
        return slot

    def drop_inactive(self) -> int:
        """Remove every plane whose dual is zero (it no longer shapes the solution).
        Returns the number removed."""
        return self._drop(self.active & (self.gamma <= 0))

    def drop_older(self, born_before: int) -> int:
        """Remove every plane cut before iteration ``born_before``. Returns the number removed."""
        return self._drop(self.active & (self.born < born_before))

    def _drop(self, dead: torch.Tensor) -> int:
        """Empty the slots ``dead`` (p_max,) bool; returns how many there were."""
        n = int(dead.sum())
        if n:
            self.active &= ~dead
            self.a[dead] = 0.0
            self.b[dead] = 0.0
            self.c[dead] = 0.0
            self.gamma[dead] = 0.0
            self.born[dead] = -1
            self.n_dropped += n
        return n

    def dual_ascent(self, values: torch.Tensor, lr_gamma: float, reg: float = 0.0,
                    upper: float | None = None) -> None:
        """Projected gradient ascent on the Lagrangian minus (reg / 2) gamma^2:
        gamma_l <- min(upper, max(0, gamma_l + lr_gamma * (value_l - reg * gamma_l)))
        (reg 0 and upper None: plain projected ascent onto gamma >= 0)."""
        g = torch.clamp(self.gamma + lr_gamma * (values - reg * self.gamma), min=0.0,
                        max=upper)
        self.gamma = torch.where(self.active, g, torch.zeros_like(g))

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"a": self.a.clone(), "b": self.b.clone(), "c": self.c.clone(),
                "gamma": self.gamma.clone(), "active": self.active.clone(),
                "born": self.born.clone(), "n_added": self.n_added,
                "n_dropped": self.n_dropped, "n_evicted": self.n_evicted}

    def load_state_dict(self, state: dict) -> None:
        for key in ("a", "b", "c", "gamma", "active", "born"):
            src = state[key]
            if tuple(src.shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"cutting-plane state {key!r} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(getattr(self, key).shape)}")
            setattr(self, key, src.to(getattr(self, key).device).clone())
        self.n_added = int(state["n_added"])
        self.n_dropped = int(state["n_dropped"])
        self.n_evicted = int(state["n_evicted"])
