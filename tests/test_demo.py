"""The demo end to end on a tiny user grid (the full-size demo runs in CI as `make demo`)."""
from __future__ import annotations

import json

import pytest

from simmstnet.cli import main
from simmstnet.demo import DemoConfig, run_demo
from tests.conftest import make_grid


@pytest.mark.slow  # ~50 s; CI also runs the full demo (make demo)
def test_demo_on_a_user_grid_writes_report(tmp_path, capsys):
    grid = make_grid(T=24 * 10, H=4, W=4, seed=3)
    path = grid.save(tmp_path / "mine.npz")
    cfg = DemoConfig(out=str(tmp_path / "out"), data=str(path), epochs=1, source_scenarios=2,
                     source_rows=4, source_cols=4, windows_per_epoch=128, val_windows=128,
                     max_sim_windows=128, d_model=8, batch_size=32)
    report = run_demo(cfg)
    text = report.read_text()
    printed = capsys.readouterr().out
    for key in ("bilevel", "mix", "finetune", "off"):
        metrics = json.loads((tmp_path / "out" / "runs" / key / "metrics.json").read_text())
        mae = metrics["test"]["overall"]["mae"]
        assert f"{mae:.4g}" in text and f"{mae:.4g}" in printed
    assert "## Protocol" in text and "last 3 days" in text
    assert ("did NOT beat" in printed) != ("helped on this target" in printed)
    assert (tmp_path / "out" / "figures" / "bilevel_sim2real_weights.png").is_file()


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "simmstnet: error: --epochs must be at least 1, got 0"
    assert main(["demo", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
