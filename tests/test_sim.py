"""The simulator end to end: determinism, shapes, masks, periodicity, services, presets, errors."""
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from simmstnet.errors import UserError
from simmstnet.sim import demand as dm
from simmstnet.sim.randomization import (PRESETS, SPECS, build_space, load_space_file, params_table_markdown,
                                         preset_space, sample_params)
from simmstnet.sim.simulator import load_sim_data, simulate, simulate_to_path

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(rows=8, cols=8, days=14, seed=0)


@pytest.fixture(scope="module")
def city():
    return simulate("milano-like", **SMALL)[0]


def test_same_seed_same_grid_other_seed_other_grid():
    a = simulate("milano-like", rows=6, cols=6, days=3, seed=5)[0]
    b = simulate("milano-like", rows=6, cols=6, days=3, seed=5)[0]
    c = simulate("milano-like", rows=6, cols=6, days=3, seed=6)[0]
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.meta["sim_params"] == b.meta["sim_params"]
    assert not np.array_equal(a.values, c.values)


def test_scenario_does_not_depend_on_count_or_workers():
    one = simulate("trento-like", rows=5, cols=5, days=2, seed=3, scenarios=2)
    par = simulate("trento-like", rows=5, cols=5, days=2, seed=3, scenarios=3, workers=2)
    for i in range(2):
        np.testing.assert_array_equal(one[i].values, par[i].values)
    assert not np.array_equal(par[0].values, par[1].values)
    assert [g.meta["scenario"] for g in par] == [0, 1, 2]


def test_shapes_mask_and_nonnegativity(city):
    T, H, W, C = city.shape
    assert (T, H, W, C) == (14 * 24, 8, 8, 3) and city.services == ("call", "sms", "net")
    assert city.values.dtype == np.float32 and city.mask.dtype == bool
    assert np.all(city.values >= 0) and np.all(np.isfinite(city.values))
    assert np.all(city.values[~city.mask] == 0)
    # starts at 2013-11-01 00:00 Europe/Rome = 2013-10-31 23:00 UTC, hourly
    assert city.timestamps[0] == 1383260400 and city.step == 3600
    assert city.meta["timezone"] == "Europe/Rome" and city.meta["source"] == "simulator"
    json.dumps(city.meta)  # everything recorded is JSON-serializable


def test_missing_rate_and_gaps_become_mask():
    g = simulate("milano-like", rows=10, cols=10, days=4, seed=1,
                 config={"missing_rate": 0.1, "gap_rate": 0.0, "outage_per_sector_week": 0.0})[0]
    assert g.missing_share() == pytest.approx(0.1, abs=0.02)
    g = simulate("milano-like", rows=6, cols=6, days=10, seed=1,
                 config={"missing_rate": 0.0, "gap_rate": 0.1, "outage_per_sector_week": 0.0})[0]
    per_step = g.mask.reshape(g.shape[0], -1).mean(1)
    assert set(np.unique(per_step)) == {0.0, 1.0}  # gaps blank the whole grid at once
    assert 0.03 < (per_step == 0).mean() < 0.25


def _acf(x, lag):
    x = x - x.mean()
    return float((x[:-lag] * x[lag:]).mean() / x.var())


def test_daily_periodicity(city):
    for c, s in enumerate(city.services):
        total = city.values[..., c].sum((1, 2))
        assert _acf(total, 24) > 0.6, s
        assert _acf(total, 24) > _acf(total, 12) + 0.5, s


def test_services_differ(city):
    hours = np.arange(city.shape[0]) % 24  # local midnight start, no DST change in November
    prof = {}
    for c, s in enumerate(city.services):
        total = city.values[..., c].sum((1, 2))
        p = np.array([total[hours == h].mean() for h in range(24)])
        prof[s] = p / p.mean()
    assert 9 <= int(np.argmax(prof["call"])) <= 17          # Call peaks in working hours
    assert 9 <= int(np.argmax(prof["sms"])) <= 19
    evening_over_midday = {s: prof[s][19:23].mean() / prof[s][10:13].mean() for s in prof}
    assert evening_over_midday["net"] > evening_over_midday["call"] + 0.3  # Net's evening plateau
    assert prof["call"].max() / prof["call"].min() > 2 * prof["net"].max() / prof["net"].min()
    assert np.corrcoef(prof["call"], prof["net"])[0, 1] < 0.95
    assert not np.allclose(city.values[..., 0], city.values[..., 1])


