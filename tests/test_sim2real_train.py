"""Sim2real in the trainer: every mode from the CLI, the simulated window set, resume, errors."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from simmstnet.cli import main
from simmstnet.config import load_config
from simmstnet.errors import UserError
from simmstnet.sim import simulate_to_path
from simmstnet.train.sim_data import build_sim_windows
from simmstnet.train.trainer import Hooks, Trainer

from .conftest import make_grid

BASE = ["data.input_len=12", "data.label_len=6", "data.horizon=3", "data.patch=3",
        "train.batch_size=64", "train.lr=3e-3", "train.device=cpu", "model.name=stnet",
        "data.services=[net]", "model.d_model=8", "model.d_ff=16", "model.enc_layers=1",
        "model.n_heads=1", "sim2real.max_sim_windows=512", "sim2real.warm_start_epochs=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny real grid (6 days, 4x5, hourly) and a 2-scenario simulated folder (4x4, 3 days)."""
    root = tmp_path_factory.mktemp("s2r")
    real = make_grid(T=24 * 6).save(root / "real.npz")
    sim = simulate_to_path(root / "sim", rows=4, cols=4, days=3, step="1h", scenarios=2, seed=0,
                           progress=False)
    return {"real": str(real), "sim": str(sim), "root": root}


def _args(files, out, *extra):
    return ["train", "--no-progress", f"data.path={files['real']}", f"sim2real.sim_data={files['sim']}",
            *BASE, f"out={out}", *extra]


