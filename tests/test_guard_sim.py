"""Guards for the simulator's random streams and the realism statistics (issue 15).

The realism statistics are checked on hand-built grids with known answers and against
brute-force formulas, never only against themselves."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from simmstnet.data.grid import TrafficGrid
from simmstnet.sim.randomization import Range, SPECS, preset_space, sample_params
from simmstnet.sim.realism import grid_stats, mmd2
from simmstnet.sim.simulator import simulate_scenario
from tests.conftest import make_grid

TINY = dict(rows=4, cols=4, days=2, step=3600)


# ----------------------------------------------------------------------------- simulator streams


def test_each_service_has_its_own_stream_whatever_is_requested():
    space = preset_space("milano-like")
    full = simulate_scenario(space, **TINY, seed=3, index=1)
    for subset in (("net",), ("sms", "call"), ("net", "call")):
        part = simulate_scenario(space, **TINY, seed=3, index=1, services=subset)
        assert part.services == subset
        for s in subset:
            np.testing.assert_array_equal(part.values[..., part.service_index(s)],
                                          full.values[..., full.service_index(s)])
            np.testing.assert_array_equal(part.mask[..., part.service_index(s)],
                                          full.mask[..., full.service_index(s)])


def test_seed_and_index_are_not_added_together():
    space = preset_space("milano-like")
    a = simulate_scenario(space, **TINY, seed=0, index=1, services=("net",))
    b = simulate_scenario(space, **TINY, seed=1, index=0, services=("net",))
    assert a.meta["sim_params"] != b.meta["sim_params"]
    assert not np.array_equal(a.values, b.values)
    # and the same (seed, index) is reproducible
    c = simulate_scenario(space, **TINY, seed=0, index=1, services=("net",))
    np.testing.assert_array_equal(a.values, c.values)


def test_sample_params_seed_and_index_are_distinct_streams():
    draws = {}
    for seed, index in [(0, 1), (1, 0), (0, 2), (2, 0), (1, 1)]:
        ss = np.random.SeedSequence(seed, spawn_key=(index,))
        draws[(seed, index)] = sample_params(preset_space("random"), ss)
    values = [tuple(sorted(d.items())) for d in draws.values()]
    assert len(set(values)) == len(values)


def test_changing_one_range_leaves_the_other_draws_alone():
    space = preset_space("random")
    randomized = [n for n, r in space.items() if r.kind != "fixed"]
    assert len(randomized) >= 3
    for seed in range(3):
        base = sample_params(space, np.random.SeedSequence(seed))
        for name in randomized[:4]:
            other = dict(space)
            other[name] = Range("fixed", lo=base[name])  # no draw for this one any more
            p = sample_params(other, np.random.SeedSequence(seed))
            assert p == base
            wider = dict(space)
            r = space[name]
            if r.kind == "uniform":
                wider[name] = dataclasses.replace(r, hi=r.lo + (r.hi - r.lo) * 0.5)
                q = sample_params(wider, np.random.SeedSequence(seed))
                assert {k: v for k, v in q.items() if k != name} == {k: v for k, v in base.items() if k != name}


def test_shift_draws_choice_parameters_from_the_choices_left_out():
    space = dict(preset_space("milano-like"))
    names = [n for n, s in SPECS.items() if s.kind == "choice"]
    assert names
    for n in names:
        # a range keeping only the first choice (built directly: a one-value YAML list is "fixed")
        space[n] = Range("choice", values=(SPECS[n].choices[0],))
    for seed in range(8):
        p = sample_params(space, np.random.SeedSequence(seed), shift=0.5)
        for n in names:
            assert p[n] in SPECS[n].choices and p[n] != SPECS[n].choices[0], (n, p[n])
        q = sample_params(space, np.random.SeedSequence(seed), shift=0.0)
        assert all(q[n] == SPECS[n].choices[0] for n in names)


# ----------------------------------------------------------------------------- realism statistics

# 2013-11-04 00:00 Europe/Rome (a Monday; no Italian holiday in the next two weeks)
MONDAY = 1383519600


def _grid(values: np.ndarray, step=3600, start=MONDAY) -> TrafficGrid:
    return TrafficGrid.from_values(values.astype(np.float32), start=start, step=step, services=("net",),
                                   meta={"source": "test", "timezone": "Europe/Rome"})


def _stats(grid):
    return grid_stats(grid, "net", np.random.default_rng(0))


def test_weekend_ratio_of_a_grid_with_half_traffic_on_weekends():
    T = 14 * 24
    day = np.arange(T) // 24                                  # 0 = Monday
    level = np.where(day % 7 >= 5, 1.0, 2.0)
    rng = np.random.default_rng(0)
    values = level[:, None, None, None] * rng.uniform(1, 3, size=(1, 2, 2, 1))
    s = _stats(_grid(values))
    assert s["weekend_ratio"] == pytest.approx(0.5, rel=1e-6)
    # weekly profile: Saturday and Sunday at half the working days' level
    assert s["weekly"][5] == pytest.approx(s["weekly"][0] / 2, rel=1e-6)


def _brute_acf(z, lag):
    rs = [np.corrcoef(z[:-lag, k], z[lag:, k])[0, 1] for k in range(z.shape[1])]
    return float(np.mean(rs))


def test_autocorrelation_at_one_day_and_one_week():
    rng = np.random.default_rng(1)
    T = 21 * 24
    daily = rng.uniform(1, 4, size=(24, 6))                   # a random daily pattern per square
    weekly = rng.uniform(0.5, 1.5, size=(7, 6))               # and a random weekly one
    x = daily[np.arange(T) % 24] * weekly[(np.arange(T) // 24) % 7] * rng.uniform(0.9, 1.1, size=(T, 6))
    grid = _grid(x.reshape(T, 2, 3, 1))
    s = _stats(grid)
    z = x / x.mean(0)
    assert s["acf_day"] == pytest.approx(_brute_acf(z, 24), abs=1e-6)
    assert s["acf_week"] == pytest.approx(_brute_acf(z, 168), abs=1e-6)
    # the check discriminates: neighbouring lags give clearly other values
    for lag in (23, 25):
        assert abs(_brute_acf(z, lag) - s["acf_day"]) > 0.05
    for lag in (167, 169):
        assert abs(_brute_acf(z, lag) - s["acf_week"]) > 0.05


def test_spatial_correlation_uses_the_euclidean_distance_between_squares():
    rng = np.random.default_rng(2)
    T, H, W = 24 * 7, 3, 4
    # Each column has its own random series; squares of one column differ by a little noise, so
    # vertical neighbours are highly correlated and horizontal ones are not.
    col = rng.gamma(2.0, 1.0, size=(T, 1, W)) + 0.5
    x = (col * np.ones((1, H, 1)) + rng.uniform(0, 0.3, size=(T, H, W))).astype(np.float32).astype(np.float64)
    s = _stats(_grid(x[..., None]))
    z = x.reshape(T, H * W) / x.reshape(T, H * W).mean(0)
    by_d: dict[int, list[float]] = {}
    for a, b in itertools.combinations(range(H * W), 2):
        (ra, ca), (rb, cb) = divmod(a, W), divmod(b, W)
        d = int(np.rint(np.hypot(ra - rb, ca - cb)))
        by_d.setdefault(d, []).append(np.corrcoef(z[:, a], z[:, b])[0, 1])
    for d in (1, 2, 3):
        assert s["spatial_corr"][d] == pytest.approx(np.mean(by_d[d]), abs=1e-9)
    assert set(s["spatial_corr"]) == {d for d in (1, 2, 3, 4) if d in by_d}


def _brute_mmd2(x, y, bw):
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * bw * bw))
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd2_is_the_unbiased_estimate():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, size=(7, 4))
    y = rng.normal(0.5, 1.2, size=(9, 4))
    val, bw = mmd2(x, y, bandwidth=1.7)
    assert bw == 1.7
    assert val == pytest.approx(_brute_mmd2(x, y, 1.7), rel=1e-9)
    # median heuristic: the median (squared) distance between the pooled points
    xy = np.concatenate([x, y])
    sq = [np.sum((xy[i] - xy[j]) ** 2) for i in range(len(xy)) for j in range(i + 1, len(xy))]
    val2, bw2 = mmd2(x, y)
    assert bw2 == pytest.approx(float(np.sqrt(np.median(sq))), rel=1e-9)
    assert val2 == pytest.approx(_brute_mmd2(x, y, bw2), rel=1e-9)
    # unbiased: two samples of one distribution can give a negative estimate, which a biased
    # (V-statistic) estimate never does
    same = [mmd2(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), 1.0)[0] for _ in range(20)]
    assert min(same) < 0


# ----------------------------------------------------------------------------- realism (make mutate)

def test_squares_without_traffic_are_left_out_of_the_statistics():
    from simmstnet.sim.realism import _normalized

    grid = make_grid(T=48, H=2, W=3, services=("net",), seed=4)
    values, mask = grid.values.copy(), grid.mask.copy()
    values[:, 0, 0] = 0.0  # a square with zero traffic (mean 0)
    mask[:, 1, 2] = False  # a square never observed (mean NaN)
    z, keep = _normalized(TrafficGrid(values, mask, grid.timestamps, grid.services, dict(grid.meta)), "net")
    assert keep.tolist() == [False, True, True, True, True, False]
    assert z.shape == (48, 4) and np.isfinite(z).all()
    assert np.nanmean(z, 0) == pytest.approx(np.ones(4))


def test_one_complete_local_day_is_one_day_window_per_square():
    from simmstnet.sim.demand import local_calendar
    from simmstnet.sim.realism import _day_windows, _normalized

    grid = make_grid(T=24, H=2, W=2, services=("net",), seed=5)  # 00:00 .. 23:00 local
    z, _ = _normalized(grid, "net")
    w = _day_windows(z, local_calendar(grid.timestamps, 0, grid.timezone), 24)
    assert w.shape == (4, 24) and w.mean(1) == pytest.approx(np.ones(4))


def test_report_helpers_name_services_format_numbers_and_write_plots(tmp_path):
    from simmstnet.sim.realism import _fmt, align, compare, plot_report

    real = make_grid(T=24 * 8, H=3, W=3, services=("call", "net"), seed=2)
    sim = make_grid(T=24 * 8, H=4, W=4, services=("call", "net"), seed=3)
    _, _, services, step = align(real, [sim], services=["net"])
    assert list(services) == ["net"] and step == 3600
    assert _fmt(0.5) == "0.500" and _fmt(float("nan")) == "n/a" and _fmt(None) == "n/a"
    paths = plot_report(compare(real, sim, services=["net"]), tmp_path)
    assert len(paths) == 1 and all(p is not None and p.is_file() and p.stat().st_size > 0 for p in paths)
