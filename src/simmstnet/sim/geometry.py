"""City geometry: grid squares, land use, night and day populations, base-station sites.

Coordinates are metres, x east along columns and y along rows, square (r, c) centred at
((c + 0.5) * cell, (r + 0.5) * cell). Land use is a soft mixture of five classes per square
(business, residential, transport, nightlife, park), the softmax of smooth Gaussian random fields
plus hotspots. Residents follow a main centre, secondary towns and a floor, textured by a random
field (the radial, polycentric density of Italian cities and valleys); the day population moves a
share of residents towards business and transport squares.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

LANDUSE = ("business", "residential", "transport", "nightlife", "park")
# spread of the per-square weekend multiplier (log scale), matched to the per-square weekend
# ratios of the real Milano block (std of log ratio about 0.2)
WEEKEND_TEXTURE_SIGMA = 0.2
MAX_CANDIDATES = 500_000


@dataclasses.dataclass
class City:
    """Squares, land use and people of one simulated city.

    rows, cols      grid size H, W;  cell_m: side of a square in metres
    landuse         float32 (5, H, W) class fractions (sum 1 over axis 0), order LANDUSE
    residents       float64 (H, W) night population (people, all operators)
    day_weight      float64 (H, W) where commuters spend the working day (sums to 1)
    centre          (2,) x, y of the main centre in metres
    weekend_factor  float64 (H, W) local multiplier of non-working-day activity (mean about 1):
                    shops, churches, tourist sights make some squares busier on Sundays than
                    their land use says (real Milano squares range from 0.5 to 1.1)
    """

    rows: int
    cols: int
    cell_m: float
    landuse: np.ndarray
    residents: np.ndarray
    day_weight: np.ndarray
    centre: np.ndarray
    weekend_factor: np.ndarray

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols

    def cell_xy(self) -> np.ndarray:
        """(H*W, 2) square centres in metres, row-major."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return np.stack([(c.ravel() + 0.5) * self.cell_m, (r.ravel() + 0.5) * self.cell_m], 1)