@pytest.mark.parametrize("mode", ["mix", "l2rw", "bilevel"])
def test_each_mode_trains_from_the_cli_and_writes_diagnostics(files, tmp_path, mode):
    out = tmp_path / mode
    assert main(_args(files, out, f"sim2real.mode={mode}", "train.epochs=2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["sim2real"]
    assert block["mode"] == mode and block["n_sim_windows"] == 512 and block["n_scenarios"] == 2
    assert block["n_real_windows"] == metrics["protocol"]["windows"]["train"] > 0
    assert block["seconds_per_epoch"] > 0
    for name in ("sim2real_history.csv", "sim2real_report.json", "sim2real_weights.png", "history.csv"):
        assert (out / name).is_file(), name
    saved = np.load(out / "sim2real_weights.npz")
    w, sid = saved["weights"], saved["scenario_ids"]
    assert w.shape == sid.shape == (512,) and set(np.unique(sid)) == {0, 1}
    report = json.loads((out / "sim2real_report.json").read_text())
    assert [r["id"] for r in report["scenarios"]] == [0, 1]
    assert "bs_spacing_m" in report["scenarios"][0]  # simulator parameters beside each scenario
    rows = (out / "sim2real_history.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch
    if mode == "mix":
        assert np.all(w == 1.0)
    elif mode == "l2rw":
        seen = w[~np.isnan(w)]
        assert seen.size > 0 and np.all(seen >= 0) and seen.std() > 0
    else:
        # one reweighting epoch after the warm start: the weights moved apart from 0.5
        assert np.all((w > 0) & (w < 1)) and w.std() > 1e-3
        assert "G" in rows[0] and "h" in rows[0].split(",")
        assert block["eps"] is not None and block["eps"] > 0


def test_off_ignores_sim_data_and_keeps_the_plain_run(files, tmp_path):
    out = tmp_path / "off"
    assert main(_args(files, out, "sim2real.mode=off", "train.epochs=1")) == 0
    assert "sim2real" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "sim2real_weights.npz").exists()


def test_sim_window_set_bookkeeping(files):
    full = build_sim_windows(files["sim"], ["net", "call"], 3600, 12, 6, 3, 3)
    sizes = [len(d) for d in full.datasets]
    assert len(full) == full.n_available == sum(sizes)
    assert np.array_equal(np.bincount(full.scenario_of), sizes)
    # per-scenario scaler: each scenario's observed scaled values have mean ~0, std ~1
    for d in full.datasets:
        v = d._scaled.numpy()
        v = v[~np.isnan(v)]
        assert abs(v.mean()) < 0.1 and abs(v.std() - 1) < 0.1
        assert d.services == ("net", "call")

    capped = build_sim_windows(files["sim"], ["net"], 3600, 12, 6, 3, 3, max_windows=300, seed=4)
    again = build_sim_windows(files["sim"], ["net"], 3600, 12, 6, 3, 3, max_windows=300, seed=4)
    other = build_sim_windows(files["sim"], ["net"], 3600, 12, 6, 3, 3, max_windows=300, seed=5)
    assert len(capped) == 300 and capped.n_available == sum(sizes)
    assert np.array_equal(capped.local, again.local) and np.array_equal(capped.scenario_of, again.scenario_of)
    assert not np.array_equal(capped.local, other.local)
    idx = np.array([299, 0, 150, 7, 298])
    batch = capped.get_batch(idx)
    assert batch["index"].tolist() == idx.tolist()
    assert batch["scenario"].tolist() == capped.scenario_of[idx].tolist()
    for pos, j in enumerate(idx):
        own = capped.datasets[capped.scenario_of[j]].get_batch(np.array([capped.local[j]]))
        assert torch.equal(batch["x"][pos], own["x"][0]) and torch.equal(batch["y"][pos], own["y"][0])
    with pytest.raises(IndexError):
        capped.get_batch(np.array([300]))


@pytest.mark.slow  # ~12 s, in CI; the resume of the plain loop stays in make test (test_resume)
def test_bilevel_resume_continues_exactly(files, tmp_path):
    over = [f"data.path={files['real']}", f"sim2real.sim_data={files['sim']}", "sim2real.mode=bilevel",
            "train.epochs=3", "train.patience=0"]
    ref_cfg = load_config(None, [*BASE, *over, f"out={tmp_path / 'ref'}"])
    ref = Trainer(ref_cfg, progress=False, quiet=True).run()

    class Killed(Exception):
        pass

    def kill(epoch, trainer):
        if epoch == 2:
            raise Killed

    cfg = load_config(None, [*BASE, *over, f"out={tmp_path / 'cut'}"])
    with pytest.raises(Killed):
        Trainer(cfg, progress=False, quiet=True, hooks=Hooks(on_epoch_end=kill)).run()
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert state["sim2real"]["mode"] == "bilevel" and state["sim2real"]["t"] > 0
    res = Trainer(cfg, resume=True, progress=False, quiet=True).run()
    assert res["test"]["overall"]["mae"] == ref["test"]["overall"]["mae"]
    w_ref = np.load(tmp_path / "ref" / "sim2real_weights.npz")["weights"]
    w_res = np.load(tmp_path / "cut" / "sim2real_weights.npz")["weights"]
    assert np.array_equal(w_ref, w_res)
    assert len((tmp_path / "cut" / "sim2real_history.csv").read_text().strip().splitlines()) == 4


def test_scarce_days_without_a_real_window(files, tmp_path, capsys):
    # train_days=1 gives 24 hourly steps, one window needs 24 + 3: no real training window
    scarce = ["data.input_len=24", "data.label_len=6", "data.train_days=1", "train.epochs=1"]
    assert main(_args(files, tmp_path / "bl", "sim2real.mode=bilevel", *scarce)) == 2
    assert "sim2real.upper_data=val" in capsys.readouterr().err
    assert main(_args(files, tmp_path / "mix", "sim2real.mode=mix", *scarce)) == 0
    block = json.loads((tmp_path / "mix" / "metrics.json").read_text())["sim2real"]
    assert block["n_real_windows"] == 0
    assert main(_args(files, tmp_path / "l2rw", "sim2real.mode=l2rw", "sim2real.upper_data=val", *scarce)) == 0
    block = json.loads((tmp_path / "l2rw" / "metrics.json").read_text())["sim2real"]
    assert block["val_used_for_training"] is True and block["n_real_windows"] > 0


def test_bad_sim_data(files, tmp_path, capsys):
    assert main(_args(files, tmp_path / "a", "sim2real.mode=mix", "train.epochs=1",
                      f"sim2real.sim_data={tmp_path / 'nope.npz'}")) == 2
    assert "nope.npz" in capsys.readouterr().err
    assert main(["train", f"data.path={files['real']}", *BASE, "sim2real.mode=mix", f"out={tmp_path / 'b'}"]) == 2
    assert "sim2real.sim_data" in capsys.readouterr().err
    two = make_grid(T=48, H=3, W=3, services=("call", "sms")).save(tmp_path / "callsms.npz")
    with pytest.raises(UserError, match="lacks service 'net'"):
        build_sim_windows(two, ["net"], 3600, 12, 6, 3, 3)
    coarse = make_grid(T=48, H=3, W=3, step=7200).save(tmp_path / "coarse.npz")
    with pytest.raises(UserError, match="coarser than the real step"):
        build_sim_windows(coarse, ["net"], 3600, 12, 6, 3, 3)
    fine = make_grid(T=96, H=3, W=3, step=1800, start=1383260400).save(tmp_path / "fine.npz")
    ds = build_sim_windows(fine, ["net"], 3600, 12, 6, 3, 3)
    assert ds.datasets[0].grid.step == 3600
    # a model that reads cell identities cannot learn from simulated cities
    args = [a for a in _args(files, tmp_path / "c", "sim2real.mode=mix", "train.epochs=1")
            if not a.startswith("model.")]
    assert main([*args, "model.name=historical-average", "data.season_days=0"]) == 2
    assert "uses cell identities, which simulated cities do not share" in capsys.readouterr().err


def test_config_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("sim2real.mode", "sim2real.sim_data", "sim2real.max_sim_windows", "sim2real.upper_data",
                "sim2real.k_steps", "sim2real.lr_lambda", "sim2real.eps", "sim2real.real_batch_size"):
        assert key in text, key
    cfg = load_config(None, ["sim2real.k_steps=2", "sim2real.eps=0.1", "sim2real.mode=bilevel"])
    assert cfg.sim2real.k_steps == 2 and cfg.sim2real.eps == 0.1
    with pytest.raises(UserError, match="sim2real.k_steps"):
        load_config(None, ["sim2real.k_steps=0"])
    with pytest.raises(UserError, match="sim2real.upper_data"):
        load_config(None, ["sim2real.upper_data=test"])
    with pytest.raises(UserError, match="sim2real.kstep"):
        load_config(None, ["sim2real.kstep=1"])


def test_bilevel_weights_per_scenario(files, tmp_path):
    out = tmp_path / "scen"
    assert main(_args(files, out, "sim2real.mode=bilevel", "sim2real.weight_by=scenario", "train.epochs=2")) == 0
    saved = np.load(out / "sim2real_weights.npz")
    w, sid = saved["weights"], saved["scenario_ids"]
    per = [np.unique(w[sid == s]) for s in (0, 1)]
    assert all(len(p) == 1 for p in per)  # one weight per simulated city
    assert per[0][0] != per[1][0] and per[0][0] != 0.5  # ...and it moved
    assert json.loads((out / "metrics.json").read_text())["sim2real"]["weight_by"] == "scenario"


def test_issue_spelling_of_the_keys_is_an_alias():
    cfg = load_config(None, ["train.sim2real=mix", "train.sim_data=sim/folder"])
    assert cfg.sim2real.mode == "mix" and cfg.sim2real.sim_data == "sim/folder"


def test_lower_coef_adds_the_weighted_sim_gradient():
    """bilevel.lower_coef = c adds exactly c x grad_theta of the weighted simulated loss."""
    import copy

    from simmstnet.train.sim2real import Sim2RealConfig, make_reweighter

    torch.manual_seed(0)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, batch):
            return self.lin(batch["x"]).squeeze(-1)

    def loss(pred, batch):
        return (pred - batch["y"]) ** 2

    sim = {"x": torch.randn(8, 4), "y": torch.randn(8), "index": torch.arange(8)}
    real = {"x": torch.randn(6, 4), "y": torch.randn(6), "index": torch.arange(6)}
    base = Lin()
    grads = {}
    # the former form (upper_folds=1): the lower level is the weighted simulated loss
    for coef in (0.0, 2.0):
        m = copy.deepcopy(base)
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, eps=1e-3, t1=100, lower_coef=coef,
                             upper_folds=1, learn_share=False)
        rw = make_reweighter(cfg, m, 8, loss, steps_per_epoch=1, total_steps=100)
        rw.step(sim, real)
        grads[coef] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    probe = copy.deepcopy(base)
    torch.nn.functional.mse_loss(probe(sim), sim["y"]).backward()  # uniform weights: the plain mean
    want = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    assert torch.allclose(grads[2.0] - grads[0.0], 2.0 * want, atol=1e-6)
    assert not torch.allclose(grads[0.0], grads[2.0])
    # held-out folds (default): the lower level is (1 - s) x the real loss of the fit fold + s x the
    # weighted simulated loss, s = 0.5 at the start; at t = 0 fold 0 (even indices) is held out
    for coef in (1.0, 3.0):
        m = copy.deepcopy(base)
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, eps=1e-3, t1=100, lower_coef=coef,
                             upper_folds=2)
        rw = make_reweighter(cfg, m, 8, loss, steps_per_epoch=1, total_steps=100)
        rw.step(sim, real)
        grads[coef] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    probe = copy.deepcopy(base)
    fit = real["index"] % 2 == 1
    (0.5 * torch.nn.functional.mse_loss(probe(sim), sim["y"])
     + 0.5 * torch.nn.functional.mse_loss(probe(real)[fit], real["y"][fit])).backward()
    want = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    assert torch.allclose(grads[3.0] - grads[1.0], 2.0 * want, atol=1e-6)