def test_weekend_and_holidays_are_lower_for_calls():
    g = simulate("milano-like", rows=6, cols=6, days=28, seed=2, services=("call",),
                 config={"events_per_week": 0.0})[0]
    daily = g.values[..., 0].reshape(28, 24, -1).sum((1, 2))
    # 2013-11-01 is a Friday holiday; 11-02/03 and every later Sat/Sun are weekend days
    off = [0, 1, 2, 8, 9, 15, 16, 22, 23]
    work = [d for d in range(28) if d not in off]
    assert daily[off].mean() < 0.9 * daily[work].mean()


def test_calendar_knows_italian_holidays():
    # 2014-04-20 Easter Sunday, 04-21 Easter Monday (holiday), 04-22 a Tuesday, 04-25 Liberation Day
    start = int(dt.datetime(2014, 4, 20, 12, tzinfo=dt.timezone.utc).timestamp())
    cal = dm.local_calendar(np.array([start + 86400 * k for k in (0, 1, 2, 5)], dtype=np.int64), 3600)
    assert cal.daytype.tolist() == [2, 2, 0, 2]
    ts = np.array([1387666800 + 86400 * k for k in range(5)], dtype=np.int64)  # 2013-12-22 .. 26 local
    cal = dm.local_calendar(ts, 3600)
    assert cal.daytype.tolist() == [2, 0, 0, 2, 2]  # Sun, Mon, Tue, Christmas, St Stephen
    assert cal.xmas.tolist() == [False, False, True, True, True]


def test_ten_minute_step_and_start_date():
    g = simulate("milano-like", rows=4, cols=4, days=1, step="10min", seed=0, start="2013-12-01")[0]
    assert g.shape[0] == 144 and g.step == 600
    assert g.timestamps[0] == 1385852400  # 2013-12-01 00:00 Europe/Rome


def test_events_add_local_bursts():
    base = dict(rows=12, cols=12, days=7, seed=4, services=("net",))
    quiet = simulate("milano-like", config={"events_per_week": 0.0, "event_size": 20.0}, **base)[0]
    busy = simulate("milano-like", config={"events_per_week": 10.0, "event_size": 20.0}, **base)[0]
    ev = busy.meta["sim_events"]
    assert len(ev) > 3 and quiet.meta["sim_events"] == []
    diff = busy.values[..., 0] - quiet.values[..., 0]
    r, c = ev[0]["row"], ev[0]["col"]
    # the first event's square gains traffic; a square far from every event does not
    far = max(((i, j) for i in range(12) for j in range(12)),
              key=lambda ij: min(abs(ij[0] - e["row"]) + abs(ij[1] - e["col"]) for e in ev))
    assert diff[:, r, c].max() > 5 * np.abs(diff[:, far[0], far[1]]).max() + 1e-6


def test_congestion_when_demand_exceeds_capacity():
    cfg = {"net_kbps_per_user": 400.0, "bandwidth_mhz": 5.0, "events_per_week": 0.0}
    g = simulate("milano-like", rows=8, cols=8, days=2, seed=0, services=("net",), config=cfg)[0]
    d = g.meta["sim_derived"]
    assert d["net_congested_sector_steps"] > 0.05 and d["net_lost_net_share"] > 0.01
    low = simulate("milano-like", rows=8, cols=8, days=2, seed=0, services=("net",),
                   config=dict(cfg, net_kbps_per_user=0.5))[0]
    assert low.meta["sim_derived"]["net_congested_sector_steps"] == 0.0


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameters_land_in_their_documented_ranges(preset):
    space = preset_space(preset)
    for i in range(40):
        p = sample_params(space, np.random.SeedSequence(i))
        assert set(p) == set(SPECS)
        for name, value in p.items():
            assert space[name].contains(value), (preset, name, value, space[name])
    g = simulate(preset, rows=4, cols=4, days=1, seed=9)[0]
    assert all(space[k].contains(v) for k, v in g.meta["sim_params"].items())
    assert g.meta["preset"] == preset


