"""Experiment config: defaults, YAML files, dotted overrides, errors, --help-config, resume rules."""
from __future__ import annotations

from pathlib import Path

import pytest

from simmstnet.cli import main
from simmstnet.config import (ExperimentConfig, config_help, config_to_dict, dump_config, load_config,
                              parse_override)
from simmstnet.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_the_defaults():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert config_to_dict(cfg) == config_to_dict(ExperimentConfig())
    d = cfg.data
    assert (d.input_len, d.label_len, d.horizon, d.split) == (24, 12, 6, [0.7, 0.1, 0.2])


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_are_read_as_yaml_and_typed():
    cfg = load_config(None, ["data.split=[0.8,0.1,0.1]", "train.lr=3e-4", "train.epochs=7",
                             "data.services=[net]", "model.d_model=32", "out=runs/x", "train.amp=false",
                             "data.train_days=3"])
    assert cfg.data.split == [0.8, 0.1, 0.1]
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.train.amp is False
    assert cfg.data.services == ["net"] and cfg.data.train_days == 3
    assert cfg.model.options == {"d_model": 32}
    assert cfg.out == "runs/x"
    # An integer is a fine float.
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_split_accepts_dates_and_keeps_them_as_text():
    cfg = load_config(None, ["data.split=[2013-11-20, 2013-11-25]"])
    assert cfg.data.split == ["2013-11-20", "2013-11-25"]
    cfg = load_config(None, ["data.split=['2013-11-20 06:00', 2013-11-25, 2013-12-01]"])
    assert cfg.data.split[0] == "2013-11-20 06:00"


@pytest.mark.parametrize("override, words", [
    ("train.foo=1", ["'train.foo'", "known keys in train", "epochs", "batch_size"]),
    ("foo=1", ["'foo'", "known keys", "data", "sim2real"]),
    ("data.foo.bar=1", ["'data.foo.bar'"]),
    ("train.epochs=abc", ["'train.epochs'", "int", "'abc'"]),
    ("train.epochs=2.5", ["'train.epochs'", "int", "2.5"]),
    ("train.amp=3", ["'train.amp'", "bool"]),
    ("data.split=[0.5,0.5]", ["'data.split'", "three"]),
    ("data.split=[0.5,0.3,0.3]", ["'data.split'", "sum to 1"]),
    ("data.split=[2013-11-20, 0.5]", ["'data.split'", "mixes"]),
    ("data.split=[nodate, 2013-11-20]", ["'data.split'", "ISO date"]),
    ("train.optimizer=sgd", ["'train.optimizer'", "adam, adamw", "'sgd'"]),
    ("train.device=gpu", ["'train.device'"]),
    ("data.label_len=30", ["'data.label_len'"]),
    ("data.patch=4", ["'data.patch'", "odd"]),
    ("model=3", ["'model'", "section"]),
    ("train.epochs", ["KEY=VALUE"]),
    ("model.no_such_option=1", ["no_such_option", "sim-mstnet", "d_model"]),
    ("model.name=no-such-model", ["no-such-model", "known models"]),
])
def test_bad_keys_and_values_raise_one_clear_line(override, words):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_file_keys_are_checked_like_overrides_and_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  horizon: 3\ntrain:\n  epoch: 5\n")
    with pytest.raises(UserError, match=r"exp.yaml: unknown config key 'train.epoch'.*epochs"):
        load_config(path)
    path.write_text("train: [1, 2]\n")
    with pytest.raises(UserError, match="exp.yaml.*section"):
        load_config(path)
    path.write_text("train:\n  epochs: [5\n")
    with pytest.raises(UserError, match=r"exp.yaml: line \d+ invalid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_file_then_overrides_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data: {horizon: 3, services: [net]}\nmodel: {name: sim-mstnet, d_model: 16}\n"
                    "train: {epochs: 5}\nsim2real: {mode: off}\n")
    cfg = load_config(path, ["train.epochs=9"])
    assert (cfg.data.horizon, cfg.train.epochs, cfg.model.options["d_model"]) == (3, 9, 16)
    assert cfg.sim2real.mode == "off"  # YAML 1.1 reads `off` as false; accepted as "off"


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["data.split=[2013-11-20,2013-11-25]", "model.d_model=16", "data.services=[net]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert config_to_dict(load_config(path)) == config_to_dict(cfg)


def test_parse_override_needs_a_key():
    assert parse_override("train.lr=null") == ("train.lr", None)
    with pytest.raises(UserError):
        parse_override("=3")


def test_help_config_lists_every_key_with_help():
    text = config_help()
    cfg = config_to_dict(ExperimentConfig())
    for section in ("data", "train", "sim2real"):
        for key in cfg[section]:
            line = next(l for l in text.splitlines() if l.strip().startswith(f"{section}.{key} ="))
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 5
    assert "model.d_model" in text  # the default model's options are listed too


def test_cli_bad_key_exits_2_with_one_line(capsys):
    assert main(["train", "train.epochz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("simmstnet: error: unknown config key 'train.epochz'")
    assert "epochs" in err[0]


def test_cli_help_config(capsys):
    assert main(["train", "--help-config"]) == 0
    assert "data.path" in capsys.readouterr().out


def test_cli_missing_data_path(capsys, tmp_path):
    assert main(["train", f"out={tmp_path / 'run'}"]) == 2
    assert "data.path is not set" in capsys.readouterr().err


def test_resume_may_not_change_what_is_computed(tmp_path):
    from simmstnet.commands.train import resolve_train_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, ["data.horizon=3", f"out={run}"])))
    cfg, resume = resolve_train_config(None, [f"out={run}", "train.device=cpu"], resume=True)
    assert resume and cfg.data.horizon == 3 and cfg.train.device == "cpu"
    with pytest.raises(UserError, match="cannot change data.horizon when resuming"):
        resolve_train_config(None, [f"out={run}", "data.horizon=6"], resume=True)
    with pytest.raises(UserError, match="out=DIR"):
        resolve_train_config(None, [], resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        resolve_train_config(None, [f"out={tmp_path / 'none'}"], resume=True)