MODES = ("off", "mix", "l2rw", "bilevel", "finetune")


@pytest.mark.parametrize("budget, per_epoch", [
    ([], 2),
    pytest.param(["sim2real.steps_per_epoch=3"], 3, marks=pytest.mark.slow),  # ~20 s, in CI
])
def test_every_mode_takes_the_same_optimizer_steps(files, tmp_path, budget, per_epoch):
    """One step budget for every mode: off's real loader (~27 batches) does not set it."""
    counts = {}
    for mode in MODES:
        seen = []
        cfg = load_config(None, [*BASE, f"data.path={files['real']}", f"sim2real.sim_data={files['sim']}",
                                 f"sim2real.mode={mode}", "sim2real.max_sim_windows=128", "train.epochs=2",
                                 "train.patience=0", "sim2real.finetune_patience=0", *budget,
                                 f"out={tmp_path / mode}"])
        m = Trainer(cfg, progress=False, quiet=True, hooks=Hooks(on_batch=lambda r, b: seen.append(r))).run()
        rows = (tmp_path / mode / "history.csv").read_text().strip().splitlines()
        steps_col = rows[0].split(",").index("steps")
        counts[mode] = (len(seen), m["optimizer_steps"], [int(r.split(",")[steps_col]) for r in rows[1:]])
        assert m["protocol"]["windows"]["train"] > 4 * per_epoch * 64  # one pass of off would be longer
    assert counts == {mode: (2 * per_epoch, 2 * per_epoch, [per_epoch] * 2) for mode in MODES}


