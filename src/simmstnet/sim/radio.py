"""Radio network: path loss, shadowing, best server, SINR and sector capacity.

Sources
- Path loss and line-of-sight probability: 3GPP TR 38.901 v17, Table 7.4.1-1 (UMa, UMi-Street
  Canyon) and Table 7.4.2-1. UE height 1.5 m, effective environment height 1 m, masts 25 m (UMa)
  and 10 m (UMi) as in Table 7.2-1 of the same report. Formulas are used as given, also past
  their 5 km validity limit (rural squares far from a site).
- Sector antenna: horizontal pattern A(phi) = -min(12 (phi/65 deg)^2, 30 dB) (TR 38.901 Table
  7.3-1), 15 dBi peak gain.
- Shadowing: log-normal, spatially correlated with the exponential model of Gudmundson (1991)
  (correlation exp(-d/d_corr)); each site sees its own field, the sectors of a site share it.
- Throughput: attenuated Shannon bound SE = min(alpha * log2(1 + SINR), SE_max), zero below
  -10 dB (3GPP TR 36.942 Annex A.1). Thermal noise -174 dBm/Hz, UE noise figure 9 dB.
- Load-dependent interference: an interfering sector transmits a share rho_j (its utilization)
  of the time, so SINR = S / (sum_j rho_j I_j + N). Per sector the capacity is tabulated over the
  interferers' mean activity a in [0, 1], and a_s(t) = sum_j W_sj rho_j(t) with W_sj the share of
  sector s's interference that comes from j. Sector capacity for volume traffic is the
  demand-weighted harmonic mean of B * SE over the places it serves (each place takes air time
  volume / rate: round-robin scheduling of equal volumes).

Only the ``K_SITES`` nearest sites of each place are candidates for serving and interfering;
farther ones add less than the noise in every preset (documented truncation).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from simmstnet.sim.geometry import City

H_BS = {"UMa": 25.0, "UMi": 10.0}
H_UT = 1.5
C_LIGHT = 299_792_458.0
ANTENNA_GAIN_DBI = 15.0
NOISE_FIGURE_DB = 9.0
SINR_MIN_DB = -10.0
K_SITES = 8
ACTIVITY_LEVELS = np.linspace(0.0, 1.0, 6)


def los_probability(d2d: np.ndarray, scenario: str, h_ut: float = H_UT) -> np.ndarray:
    """TR 38.901 Table 7.4.2-1 line-of-sight probability at 2-D distance ``d2d`` (m)."""
    d = np.maximum(np.asarray(d2d, dtype=np.float64), 1e-9)
    if scenario == "UMi":
        p = 18 / d + np.exp(-d / 36) * (1 - 18 / d)
    elif scenario == "UMa":
        c = 0.0 if h_ut <= 13 else ((h_ut - 13) / 10) ** 1.5
        p = (18 / d + np.exp(-d / 63) * (1 - 18 / d)) * (1 + c * 1.25 * (d / 100) ** 3 * np.exp(-d / 150))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return np.where(d <= 18, 1.0, p)


def pathloss_db(d2d: np.ndarray, scenario: str, los: np.ndarray | bool, fc_ghz: float,
                h_bs: float | None = None, h_ut: float = H_UT) -> np.ndarray:
    """TR 38.901 Table 7.4.1-1 path loss (dB) for UMa / UMi-Street Canyon, LOS or NLOS.

    ``d2d`` in metres (clipped below at the formula's 10 m), ``fc_ghz`` in GHz; NLOS is
    max(PL_LOS, PL'_NLOS) as the table prescribes.
    """
    h_bs = H_BS[scenario] if h_bs is None else h_bs
    d2d = np.maximum(np.asarray(d2d, dtype=np.float64), 10.0)
    d3d = np.sqrt(d2d**2 + (h_bs - h_ut) ** 2)
    h_e = 1.0  # effective environment height for h_ut < 13 m
    d_bp = 4 * (h_bs - h_e) * (h_ut - h_e) * fc_ghz * 1e9 / C_LIGHT
    lf = 20 * np.log10(fc_ghz)
    if scenario == "UMa":
        pl1 = 28.0 + 22 * np.log10(d3d) + lf
        pl2 = 28.0 + 40 * np.log10(d3d) + lf - 9 * np.log10(d_bp**2 + (h_bs - h_ut) ** 2)
        pl_los = np.where(d2d <= d_bp, pl1, pl2)
        pl_nlos = 13.54 + 39.08 * np.log10(d3d) + lf - 0.6 * (h_ut - 1.5)
    elif scenario == "UMi":
        pl1 = 32.4 + 21 * np.log10(d3d) + lf
        pl2 = 32.4 + 40 * np.log10(d3d) + lf - 9.5 * np.log10(d_bp**2 + (h_bs - h_ut) ** 2)
        pl_los = np.where(d2d <= d_bp, pl1, pl2)
        pl_nlos = 35.3 * np.log10(d3d) + 22.4 + 21.3 * np.log10(fc_ghz) - 0.3 * (h_ut - 1.5)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return np.where(los, pl_los, np.maximum(pl_los, pl_nlos))


def antenna_gain_db(offset_deg: np.ndarray, sectors: int) -> np.ndarray:
    """Sector antenna gain at angle ``offset_deg`` off boresight (omni when one sector)."""
    if sectors == 1:
        return np.full(np.shape(offset_deg), ANTENNA_GAIN_DBI - 6.0)
    return ANTENNA_GAIN_DBI - np.minimum(12 * (np.asarray(offset_deg) / 65.0) ** 2, 30.0)


def spectral_efficiency(sinr_lin: np.ndarray, alpha: float, se_cap: float) -> np.ndarray:
    """Attenuated Shannon (TR 36.942 A.1): bit/s/Hz, 0 below SINR_MIN_DB, capped at ``se_cap``."""
    se = np.minimum(alpha * np.log2(1 + sinr_lin), se_cap)
    return np.where(sinr_lin < 10 ** (SINR_MIN_DB / 10), 0.0, se)


def exponential_fields(n: int, shape: tuple[int, int], corr_px: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` periodic unit-variance fields (n, h, w) with correlation ~ exp(-d / corr_px).

    Spectral synthesis: the 2-D power spectrum of the exponential covariance is proportional to
    (1 + (2 pi k d)^2)^(-3/2); white noise is coloured by its square root.
    """
    h, w = shape
    white = rng.standard_normal((n, h, w))
    if corr_px < 0.2:
        return white
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    spec = (1 + (2 * np.pi * corr_px) ** 2 * (kx**2 + ky**2)) ** -1.5
    f = np.fft.irfft2(np.fft.rfft2(white) * np.sqrt(spec), s=(h, w))
    f -= f.mean(axis=(1, 2), keepdims=True)
    return f / (f.std(axis=(1, 2), keepdims=True) + 1e-12)


@dataclasses.dataclass
class RadioMap:
    """What the traffic model needs from the radio network (N squares, S sectors, L levels).

    serve       csr (N, S) float32: share of square i's demand served by sector s (rows sum 1)
    attribute   csr (N, S) float32: share of sector s's traffic the operator books on square i,
                by coverage overlap (columns of covering sectors sum 1)
    coupling    csr (S, S) float32: W_sj, share of s's interference coming from j (rows sum 1)
    cap_bps     float64 (S, L) capacity at interferer activity ACTIVITY_LEVELS
    dominant    int (N,) sector booking the largest share on each square (for outages)
    info        dict of summary numbers for meta
    """

    serve: sparse.csr_matrix
    attribute: sparse.csr_matrix
    coupling: sparse.csr_matrix
    cap_bps: np.ndarray
    dominant: np.ndarray
    info: dict

    @property
    def n_sectors(self) -> int:
        return self.serve.shape[1]

    def capacity(self, activity: np.ndarray) -> np.ndarray:
        """Capacity (bit/s), same shape as ``activity`` (..., S), interpolated in the table."""
        a = np.clip(activity, 0.0, 1.0) * (len(ACTIVITY_LEVELS) - 1)
        i = np.minimum(a.astype(np.int64), len(ACTIVITY_LEVELS) - 2)
        f = a - i
        s = np.arange(self.cap_bps.shape[0])
        return self.cap_bps[s, i] * (1 - f) + self.cap_bps[s, i + 1] * f


def build_radio(city: City, sites: np.ndarray, p: dict, rng: np.random.Generator) -> RadioMap:
    """Serve, attribution and capacity for ``sites`` (M, 2) over ``city`` with parameters ``p``."""
    cell = city.cell_m
    H, W = city.rows, city.cols
    # sub-points: 2 x 2 per square, so coverage boundaries cut through squares as they do in reality
    sub = 2
    spacing = cell / sub
    pr, pc = np.meshgrid(np.arange(H * sub), np.arange(W * sub), indexing="ij")
    pr, pc = pr.ravel(), pc.ravel()
    pts = np.stack([(pc + 0.5) * spacing, (pr + 0.5) * spacing], 1)
    owner = (pr // sub) * W + (pc // sub)
    n_pts = len(pts)

    n_sec = int(p["sectors"])
    k = min(K_SITES, len(sites))
    dist, site_idx = cKDTree(sites).query(pts, k=k)
    dist, site_idx = dist.reshape(n_pts, k), site_idx.reshape(n_pts, k)
    scenario = p["scenario"]
    los = rng.uniform(size=dist.shape) < los_probability(dist, scenario)
    pl = pathloss_db(dist, scenario, los, p["carrier_ghz"])
    # shadowing: per-site field, shared by the site's sectors; fields reused with random offsets
    n_fields = min(16, len(sites))
    fields = exponential_fields(n_fields, (H * sub, W * sub), p["shadow_corr_m"] / spacing, rng)
    f_of_site = rng.integers(0, n_fields, len(sites))
    off_r = rng.integers(0, H * sub, len(sites))
    off_c = rng.integers(0, W * sub, len(sites))
    shadow = p["shadow_std_db"] * fields[f_of_site[site_idx], (pr[:, None] + off_r[site_idx]) % (H * sub),
                                         (pc[:, None] + off_c[site_idx]) % (W * sub)]
    azimuth0 = rng.uniform(0, 360, len(sites))
    bearing = np.degrees(np.arctan2(pts[:, None, 1] - sites[site_idx, 1], pts[:, None, 0] - sites[site_idx, 0]))
    sec = np.arange(n_sec)
    boresight = azimuth0[site_idx][..., None] + sec * 360.0 / n_sec  # (P, k, n_sec)
    offset = np.abs((bearing[..., None] - boresight + 180) % 360 - 180)
    rx_dbm = p["tx_power_dbm"] + antenna_gain_db(offset, n_sec) - (pl + shadow)[..., None]
    rx_dbm = rx_dbm.reshape(n_pts, k * n_sec)
    sector_id = (site_idx[..., None] * n_sec + sec).reshape(n_pts, k * n_sec)
    # keep only sectors that some place can hear: the others carry nothing and interfere with
    # nothing here, and would only inflate the (T, S) arrays of large sparse areas
    used, sector_id = np.unique(sector_id, return_inverse=True)
    sector_id = sector_id.reshape(n_pts, k * n_sec)
    n_sectors = len(used)

    best = np.argmax(rx_dbm, 1)
    best_dbm = rx_dbm[np.arange(n_pts), best]
    serving = sector_id[np.arange(n_pts), best]
    rx_mw = 10 ** (rx_dbm / 10)
    signal = rx_mw[np.arange(n_pts), best]
    interf = rx_mw.sum(1) - signal
    bw_hz = p["bandwidth_mhz"] * 1e6
    noise_mw = 10 ** ((-174 + 10 * np.log10(bw_hz) + NOISE_FIGURE_DB) / 10)
    sinr = signal[:, None] / (ACTIVITY_LEVELS[None, :] * interf[:, None] + noise_mw)  # (P, L)
    se = np.maximum(spectral_efficiency(sinr, p["shannon_alpha"], p["se_cap_bps_hz"]), 0.05)
    # demand weight of a place: people of its square (residents and day visitors alike)
    weight = (city.residents + city.day_weight * city.residents.sum()).ravel()[owner] + 1e-9
    w_sum = np.bincount(serving, weights=weight, minlength=n_sectors)
    inv_se = np.stack([np.bincount(serving, weights=weight / se[:, j], minlength=n_sectors)
                       for j in range(len(ACTIVITY_LEVELS))], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cap = np.where(w_sum[:, None] > 0, bw_hz * w_sum[:, None] / inv_se, bw_hz * p["se_cap_bps_hz"])

    other = np.ones_like(rx_mw, dtype=bool)
    other[np.arange(n_pts), best] = False
    rows = np.broadcast_to(serving[:, None], rx_mw.shape)[other]
    coupling = sparse.coo_matrix(((rx_mw * weight[:, None])[other], (rows, sector_id[other])),
                                 shape=(n_sectors, n_sectors)).tocsr()
    row_sum = np.asarray(coupling.sum(1)).ravel()
    coupling = sparse.diags(np.where(row_sum > 0, 1 / np.maximum(row_sum, 1e-300), 0)) @ coupling

    n_cells = H * W
    serve = sparse.coo_matrix((np.full(n_pts, 1.0 / sub**2), (owner, serving)),
                              shape=(n_cells, n_sectors)).tocsr()
    covers = rx_dbm >= (best_dbm - p["coverage_margin_db"])[:, None]
    cov = sparse.coo_matrix((np.ones(int(covers.sum())), (np.broadcast_to(owner[:, None], covers.shape)[covers],
                                                          sector_id[covers])),
                            shape=(n_cells, n_sectors)).tocsr()
    col_sum = np.asarray(cov.sum(0)).ravel()
    attribute = (cov @ sparse.diags(np.where(col_sum > 0, 1 / np.maximum(col_sum, 1), 0))).tocsr()
    dominant = np.asarray(attribute.argmax(1)).ravel()

    sinr_full_db = 10 * np.log10(sinr[:, -1])
    info = {"n_sites": int(len(sites)), "n_sectors": int(len(sites) * n_sec), "n_sectors_heard": int(n_sectors),
            "serving_sectors": int(np.unique(serving).size),
            "los_share": float(los[np.arange(n_pts), best // n_sec].mean()),
            "sinr_full_load_db_median": float(np.median(sinr_full_db)),
            "sinr_full_load_db_p10": float(np.quantile(sinr_full_db, 0.1)),
            "cap_full_load_mbps_median": float(np.median(cap[np.unique(serving), -1]) / 1e6),
            "sectors_per_square_attributed": float(np.diff(attribute.indptr).mean())}
    return RadioMap(serve.astype(np.float32), attribute.astype(np.float32),
                    coupling.astype(np.float32).tocsr(), cap, dominant, info)
