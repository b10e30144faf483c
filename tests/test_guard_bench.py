"""Guards for the bench bookkeeping (issue 15): fig2's choice, reuse warnings, ``same_as``,
partial rows. Run folders are written by hand (config.yaml + metrics.json) and training is
replaced by a stub, so no model is trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from simmstnet.config import dump_config
from simmstnet.eval import benchmark as B
from tests.conftest import make_grid

SERVICES = ("call", "sms", "net")


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "grid.npz"
    make_grid(T=24 * 3, H=2, W=2, seed=1).save(path)
    return path


def _metrics(mae: float) -> dict:
    per = {s: {"mae": mae, "rmse": 2 * mae, "n_observed": 10} for s in SERVICES}
    return {"test": {**per, "overall": {"mae": mae, "rmse": 2 * mae}}, "train_seconds": 1.0}


def _method(table: str, key: str) -> B.Method:
    return next(m for m in B.table_methods(table) if m.key == key)


def _finished_run(folder: Path, profile, method, table, data, extra=(), mae=1.0) -> Path:
    """A finished run folder as the trainer leaves it (the parts the bench reads)."""
    from simmstnet.data.grid import TrafficGrid
    from simmstnet.models.registry import resolve_season_days

    cfg = B.run_config(profile, method, table, str(data), 0, folder, extra=list(extra))
    # the trainer writes data.season_days resolved for the model (null -> its default)
    cfg.data.season_days = resolve_season_days(cfg.model.name, cfg.data.season_days,
                                               int(TrafficGrid.load(data).step), cfg.data.horizon)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(cfg))
    (folder / "metrics.json").write_text(json.dumps(_metrics(mae)))
    return folder


class _StubTrainer:
    calls: list = []

    def __init__(self, cfg, **kw):
        self.cfg = cfg

    def run(self):
        _StubTrainer.calls.append(self.cfg.out)
        return _metrics(9.0)


@pytest.fixture
def stub_trainer(monkeypatch):
    import simmstnet.train.trainer as T

    _StubTrainer.calls = []
    monkeypatch.setattr(T, "Trainer", _StubTrainer)
    return _StubTrainer.calls


@pytest.mark.parametrize("same", [True, False])
def test_reusing_a_run_with_another_config_warns(tmp_path, data, stub_trainer, same):
    profile = B.load_profile("test")
    m = _method("table2", "mttc")
    out = tmp_path / "bench"
    _finished_run(out / "table2" / "mttc" / "seed0", profile, m, "table2", data, extra=["train.lr=0.01"])
    logs: list[str] = []
    bench = B.Bench(str(data), out, 1, profile, extra=["train.lr=0.01" if same else "train.lr=0.02"],
                    log=logs.append)
    res = bench.run_one("table2", m, 0)
    assert res.status == "reused" and stub_trainer == []
    assert ("WARNING" in logs[-1]) == (not same), logs


@pytest.mark.parametrize("same", [True, False])
def test_same_as_reuses_the_other_table_only_when_its_config_is_identical(tmp_path, data, stub_trainer, same):
    profile = B.load_profile("test")
    out = tmp_path / "bench"
    other = _finished_run(out / "table2" / "sim-mstnet" / "seed0", profile, _method("table2", "sim-mstnet"),
                          "table2", data, extra=["train.lr=0.01"])
    bench = B.Bench(str(data), out, 1, profile, extra=["train.lr=0.01" if same else "train.lr=0.02"],
                    log=lambda s: None)
    res = bench.run_one("table3", _method("table3", "full"), 0)
    if same:
        assert res.status == "reused" and res.folder == other and stub_trainer == []
    else:
        assert res.status == "trained" and res.folder == out / "table3" / "full" / "seed0"
        assert stub_trainer == [str(out / "table3" / "full" / "seed0")]


def test_a_row_with_missing_seeds_is_marked_partial():
    m = B.Method("x", "Model X", "x")
    ok = B.RunResult("x", 0, Path("a"), "trained", _metrics(1.0))
    na = B.RunResult("x", 1, Path("b"), "n/a", reason="diverged")
    rows = B.aggregate([m], {"x": [ok, na]}, list(SERVICES))
    assert rows[0]["status"] == "partial" and rows[0]["n"] == 1 and rows[0]["reason"] == "diverged"
    md = B.render_markdown("table2", rows, list(SERVICES), [])
    assert "Model X: some seeds missing: diverged" in md
    full = B.aggregate([m], {"x": [ok]}, list(SERVICES))
    assert full[0]["status"] == "ok" and "Not available" not in B.render_markdown("table2", full, list(SERVICES), [])
    none = B.aggregate([m], {"x": [na]}, list(SERVICES))
    assert none[0]["status"] == "n/a"


def test_fig2_draws_the_best_other_multitask_model(tmp_path, data, monkeypatch):
    methods = B.table_methods("table2")
    keys = [m.key for m in methods]
    references = set(B.NAIVE) | set(getattr(B, "LINEAR", ()))
    networks = [k for k in keys if k != "sim-mstnet" and k not in references]
    assert "sim-mstnet" in keys and len(networks) >= 2
    maes = {k: 5.0 + i for i, k in enumerate(keys)}          # the first method is the best ...
    best = networks[len(networks) // 2]
    maes[best] = 0.5                                          # ... except this one, better still
    maes["sim-mstnet"] = 3.0
    for k in references & set(keys):                          # reference rows are not candidates
        maes[k] = 0.1
    results = {k: [B.RunResult(k, 0, tmp_path / k, "trained", _metrics(maes[k]))] for k in keys}
    rows = B.aggregate(methods, results, list(SERVICES))
    drawn = []
    monkeypatch.setattr(B, "plot_fig2", lambda main, second, label, folder, cell=None:
                        drawn.append((main, second, label)) or [])
    bench = B.Bench(str(data), tmp_path / "bench", 1, B.load_profile("test"), log=lambda s: None)
    bench.done["table2"] = {"table": "table2", "rows": rows, "results": results}
    res = bench.run_fig2()
    assert res["second"] == best
    assert drawn == [(tmp_path / "sim-mstnet", tmp_path / best, next(m.label for m in methods if m.key == best))]