def test_finetune_trains_from_the_cli_and_keeps_the_best_held_out_model(files, tmp_path):
    from simmstnet.eval.forecast import evaluate
    from simmstnet.train.checkpoint import load_checkpoint

    out = tmp_path / "ft"
    cfg = load_config(None, [*BASE, f"data.path={files['real']}", f"sim2real.sim_data={files['sim']}",
                             "sim2real.mode=finetune", "train.epochs=2", "train.lr_schedule=constant",
                             "sim2real.finetune_lr_factor=0.2", "sim2real.finetune_patience=0",
                             "sim2real.finetune_l2sp=0.01", "sim2real.real_batch_size=512", f"out={out}"])
    seen = []

    def spoil_the_last_step(rank, batch):
        # before the last of 16 steps the weights are wrecked: the last held-out check is the worst,
        # so the run must end with the parameters of an earlier check
        seen.append(rank)
        if len(seen) == 16:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(torch.randn_like(p) * 3.0)

    trainer = Trainer(cfg, progress=False, quiet=True, hooks=Hooks(on_batch=spoil_the_last_step))
    m = trainer.run()
    ft = m["sim2real"]["finetune"]
    assert m["sim2real"]["mode"] == "finetune" and ft["pretrain_steps"] == 8  # half of 2 x 512 / 64
    # ~1,300 fine-tuning windows in batches of 512: checks after fine-tuning steps 3, 6 and 8
    assert ft["checks"] == 3 and not ft["stopped_early"] and ft["best_step"] < 16
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert float(rows[0]["lr"]) == pytest.approx(3e-3 * 0.2)  # the first fine-tuning lr (step 8)
    assert float(rows[1]["lr"]) == pytest.approx(3e-3 * 0.2)
    # the held-out windows come after every fine-tuning window and are not trained on
    real = trainer.data.train
    lo, hi = real.target_range
    h_lo, h_hi = ft["holdout_target_steps"]
    assert h_hi == hi and lo < h_lo < hi and ft["n_holdout_windows"] == len(trainer.holdout)
    # the model kept (best.pt) is the best one on the held-out slice
    model = trainer.model
    model.load_state_dict(load_checkpoint(out / "best.pt", map_location="cpu")["model"])
    again = evaluate(model, trainer.holdout, 256, "cpu", False, "mae", progress=False)
    assert again["metrics"]["overall"]["mae"] == pytest.approx(ft["best_holdout_mae"], rel=1e-5)
    assert m["best_epoch"] == 2  # validation picks no epoch: the last one is kept