def gaussian_field(shape: tuple[int, int], corr_cells: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance smooth random field: white noise through a Gaussian filter."""
    white = rng.standard_normal(shape)
    if corr_cells > 0.3:
        white = ndimage.gaussian_filter(white, sigma=corr_cells, mode="reflect")
    return (white - white.mean()) / (white.std() + 1e-12)


def _blobs(xy: np.ndarray, centres: np.ndarray, radius: float, heights: np.ndarray) -> np.ndarray:
    """Sum of Gaussian bumps at ``centres`` (K, 2) over points ``xy`` (N, 2)."""
    if len(centres) == 0:
        return np.zeros(len(xy))
    d2 = ((xy[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return (heights[None, :] * np.exp(-0.5 * d2 / radius**2)).sum(1)


def build_city(rows: int, cols: int, p: dict, rng: np.random.Generator) -> City:
    """Land use and populations for an H x W grid with parameters ``p`` (see randomization)."""
    cell = float(p["cell_size_m"])
    H, W = rows, cols
    # (H*W, 2) square centres, row-major over (r, c)
    xy = np.stack([np.tile((np.arange(W) + 0.5) * cell, H), np.repeat((np.arange(H) + 0.5) * cell, W)], 1)
    ext = np.array([W * cell, H * cell])
    # main centre near the middle of the raster (Milano's raster is centred on the Duomo)
    centre = ext * (0.5 + rng.uniform(-0.1, 0.1, 2))
    r_km = np.hypot(*(xy - centre).T) / 1000
    density = p["density_peak_per_km2"] * np.exp(-r_km / p["centre_decay_km"])
    n_towns = int(p["n_towns"])
    towns = rng.uniform(0, 1, (n_towns, 2)) * ext
    town_peak = p["density_peak_per_km2"] * p["town_scale"] * rng.uniform(0.3, 1.0, n_towns)
    for (tx, ty), peak in zip(towns, town_peak):
        density = density + peak * np.exp(-np.hypot(xy[:, 0] - tx, xy[:, 1] - ty) / 1000 / p["town_decay_km"])
    density = density + p["density_floor_per_km2"]
    corr_cells = p["landuse_corr_km"] * 1000 / cell
    # texture: log-normal field (blocks, rail yards, rivers) at the land-use scale
    density = density * np.exp(0.35 * gaussian_field((H, W), corr_cells, rng).ravel() - 0.5 * 0.35**2)
    area_km2 = (cell / 1000) ** 2
    residents = density * area_km2

    urban = np.log(density / density.max())  # <= 0, 0 at the densest square
    hot_r = max(400.0, 1.5 * cell)
    biz_hot = _blobs(xy, centre + rng.normal(0, 1500, (int(p["n_business_hotspots"]), 2)), hot_r,
                     rng.uniform(1.5, 3.0, int(p["n_business_hotspots"])))
    hubs = rng.uniform(0.15, 0.85, (int(p["n_transport_hubs"]), 2)) * ext
    hub_hot = _blobs(xy, hubs, max(250.0, cell), rng.uniform(2.0, 3.5, len(hubs)))
    scores = np.stack([
        1.2 * np.exp(-r_km / 2.0) + biz_hot + 0.8 * gaussian_field((H, W), corr_cells, rng).ravel() - 0.5,
        0.6 + 0.3 * urban + 0.8 * gaussian_field((H, W), corr_cells, rng).ravel(),
        hub_hot + 0.5 * gaussian_field((H, W), corr_cells, rng).ravel() - 1.5,
        1.5 * np.exp(-r_km / 1.5) + 0.8 * gaussian_field((H, W), corr_cells / 2, rng).ravel() - 1.2,
        np.log(p["park_share"] + 1e-3) + 1.0 - 0.3 * urban + 0.8 * gaussian_field((H, W), corr_cells, rng).ravel(),
    ])
    z = scores / p["landuse_temperature"]
    z = np.exp(z - z.max(0))
    landuse = (z / z.sum(0)).astype(np.float32)
    # day destinations: jobs sit in business and transport squares, some in every populated square
    day = residents * (0.15 + 3.0 * landuse[0] + 2.0 * landuse[2] + 0.5 * landuse[3] + 0.1 * landuse[4])
    weekend = np.exp(WEEKEND_TEXTURE_SIGMA * gaussian_field((H, W), 1.0, rng) - 0.5 * WEEKEND_TEXTURE_SIGMA**2)
    return City(H, W, cell, landuse.reshape(5, H, W), residents.reshape(H, W),
                (day / day.sum()).reshape(H, W), centre, weekend)


def place_sites(city: City, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Base-station sites (S, 2) in metres, over the grid plus one rural spacing of margin.

    Site density follows population: ``rho(x) ~ pop(x) ** bs_pop_exponent``, scaled so the
    densest square gets one site per hexagon of ``bs_spacing_m`` and clipped below at
    ``bs_rural_spacing_m`` (operators densify where traffic is, and cover everywhere).
    ``hex``: a jittered hexagonal lattice at the densest spacing, thinned to that density.
    ``ppp``: an inhomogeneous Poisson point process with that density (thinning).
    At most about MAX_CANDIDATES candidate sites are generated (the densest spacing is widened
    if needed).
    """
    cell = city.cell_m
    d_min, d_max = float(p["bs_spacing_m"]), max(float(p["bs_rural_spacing_m"]), float(p["bs_spacing_m"]))
    margin = d_max
    lo = np.array([-margin, -margin])
    hi = np.array([city.cols * cell + margin, city.rows * cell + margin])
    # a huge area at a tiny spacing (possible far outside the presets) would need millions of
    # candidate sites: widen the densest spacing just enough to stay under MAX_CANDIDATES
    d_floor = float(np.sqrt(np.prod(hi - lo) / (MAX_CANDIDATES * np.sqrt(3) / 2)))
    d_min = max(d_min, d_floor)
    d_max = max(d_max, d_min)
    pop = ndimage.gaussian_filter(city.residents, sigma=max(1.0, 0.5 * d_min / cell), mode="nearest")
    rel = (pop / pop.max()) ** p["bs_pop_exponent"]

    def keep_prob(pts: np.ndarray) -> np.ndarray:
        c = np.clip((pts[:, 0] // cell).astype(int), 0, city.cols - 1)
        r = np.clip((pts[:, 1] // cell).astype(int), 0, city.rows - 1)
        return np.maximum(rel[r, c], (d_min / d_max) ** 2)

    if p["bs_layout"] == "hex":
        dy = d_min * np.sqrt(3) / 2
        ys = np.arange(lo[1], hi[1] + dy, dy)
        xs = np.arange(lo[0], hi[0] + d_min, d_min)
        gx, gy = np.meshgrid(xs, ys)
        gx = gx + (np.arange(len(ys))[:, None] % 2) * d_min / 2
        pts = np.stack([gx.ravel(), gy.ravel()], 1)
        pts = pts + rng.uniform(-1, 1, pts.shape) * p["bs_jitter"] * d_min
    else:
        area = float(np.prod(hi - lo))
        lam_max = 1.0 / (d_min**2 * np.sqrt(3) / 2)
        n = rng.poisson(lam_max * area)
        pts = lo + rng.uniform(0, 1, (n, 2)) * (hi - lo)
    pts = pts[rng.uniform(0, 1, len(pts)) < keep_prob(pts)]
    if len(pts) == 0:  # a tiny grid in a sparse area: one site at the centre
        pts = ((lo + hi) / 2)[None, :]
    return pts
