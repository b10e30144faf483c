"""Measurement: from square demand to what an operator's CDR grid would show.

1. Serving: square demand goes to the sectors that serve its places (``RadioMap.serve``); the
   sector demand fluctuates locally (log-normal AR(1) over hours).
2. Congestion (Net only): a sector carries at most its capacity in the step; the capacity depends
   on the interferers' utilization (``RadioMap.capacity``), so a loaded neighbourhood has less.
   Voice and SMS are small and are never blocked here. With ``net_record_share`` r > 0 the Net
   output counts records, not only volume: r x the unclipped demand (sessions, which congestion
   does not stop) + (1 - r) x the clipped volume.
3. Attribution: each sector's carried traffic is spread over the squares its coverage overlaps,
   in proportion to the overlap (``RadioMap.attribute``), as the Telecom Italia grid was built
   from the operator's coverage maps (Barlacchi et al. 2015).
4. Noise: counts (Call, SMS) are Poisson or negative binomial (gamma-Poisson mixture) around their
   expectation; Net volumes get a heavy-tailed multiplier exp(sigma * t_nu) (a few sessions
   dominate a volume in a step), drawn per sector before attribution (so neighbouring squares
   share it) and again, with 0.8 times the sigma, per square.
5. Unknown global scale per service (the operator rescaled its data).
6. Missing data as mask: isolated missing records, whole-grid collection gaps, and sector
   outages that blank the squares the sector dominates.
"""
from __future__ import annotations

import numpy as np

from simmstnet.sim.demand import local_fluctuation
from simmstnet.sim.radio import RadioMap


def carried_by_sector(lam: np.ndarray, radio: RadioMap, step: int, saturate: bool,
                      p: dict | None = None, rng: np.random.Generator | None = None):
    """Sector traffic (T, S) float32 and congestion summary from square demand ``lam`` (T, N).

    With ``p`` and ``rng`` the sector demand first gets the local AR(1) fluctuation
    (``local_sigma``, ``local_corr_h``; demand.local_fluctuation).

    With ``saturate`` (Net, demand in MB per step) the carried traffic is min(demand, capacity):
    a one-pass fixed point, utilization rho_j = min(1, L_j / C_j(full load)) sets the interferer
    activity a_s = sum_j W_sj rho_j and thus C_s(a_s). ``net_record_share`` r in ``p`` (0 when
    absent): the output is r x load + (1 - r) x min(load, capacity). The Telecom Italia
    "Internet" field counts CDR records, created at a connection's start and end, every 15 minutes
    and every 5 MB (Barlacchi et al. 2015): sessions keep being counted when the cell is full, so
    only the volume-driven part saturates.
    """
    load = np.ascontiguousarray((radio.serve.T @ lam.T).T, dtype=np.float32)  # (T, S)
    if p is not None and rng is not None:
        load *= local_fluctuation(load.shape, step, p["local_sigma"], p["local_corr_h"], rng)
    if not saturate:
        return load, {}
    to_mb = step / 8e6
    cap_full = (radio.cap_bps[:, -1] * to_mb).astype(np.float32)
    rho = np.minimum(load / cap_full, 1.0)
    activity = np.asarray((radio.coupling @ rho.T).T, dtype=np.float32)
    del rho
    cap = (radio.capacity(activity) * to_mb).astype(np.float32)
    del activity
    congested = load > cap
    info = {"congested_sector_steps": float(congested.mean()),
            "lost_net_share": float((load - np.minimum(load, cap)).sum() / max(float(load.sum()), 1e-12)),
            "peak_utilization_p99": float(np.quantile((load / cap).max(0), 0.99))}
    r = float(p.get("net_record_share", 0.0)) if p is not None else 0.0
    if r > 0:
        return (np.float32(r) * load + np.float32(1 - r) * np.minimum(load, cap)).astype(np.float32), info
    np.minimum(load, cap, out=load)
    return load, info


def attribute(sector_traffic: np.ndarray, radio: RadioMap) -> np.ndarray:
    """Squares' booked traffic (T, N) float32 from sector traffic (T, S)."""
    return np.ascontiguousarray((radio.attribute @ sector_traffic.T).T, dtype=np.float32)


def count_noise(mu: np.ndarray, kind: str, k: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson or negative-binomial counts with mean ``mu`` (variance mu + mu^2 / k), float32."""
    mu = np.maximum(mu, 0)
    if kind == "negbin":
        mu = rng.gamma(shape=k, scale=1.0, size=mu.shape).astype(np.float32) * (mu / np.float32(k))
    return rng.poisson(mu).astype(np.float32)


def volume_noise(x: np.ndarray, sigma: float, df: float, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed multiplicative noise: x * exp(sigma * t_df), t clipped at +-6 (no infinities)."""
    if sigma <= 0:
        return x
    t = np.clip(rng.standard_t(df, size=x.shape), -6, 6).astype(np.float32)
    return x * np.exp(np.float32(sigma) * t)


def draw_mask(T: int, N: int, radio: RadioMap, step: int, p: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Observed mask (T, N) bool: random missing records, grid-wide gaps, sector outages."""
    observed = rng.uniform(size=(T, N)) >= p["missing_rate"]
    # grid-wide gaps: runs of 1-5 steps, starts chosen so that about gap_rate of steps are lost
    starts = np.nonzero(rng.uniform(size=T) < p["gap_rate"] / 3.0)[0]
    for s0 in starts:
        observed[s0:s0 + int(rng.integers(1, 6))] = False
    # sector outages: 1-12 hours each, Poisson in number
    weeks = T * step / (7 * 86400)
    n_out = rng.poisson(p["outage_per_sector_week"] * weeks * radio.n_sectors)
    order = np.argsort(radio.dominant, kind="stable")
    bounds = np.searchsorted(radio.dominant[order], np.arange(radio.n_sectors + 1))
    sectors = rng.integers(0, radio.n_sectors, n_out)
    t0 = rng.integers(0, T, n_out)
    length = np.maximum(1, (rng.uniform(1, 12, n_out) * 3600 / step).astype(int))
    for s, a, n in zip(sectors, t0, length):
        cells = order[bounds[s]:bounds[s + 1]]
        if cells.size:
            observed[a:a + n, cells] = False
    return observed, {"gap_steps": int(len(starts)), "sector_outages": int(n_out)}
