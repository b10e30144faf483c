"""`simmstnet bench`: tables from run folders, protocol header, reuse of finished runs, fig2.

Every run uses the tiny ``src/simmstnet/configs/bench-test.yaml`` profile (1 epoch on 64 windows) on a small
synthetic grid, so the figures are meaningless but the bookkeeping is exactly the real one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_grid
from simmstnet.cli import main
from simmstnet.errors import UserError
from simmstnet.eval import benchmark as B


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-data") / "tiny.npz"
    make_grid(T=24 * 5, H=3, W=3, seed=3, missing=0.05).save(path)
    return path


@pytest.fixture(scope="module")
def table1(tiny, tmp_path_factory):
    """table1 with two seeds and three methods (one of them unavailable without --sim)."""
    out = tmp_path_factory.mktemp("bench-t1")
    logs: list[str] = []
    res = B.run_bench(["table1"], str(tiny), out, 2, "test", methods=["last-value", "lstm", "stnet-sim2real"],
                      log=logs.append)
    return out, res[0], logs


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_table_methods_follow_the_registry():
    reg = [("last-value", True, ""), ("ridge", True, ""), ("lstm", False, ""), ("stgcn", False, ""),
           ("stnet", False, ""), ("sim-mstnet", True, ""), ("mttc", True, ""), ("cslsl", True, "")]
    t1 = [m.key for m in B.table_methods("table1", reg)]
    assert t1 == ["last-value", "ridge", "lstm", "stgcn", "stnet", "stnet-sim2real"]
    sim_row = B.table_methods("table1", reg)[-1]
    assert sim_row.needs_sim and "sim2real.mode=bilevel" in sim_row.overrides and sim_row.model == "stnet"
    # every table carries the simple references beside the learned models
    assert [m.key for m in B.table_methods("table2", reg)] == ["last-value", "ridge", "mttc", "cslsl", "sim-mstnet"]
    t3 = B.table_methods("table3", reg)
    assert [m.key for m in t3] == ["last-value", "ridge", "no-interaction", "no-spatial", "average-weighting",
                                   "fusion-shift", "no-highway", "no-season", "global-norm", "full"]
    assert t3[0].same_as == ("table2", "last-value") and t3[-1].same_as == ("table2", "sim-mstnet")
    assert t3[2].overrides == ["model.interaction=false"] and t3[4].overrides == ["train.loss_weighting=average"]
    with pytest.raises(UserError, match="unknown table"):
        B.table_methods("table9", reg)


def test_table1_csv_is_mean_and_std_of_the_run_folders(table1):
    out, res, logs = table1
    rows = {r["method"]: r for r in _read_csv(out / "table1" / "table1.csv")}
    assert list(rows) == ["last-value", "lstm", "stnet-sim2real"]
    for key in ("last-value", "lstm"):
        # last-value does not depend on the seed: its seed-0 run stands for seed 1
        seeds = (0, 0) if key == "last-value" else (0, 1)
        ms = [json.loads((out / "table1" / key / f"seed{k}" / "metrics.json").read_text()) for k in seeds]
        assert [m["seed"] for m in ms] == list(seeds)
        for metric in ("mae", "rmse"):
            vals = [m["test"]["net"][metric] for m in ms]
            assert float(rows[key][f"net_{metric}_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
            assert float(rows[key][f"net_{metric}_std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-9, abs=1e-12)
        secs = [m["train_seconds"] for m in ms]
        assert float(rows[key]["train_seconds_mean"]) == pytest.approx(np.mean(secs))
        assert rows[key]["n_seeds"] == "2" and rows[key]["status"] == "ok"
    # Single-service table: the services are exactly net, no call/sms columns.
    assert not any(k.startswith(("call", "sms")) for k in rows["lstm"])
    # lstm was trained with different seeds: the two runs differ.
    ms = [json.loads((out / "table1" / "lstm" / f"seed{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert ms[0]["test"]["net"]["mae"] != ms[1]["test"]["net"]["mae"]
    assert rows["stnet-sim2real"]["status"] == "n/a" and "--sim" in rows["stnet-sim2real"]["reason"]
    runs = _read_csv(out / "table1" / "runs.csv")
    assert len(runs) == 6 and {r["status"] for r in runs} == {"trained", "reused", "n/a"}
    assert sum("trained in" in line for line in logs) == 3


def test_table1_markdown_has_protocol_bold_best_and_na(table1):
    out, res, _ = table1
    md = (out / "table1" / "table1.md").read_text()
    assert md == res["markdown"]
    head, table = md.split("| method |", 1)
    for needle in ("data: `", "split: [0.6, 0.2, 0.2]", "grid step 1h", "input 24 steps", "horizon 3",
                   "units: original", "mask rule: targets count only where observed", "seeds: 0, 1",
                   "profile: test", "train + final-evaluation seconds summed over the table's runs"):
        assert needle in head, needle
    rows = {r["key"]: r for r in res["rows"]}
    best = min(("last-value", "lstm"), key=lambda k: rows[k]["net_mae_mean"])
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {rows[best]['label']} |"))
    assert line.split("|")[2].strip().startswith("**")
    other = next(ln for ln in table.splitlines() if ln.startswith(f"| {rows[({'last-value', 'lstm'} - {best}).pop()]['label']} |"))
    assert "**" not in other.split("|")[2]
    assert "Not available" in md and "no simulated source given" in md


def test_finished_runs_are_reused_and_interrupted_ones_resumed(table1, tiny):
    out, res, _ = table1
    f = out / "table1" / "lstm" / "seed0" / "metrics.json"
    before = f.stat().st_mtime_ns
    # An interrupted run: last.pt there, metrics.json not yet written.
    g = out / "table1" / "lstm" / "seed1" / "metrics.json"
    old = json.loads(g.read_text())
    g.unlink()
    logs: list[str] = []
    again = B.run_bench(["table1"], str(tiny), out, 2, "test", methods=["lstm"], log=logs.append)[0]
    assert f.stat().st_mtime_ns == before
    assert any("lstm seed 0: reused finished run" in ln for ln in logs)
    assert not any("WARNING" in ln for ln in logs)  # same profile: same config
    assert any("lstm seed 1: resumed and trained" in ln for ln in logs)
    new = json.loads(g.read_text())
    assert new["test"]["net"]["mae"] == pytest.approx(old["test"]["net"]["mae"], rel=1e-6)
    assert again["rows"][0]["net_mae_mean"] == pytest.approx(res["rows"][1]["net_mae_mean"], rel=1e-6)


@pytest.mark.slow  # ~35 s; test_table1_* keep the bench's paths in make test
def test_table2_table3_fig2(tiny, tmp_path):
    logs: list[str] = []
    res = B.run_bench(["table2", "table3", "fig2"], str(tiny), tmp_path, 2, "test",
                      methods=["mttc", "sim-mstnet", "no-interaction", "full"], log=logs.append)
    t2, t3, f2 = res
    rows = _read_csv(tmp_path / "table2" / "table2.csv")
    assert [r["method"] for r in rows] == ["mttc", "sim-mstnet"]
    for r in rows:
        ms = [json.loads((tmp_path / "table2" / r["method"] / f"seed{k}" / "metrics.json").read_text())
              for k in (0, 1)]
        for s in ("call", "sms", "net", "overall"):
            col = "overall_mae_mean" if s == "overall" else f"{s}_mae_mean"
            assert float(r[col]) == pytest.approx(np.mean([m["test"][s]["mae"] for m in ms]), rel=1e-12)
        assert ms[0]["protocol"]["services"] == ["call", "sms", "net"]
    # table3's full model is table2's Sim-MSTNet (identical config): reused, not retrained.
    assert any("[table3] full seed 0: reused" in ln and "table2" in ln for ln in logs)
    assert not (tmp_path / "table3" / "full").exists()
    r3 = {r["key"]: r for r in t3["rows"]}
    assert r3["full"]["net_mae_mean"] == t2["rows"][1]["net_mae_mean"]
    cfg = (tmp_path / "table3" / "no-interaction" / "seed0" / "config.yaml").read_text()
    assert "interaction: false" in cfg
    assert f2["second"] == "mttc"
    assert sum("[table2] wrote" in ln for ln in logs) == 1  # fig2 used this invocation's table2
    names = sorted(p.name for p in f2["paths"])
    assert names == ["fig2.png", "fig2_call.png", "fig2_net.png", "fig2_sms.png"]
    assert all(p.stat().st_size > 1000 for p in f2["paths"])
    assert "Table 3" in (tmp_path / "table3" / "table3.md").read_text()


def test_aggregate_and_markdown_by_hand():
    m = [B.Method("a", "A", "lstm"), B.Method("b", "B", "lstm")]

    def run(key, seed, mae, rmse):
        return B.RunResult(key, seed, Path("."), "trained",
                           {"test": {"net": {"mae": mae, "rmse": rmse}, "overall": {"mae": mae}},
                            "train_seconds": 1.0 + seed})

    res = {"a": [run("a", 0, 1.0, 2.0), run("a", 1, 3.0, 4.0)], "b": [run("b", 0, 5.0, 1.0)]}
    rows = B.aggregate(m, res, ["net"])
    assert rows[0]["net_mae_mean"] == 2.0 and rows[0]["net_mae_std"] == pytest.approx(np.sqrt(2.0))
    assert rows[1]["net_mae_std"] is None  # one seed: no spread to report
    md = B.render_markdown("table1", rows, ["net"], ["- protocol line"])
    assert "| A | **2 ± 1.4** | 3 ± 1.4 | 1.5 ± 0.71 | 2 |" in md
    assert "| B | 5 | **1** | 1 | 1 |" in md


def test_user_errors(tiny, tmp_path):
    no_net = tmp_path / "no_net.npz"
    make_grid(T=72, H=3, W=3, services=("call", "sms")).save(no_net)
    with pytest.raises(UserError, match="no service 'net'"):
        B.run_bench(["table1"], str(no_net), tmp_path / "o", 1, "test")
    only_net = tmp_path / "net.npz"
    make_grid(T=72, H=3, W=3, services=("net",)).save(only_net)
    with pytest.raises(UserError, match="table2 needs call, sms, net"):
        B.run_bench(["table2"], str(only_net), tmp_path / "o", 1, "test")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        B.run_bench(["table1"], str(tiny), tmp_path / "o", 1, "test", methods=["nope"])
    with pytest.raises(UserError, match="no configs/bench-huge.yaml"):
        B.run_bench(["table1"], str(tiny), tmp_path / "o", 1, "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("common:\n  train: {epochz: 1}\n")
    with pytest.raises(UserError, match="epochz"):
        B.run_bench(["table1"], str(tiny), tmp_path / "o", 1, str(bad))
    bad.write_text("comon: {}\n")
    with pytest.raises(UserError, match="unknown profile key 'comon'"):
        B.run_bench(["table1"], str(tiny), tmp_path / "o", 1, str(bad))
    with pytest.raises(UserError, match="table2: none of --methods lstm"):
        B.run_bench(["table1", "table2"], str(tiny), tmp_path / "o", 1, "test", methods=["lstm"])
    with pytest.raises(UserError, match="fig2 needs sim-mstnet and another"):
        B.run_bench(["fig2"], str(tiny), tmp_path / "o", 1, "test", methods=["sim-mstnet"])
    with pytest.raises(UserError, match="--seeds"):
        B.run_bench(["table1"], str(tiny), tmp_path / "o", 0, "test")
    assert not (tmp_path / "o").exists()


def test_cli_exit_codes(tiny, tmp_path, capsys):
    assert main(["bench", "table1", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    code = main(["bench", "table1", "--data", str(tiny), "--out", str(tmp_path / "b"), "--seeds", "1",
                 "--profile", "test", "--methods", "last-value"])
    assert code == 0
    captured = capsys.readouterr()
    assert "# Table 1" in captured.out and "[table1] last-value seed 0: trained" in captured.err


@pytest.mark.slow
def test_every_method_of_every_table_runs(tiny, tmp_path):
    """All rows, one seed, the sim2real row with a simulated source: only the documented n/a."""
    sim = tmp_path / "sim.npz"
    make_grid(T=24 * 5, H=3, W=3, seed=11).save(sim)
    res = B.run_bench(["table1", "table2", "table3", "fig2"], str(tiny), tmp_path / "out", 1, "test",
                      sim=str(sim), log=lambda s: None)
    for r in res[:3]:
        for row in r["rows"]:
            if row["key"] == "seasonal-naive-week":  # needs a week of input; the protocol has 24 h
                assert row["status"] == "n/a" and "input_len" in row["reason"]
            else:
                assert row["status"] == "ok", (row["key"], row["reason"])
                assert row["n"] == 1 and row["net_mae_mean"] is not None
    assert len(res[3]["paths"]) == 4


def test_a_deterministic_reference_is_trained_once_for_every_seed(table1):
    out, res, logs = table1
    assert (out / "table1" / "last-value" / "seed0" / "metrics.json").is_file()
    assert not (out / "table1" / "last-value" / "seed1").exists()
    assert any("last-value seed 1: the seed-0 run stands for it" in ln for ln in logs)
    # the learned model still trains once per seed
    assert (out / "table1" / "lstm" / "seed1" / "metrics.json").is_file()
