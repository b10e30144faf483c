"""Realism report (sim-check) and the simulate / sim-check command lines."""
import json

import numpy as np
import pytest

from simmstnet.cli import main
from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.sim.realism import compare, format_report, mmd2, read_block_csv
from simmstnet.sim.simulator import simulate
from tests.conftest import make_grid

MILANO_BLOCK = "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv"


def test_mmd_separates_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 24)), rng.normal(size=(300, 24))
    c = rng.normal(size=(300, 24)) * 1.5 + 0.5
    same, bw = mmd2(a, b)
    diff, _ = mmd2(a, c, bw)
    assert abs(same) < 0.01 and diff > 10 * abs(same) + 0.02


def test_statistics_are_scale_free_and_self_comparison_is_perfect():
    g = make_grid(T=24 * 14, H=4, W=4, seed=1)
    scaled = TrafficGrid(g.values * 1000, g.mask, g.timestamps, g.services, dict(g.meta))
    rep = compare(g, scaled)
    for s, v in rep["services"].items():
        assert v["profile_corr"] == pytest.approx(1.0)
        for key in ("weekend_ratio", "acf_day", "acf_week", "cv_time", "cv_space", "q99"):
            assert v["real"][key] == pytest.approx(v["sim"][key], rel=1e-4), key
        assert abs(v["mmd2"]) < 0.02


def test_different_steps_sizes_and_services_are_aligned():
    real = make_grid(T=6 * 24 * 8, H=3, W=3, step=600, services=("net",), seed=2)
    sim = simulate("milano-like", rows=6, cols=6, days=8, seed=0)[0]
    rep = compare(real, sim)
    assert rep["step"] == "1h" and list(rep["services"]) == ["net"]
    v = rep["services"]["net"]
    assert v["real"]["steps"] == 8 * 24 and v["sim"]["squares"] == 36 and v["real"]["squares"] == 9
    assert len(v["real"]["profile"]) == 24
    text = format_report(rep)
    assert "autocorrelation 1 day" in text and "overall distance" in text
    with pytest.raises(UserError, match="'call' is not in both"):
        compare(real, sim, services=["call"])


def test_profile_statistic_detects_a_shifted_profile():
    g = make_grid(T=24 * 14, H=4, W=4, seed=3, services=("net",))
    shifted = TrafficGrid(np.roll(g.values, 6, axis=0), g.mask, g.timestamps, g.services, dict(g.meta))
    rep = compare(g, shifted)["services"]["net"]
    assert rep["profile_corr"] < 0.5 and rep["mmd2"] > 5 * max(rep["mmd2_real_halves"], 0.01)


def test_read_block_csv_rejects_wrong_width(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(UserError, match="3 columns, expected 2x2"):
        read_block_csv(p, 2, 2)
    g = read_block_csv(p, 1, 3, step=600)
    assert g.shape == (2, 1, 3, 1) and g.timestamps[0] == 1383260400


def test_milano_like_net_resembles_real_milano(shared_ti):
    real = read_block_csv(shared_ti / MILANO_BLOCK, 5, 5)
    assert real.shape == (3024, 5, 5, 1)
    sims = simulate("milano-like", rows=16, cols=16, days=21, step="1h", seed=1, scenarios=2, services=("net",))
    sims = [g.crop((4, 12), (4, 12)) for g in sims]  # city centre, like the real block
    near = compare(real, sims)["services"]["net"]
    assert near["profile_corr"] > 0.9
    real_s, sim_s = near["real"], near["sim"]
    assert abs(sim_s["weekend_ratio"] - real_s["weekend_ratio"]) < 0.1
    assert abs(sim_s["acf_day"] - real_s["acf_day"]) < 0.2
    assert abs(sim_s["q99"] - real_s["q99"]) < 0.5
    # a city drawn far outside the milano-like ranges is measurably less like Milano
    far = simulate("random", rows=16, cols=16, days=21, step="1h", seed=1, scenarios=2, shift=1.0,
                   services=("net",))
    far = compare(real, [g.crop((4, 12), (4, 12)) for g in far])["services"]["net"]
    assert near["mmd2"] < far["mmd2"]


def test_cli_simulate_and_sim_check(tmp_path, capsys):
    out = tmp_path / "sim.npz"
    assert main(["simulate", "--rows", "5", "--cols", "5", "--days", "3", "--seed", "1",
                 "--out", str(out), "--plot", str(tmp_path / "plots")]) == 0
    assert out.exists() and (tmp_path / "plots" / "sim-overview.png").exists()
    folder = tmp_path / "many"
    assert main(["simulate", "--preset", "trento-like", "--rows", "4", "--cols", "4", "--days", "2",
                 "--scenarios", "2", "--out", str(folder)]) == 0
    assert len(TrafficGrid.load(folder / "scenario-0001.npz").services) == 3
    real = make_grid(T=72, H=3, W=3, services=("net",))
    real.save(tmp_path / "real.npz")
    capsys.readouterr()
    assert main(["sim-check", "--real", str(tmp_path / "real.npz"), "--sim", str(folder),
                 "--json", str(tmp_path / "rep.json"), "--plot", str(tmp_path / "chk")]) == 0
    text = capsys.readouterr().out
    assert "service net" in text and "MMD^2" in text
    assert "net" in json.loads((tmp_path / "rep.json").read_text())["services"]
    assert (tmp_path / "chk" / "sim-check-net.png").exists()


def test_cli_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("params:\n  event_rate: 3\n")
    code = main(["simulate", "--rows", "3", "--cols", "3", "--days", "1", "--config", str(cfg),
                 "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "event_rate" in err and str(cfg) in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()
    code = main(["simulate", "--rows", "0", "--out", str(tmp_path / "x.npz")])
    assert code == 2 and "--rows" in capsys.readouterr().err