def test_documented_table_matches_the_presets():
    doc = (REPO / "docs" / "simulator.md").read_text()
    assert params_table_markdown() in doc, "regenerate the table in docs/simulator.md"


def test_shift_draws_outside_the_ranges():
    space = preset_space("milano-like")
    randomized = [n for n, r in space.items() if r.kind != "fixed"]
    outside = 0
    for i in range(10):
        p = sample_params(space, np.random.SeedSequence(i), shift=0.5)
        outside += sum(not space[n].contains(p[n]) for n in randomized)
        for n, spec in SPECS.items():
            if spec.bounds is not None:
                assert spec.bounds[0] <= p[n] <= spec.bounds[1]
    assert outside / (10 * len(randomized)) > 0.95


def test_save_single_and_folder_and_load(tmp_path):
    one = simulate_to_path(tmp_path / "one.npz", rows=4, cols=4, days=1, seed=0, progress=False)
    grids = load_sim_data(one)
    assert len(grids) == 1 and grids[0].meta["sim_params"]["cell_size_m"] == 235
    folder = simulate_to_path(tmp_path / "many", rows=4, cols=4, days=1, scenarios=3, seed=0, progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert [e["file"] for e in index["files"]] == [f"scenario-{i:04d}.npz" for i in range(3)]
    grids = load_sim_data(folder)
    assert [g.meta["scenario"] for g in grids] == [0, 1, 2]
    np.testing.assert_array_equal(grids[0].values, load_sim_data(one)[0].values)
    with pytest.raises(UserError, match="index.json"):
        load_sim_data(tmp_path)
    with pytest.raises(UserError, match="folder"):
        simulate_to_path(tmp_path / "x.npz", rows=4, cols=4, days=1, scenarios=2, progress=False)


@pytest.mark.parametrize("text,match", [
    ("params:\n  bs_spacingm: [300, 600]\n", "unknown parameter 'bs_spacingm'.*bs_spacing_m"),
    ("params:\n  bs_spacing_m: [600, 300]\n", "'bs_spacing_m'.*low > high"),
    ("params:\n  shadow_std_db: 99\n", "'shadow_std_db'.*outside the allowed bounds"),
    ("params:\n  scenario: RMa\n", "'scenario'.*not one of"),
    ("params:\n  n_towns: 2.5\n", "'n_towns'.*whole numbers"),
    ("params:\n  market_share: high\n", "'market_share'.*expected a number"),
    ("params:\n  carrier_ghz: [1, 2, 3]\n", "'carrier_ghz'"),
    ("parameters:\n  carrier_ghz: 2\n", "unknown key 'parameters'"),
    ("base: paris-like\n", "'base'.*unknown preset 'paris-like'"),
    ("params:\n  a: [1, 2\n", r"line \d+.*invalid YAML"),
])
def test_bad_parameter_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        build_space("milano-like", path)


def test_config_file_overrides_and_base(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: trento-like\nparams:\n  bs_spacing_m: 777\n  scenario: [UMa, UMi]\n")
    space = build_space("milano-like", path)
    assert space["bs_spacing_m"].lo == 777 and space["cell_size_m"].lo == 1000
    with pytest.raises(UserError, match="'cell_size_m' is not set"):
        path.write_text("params:\n  bs_spacing_m: 777\n")
        load_space_file(path)
    with pytest.raises(UserError, match="unknown preset"):
        simulate("london-like", rows=2, cols=2, days=1)


@pytest.mark.slow
def test_full_milano_raster_two_months_fits_in_memory():
    import resource

    g = simulate("milano-like", rows=100, cols=100, days=62, seed=0)[0]
    assert g.shape == (62 * 24, 100, 100, 3)
    assert np.all(np.isfinite(g.values)) and np.all(g.values >= 0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 < 4.0  # GB (ru_maxrss in KiB)