def test_a_one_epoch_bilevel_run_shortens_its_warm_start(files, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(_args(files, out, "sim2real.mode=bilevel", "train.epochs=1")) == 0
    err = capsys.readouterr().err
    assert "shortened to 3 iterations" in err  # 8 steps, t1 = 0.8: the switch at 6, warm start 3
    hist = (out / "sim2real_history.csv").read_text()
    assert json.loads((out / "metrics.json").read_text())["sim2real"]["eps"] > 0
    assert "h" in hist.splitlines()[0].split(",")


def test_real_share_needs_mix_and_real_windows(files, tmp_path, capsys):
    with pytest.raises(UserError, match="sim2real.real_share"):
        load_config(None, ["sim2real.mode=bilevel", "sim2real.real_share=0.3"])
    with pytest.raises(UserError, match="sim2real.real_share"):
        load_config(None, ["sim2real.mode=mix", "sim2real.real_share=1.5"])
    scarce = ["data.input_len=24", "data.label_len=6", "data.train_days=1", "train.epochs=1"]
    assert main(_args(files, tmp_path / "rs", "sim2real.mode=mix", "sim2real.real_share=0.5", *scarce)) == 2
    assert "sim2real.real_share" in capsys.readouterr().err
    assert main(_args(files, tmp_path / "ft", "sim2real.mode=finetune", *scarce)) == 2
    assert "fine-tune on" in capsys.readouterr().err


def test_bilevel_real_batches_carry_time_block_fold_keys(files, tmp_path, monkeypatch):
    """The loop gives bilevel's real batches fold_key = window start // (input_len + horizon): the
    held-out folds are blocks of time, not interleaved hours."""
    from simmstnet.train.sim2real import BilevelReweighter

    seen = []
    step = BilevelReweighter.step

    def spy(self, sim_batch, real_batch):
        if real_batch is not None:
            seen.append((real_batch["index"].cpu().clone(), real_batch["fold_key"].cpu().clone()))
        return step(self, sim_batch, real_batch)

    monkeypatch.setattr(BilevelReweighter, "step", spy)
    out = tmp_path / "folds"
    assert main(_args(files, out, "sim2real.mode=bilevel", "sim2real.upper_folds=2", "train.epochs=1")) == 0
    from simmstnet.train.trainer import prepare_data

    data = prepare_data(load_config(out / "config.yaml"), allow_no_train=True)
    assert seen
    for index, key in seen:
        start = data.train.window_info(index)[0]
        assert torch.equal(key, torch.from_numpy(start // (12 + 3)))
    assert len(torch.unique(torch.cat([k for _, k in seen]))) >= 2  # at least two blocks, so two folds


@pytest.mark.parametrize("services", [["net"], ["call", "sms", "net"]])
def test_mix_epoch_rows_average_each_steps_task_losses_over_shuffled_sim_batches(files, tmp_path, monkeypatch,
                                                                                 services):
    # Found by make mutate on train/sim2real_loop.py (2026-12-06): the epoch's per-service
    # training loss summed counts, subtracted, or multiplied by the step count, and the simulated
    # batches could come in file order, all without a failing test.
    from simmstnet.train.checkpoint import load_checkpoint
    from simmstnet.train.losses import masked_sample_losses
    from simmstnet.train.sim2real_loop import Sim2RealLoop

    calls = []
    real_sample_loss = Sim2RealLoop.sample_loss

    def spy(self, pred, batch):
        first = len(self._task_record) == 0  # the loop empties the record before each step
        s, c = masked_sample_losses(pred.detach().float(), batch["y"], batch["y_mask"], kind=self.cfg.train.loss)
        calls.append((first, s.sum(0).double(), c.sum(0).double(), "scenario" in batch, batch["index"].tolist()))
        return real_sample_loss(self, pred, batch)

    monkeypatch.setattr(Sim2RealLoop, "sample_loss", spy)
    out = tmp_path / "mix"
    multi = ["model.name=sim-mstnet", f"data.services=[{','.join(services)}]"] if len(services) > 1 else []
    assert main(_args(files, out, "sim2real.mode=mix", "train.epochs=2", "sim2real.steps_per_epoch=4", *multi)) == 0
    steps = []
    for first, s, c, _, _ in calls:
        if first:
            steps.append([s.clone(), c.clone()])
        else:
            steps[-1][0] += s
            steps[-1][1] += c
    losses = [(s / c.clamp_min(1.0)).numpy() for s, c in steps]
    last = load_checkpoint(out / "last.pt")
    rows = last["history"]
    assert [r["steps"] for r in rows] == [4, 4] and len(losses) == 8
    for e, row in enumerate(rows):
        want = np.mean(losses[4 * e:4 * e + 4], axis=0)
        assert [row[f"train_loss_{s}"] for s in services] == pytest.approx(want.tolist(), rel=1e-6)
    assert last["finished"] is True
    sim_batches = [idx for _, _, _, is_sim, idx in calls if is_sim]
    assert sim_batches and any(idx != sorted(idx) for idx in sim_batches)  # shuffled, not file order
    real_batches = [idx for _, _, _, is_sim, idx in calls if not is_sim]
    assert real_batches and any(idx != sorted(idx) for idx in real_batches)


def test_telling_param_picks_the_parameter_that_tracks_the_scenario_weights():
    import warnings

    from simmstnet.train.sim2real_loop import telling_param

    scenario_of = np.repeat(np.arange(4), 3)
    weights = np.repeat([0.1, 0.4, 0.2, 0.9], 3).astype(float)
    weights[9:] = np.nan  # scenario 3 never weighted: left out, not a NaN correlation
    params = {"flat": [1.0, 1.0, 1.0, 1.0], "noise": [3.0, 1.0, 2.5, 0.0], "tracks": [1.0, 4.0, 2.0, -50.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" for the unweighted scenario
        assert telling_param(weights, scenario_of, params) == "tracks"
        # equal weights (or no parameter varies): the first name, without a NaN correlation
        assert telling_param(np.ones(12), scenario_of, params) == "flat"
    assert telling_param(weights, scenario_of, {"a": [1, 1, 1, 1], "b": [2, 2, 2, 2]}) == "a"
    assert telling_param(weights, scenario_of, None) is None


def test_the_simulated_windows_read_the_configured_season_and_the_log_names_the_cap(files):
    from simmstnet.train.sim2real_loop import build_sim, steps_rule

    cfg = load_config(None, [*BASE, f"sim2real.sim_data={files['sim']}", "data.season_days=1",
                             "data.season_stat=median", "train.max_windows_per_epoch=128"])
    sim = build_sim(cfg, make_grid(T=24 * 6, services=("net",)))
    assert {(d.season_days, d.season_stat) for d in sim.datasets} == {(1, "median")}
    assert steps_rule(cfg, 512) == ("the same for every mode: 512 simulated windows, "
                                    "train.max_windows_per_epoch=128 / batch size 64")
    cfg.train.max_windows_per_epoch = None
    assert steps_rule(cfg, 512) == "the same for every mode: 512 simulated windows / batch size 64"


def test_a_checkpoint_without_a_sim2real_history_restores_an_empty_one():
    from simmstnet.train.sim2real_loop import Sim2RealLoop

    loop = Sim2RealLoop.__new__(Sim2RealLoop)  # the restore reads nothing else of the loop
    got = []
    loop.rw = SimpleNamespace(load_state_dict=got.append)
    loop.load_checkpoint_state({"sim2real": {"t": 3}})
    assert loop.history == [] and got == [{"t": 3}]
    loop.load_checkpoint_state({"sim2real": {"t": 4}, "sim2real_history": [{"epoch": 1}]})
    assert loop.history == [{"epoch": 1}]
