"""Experiment configuration: typed sections, YAML files and dotted command-line overrides.

An experiment is one :class:`ExperimentConfig` with the sections ``data``, ``model``,
``train`` and ``sim2real`` plus the run folder ``out``. YAML files only pick values::

    data: {path: grid.npz, services: [net], split: [0.7, 0.1, 0.2]}
    model: {name: sim-mstnet, d_model: 32}      # every key but ``name`` goes to the model
    train: {epochs: 5}

and the command line overrides dotted keys, each value read as YAML
(``data.split=[0.8,0.1,0.1]``, ``train.lr=3e-4``, ``data.services=[net]``). Keys in a file are
checked exactly like overrides: an unknown key raises :class:`UserError` naming it and listing
the known keys at that level; a wrongly typed value names the key, the expected type and the value.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from simmstnet.errors import UserError


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with a default, a one-line help and optionally the allowed values."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    path: Optional[str] = _opt(None, "TrafficGrid .npz file to train and evaluate on")
    services: Optional[list[str]] = _opt(None, "services to forecast, e.g. [net] (null = every service in the file)")
    step: Optional[str] = _opt(None, "resample to this step before windowing, e.g. 1h (null = the file's step)")
    input_len: int = _opt(24, "L: input steps per window")
    label_len: int = _opt(12, "known steps at the head of the decoder input (<= input_len)")
    horizon: int = _opt(6, "H: forecast steps")
    patch: int = _opt(5, "k: side of the square neighbourhood patch around each cell (odd)")
    season_days: Optional[int] = _opt(None, "seasonal history: give the model, for every input and forecast step, "
                                      "the mean of the cell's values at the same time on each of the previous N "
                                      "days (0 = off; null = the model's default: 7 for sim-mstnet and stnet, "
                                      "0 for models that do not read it)")
    season_stat: str = _opt("mean", "seasonal history statistic over the previous days: mean, or median "
                            "(robust to bursts on some of the days)", choices=("mean", "median"))
    stride: int = _opt(1, "step between training window starts (validation and test always use 1)")
    split: list = _opt([0.7, 0.1, 0.2], "chronological split: three ratios summing to 1, or ISO dates "
                       "[val_start, test_start(, test_end)]")
    train_days: Optional[int] = _opt(None, "scarce-data protocol: keep only the last D days of the training span (null = all)")
    scaler: str = _opt("standard", "per-service scaling fitted on observed training values",
                       choices=("standard", "log-standard"))


@dataclass
class ModelConfig:
    name: str = _opt("sim-mstnet", "registered model name (see `simmstnet models`)")
    options: dict = _opt({}, "model options, given as model.<option>=VALUE (see the model's config)")


@dataclass
class TrainConfig:
    epochs: int = _opt(20, "maximum number of training epochs")
    batch_size: int = _opt(32, "windows per training step and process (global batch = batch_size x processes)")
    eval_batch_size: Optional[int] = _opt(None, "windows per evaluation batch (null = 4 x batch_size)")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.0, "decoupled weight decay (AdamW) or L2 penalty (Adam)")
    optimizer: str = _opt("adamw", "optimizer", choices=("adam", "adamw"))
    lr_schedule: str = _opt("cosine", "learning-rate schedule over the run (cosine: per step to 0.01 x lr; "
                            "step: x lr_gamma every lr_step_epochs)", choices=("cosine", "step", "constant"))
    lr_step_epochs: int = _opt(10, "epochs between decays of the step schedule")
    lr_gamma: float = _opt(0.5, "decay factor of the step schedule")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value (0 = off)")
    patience: int = _opt(5, "stop after this many epochs without a better validation MAE (0 = never)")
    loss: str = _opt("mae", "per-task training loss on scaled values (mae matches the reported metric; chosen "
                     "by measurement, docs/results/uneven.md)", choices=("mse", "mae", "huber"))
    loss_weighting: str = _opt("dynamic", "task loss weighting: dynamic (EMA-smoothed, paper eq. 13-14) or "
                               "average (equal weights)", choices=("dynamic", "average"))
    weighting_beta: float = _opt(0.9, "smoothing factor of the dynamic loss weighting")
    weighting_tau: float = _opt(1.0, "temperature of the dynamic loss weighting (larger = more even weights)")
    max_windows_per_epoch: Optional[int] = _opt(None, "train on a random subset of this many windows per epoch "
                                                "(null = all; for large grids)")
    max_val_windows: Optional[int] = _opt(None, "per-epoch validation on this many evenly spaced windows "
                                          "(null = all; final metrics always use every window)")
    seed: int = _opt(0, "seed for Python, NumPy and torch (model init, shuffling, dropout)")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    amp: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    log_every: int = _opt(10, "update the progress-bar losses every N steps")
    resume: bool = _opt(False, "continue the run in `out` from its last checkpoint (same as --resume)")


# The sim2real section reuses the reweighter's own dataclass (simmstnet.train.sim2real): every
# field of it is a ``sim2real.<key>`` with the same default, plus the data-side keys below. Only
# the one-line help texts live here (the dataclass documents its fields as comments).
_S2R_DATA_KEYS: list[tuple[str, Any, Any, str, tuple | str | None]] = [
    ("mode", str, "off", "use simulated data: off (real only), mix (sim+real, uniform weights), "
     "l2rw (learning to reweight, Ren et al. 2018), bilevel (the paper's cutting-plane weights), "
     "finetune (pretrain on sim, then fine-tune on real); alias train.sim2real",
     "modes"),  # the registered modes (simmstnet.train.sim2real.modes)
    ("sim_data", Optional[str], None, "simulated data for every mode but off: a TrafficGrid .npz or a "
     "scenario folder (simmstnet simulate --scenarios N); each scenario is scaled by its own scaler; "
     "alias train.sim_data", None),
    ("max_sim_windows", Optional[int], 20000, "use at most this many simulated windows, a reproducible "
     "random subset (null = all)", None),
    ("sim_stride", Optional[int], None, "step between simulated window starts (null = data.stride)", None),
    ("weight_by", str, "window", "what one lambda weights (l2rw, bilevel): window (the paper: one per "
     "simulated window, each seen about once per epoch) or scenario (one shared by every window of a "
     "simulated city, with a hypergradient every step; the held-out bilevel form uses it)",
     ("window", "scenario")),
    ("steps_per_epoch", Optional[int], None, "optimizer steps per epoch, the same for every mode (off "
     "included once sim_data is set); null = ceil(min(simulated windows, train.max_windows_per_epoch) / "
     "train.batch_size), or one pass over the real windows without sim_data", None),
    ("upper_data", str, "train", "real windows of the upper level G (l2rw, bilevel) and of mix: train "
     "(the last train_days days) or val (the validation span, then early stopping and the best "
     "checkpoint use the training loss of real windows instead)", ("train", "val")),
]
_S2R_HELP = {
    "k_steps": "K: lower-level gradient steps unrolled per iteration (cost grows ~linearly in K)",
    "inner_lr": "eta: step size of the unrolled lower-level steps (also l2rw's virtual step)",
    "eps": "constraint level h <= eps (null = calibrate at the end of the warm start)",
    "eps_factor": "calibrated eps = eps_factor x mean h over the last warm-start steps (below ~1 the "
                  "minibatch noise of h keeps the constraint violated and its dual grows without end)",
    "eps_calib_steps": "warm-start steps (the last ones) whose h calibrates eps",
    "k_pre": "phase 1: drop inactive planes and maybe add one every k_pre iterations",
    "p_max": "most cutting planes kept (memory: p_max copies of the model parameters)",
    "t1": "phase switch: <= 1 a fraction of all iterations, > 1 an iteration number (capped at the run's "
          "length when the warm start has to be shortened, see warm_start_epochs)",
    "lr_lambda": "step of the lambda optimizer (weight = sigmoid(lambda)): adam's learning rate, or with "
                 "lambda_opt=sgd the step in units of the running RMS of the hypergradient (0.02 in the "
                 "held-out form)",
    "lr_gamma": "dual ascent step on the plane values",
    "rho": "phase-2 quadratic penalty weight on violated planes",
    "warm_start_epochs": "epochs of uniform-weight training on simulated data before reweighting; when they "
                         "fill the whole run (train.epochs <= warm_start_epochs) the warm start is shortened to "
                         "half of the iterations before the phase switch t1 (logged)",
    "lambda_init": "initial lambda of every simulated window (0 = weight 0.5)",
    "upper": "where G is evaluated: unrolled (at phi_K) or theta (the literal reconstruction)",
    "live_constraint": "also enforce h <= eps at the current point every step (dual gamma0)",
    "live_phase2": "live constraint in phase 2: dual (keep ascent) or penalty (rho)",
    "lr_gamma0": "dual ascent step of the live constraint (on h/eps - 1)",
    "normalize_weights": "lower level = weighted mean loss sum(w l)/sum(w) instead of (1/N) sum(w l)",
    "normalize_planes": "divide each plane by ||(a, b)||: the same half-space with scale-free duals",
    "real_batch_size": "real windows per step for G and the real loss term (null = train.batch_size)",
    "lower_coef": "bilevel: theta also descends lower_coef x the weighted simulated loss (default 1; 0 = "
                  "the reconstruction, where sim data reach theta only through phi_K and the constraint)",
    "real_share": "mix: weight of the real windows' mean loss in each step's loss, (1 - r) x sim mean + r x "
                  "real mean (null = every window of the step counts once: the real share is real_batch_size "
                  "/ (batch_size + real_batch_size), one half by default)",
    "pretrain_share": "finetune: share of the run's optimizer steps spent pretraining on simulated windows; "
                      "the rest fine-tune on the real ones",
    "finetune_lr_factor": "finetune: fine-tuning steps run train.lr_schedule afresh at this factor x train.lr "
                          "(the optimizer's moments reset at the switch)",
    "finetune_holdout": "finetune: the last share (in time) of the real windows, never trained on, that "
                        "picks the model (held-out MAE after every pass over the fine-tuning windows)",
    "finetune_patience": "finetune: stop after this many held-out checks without gain (0 = never); the best "
                         "held-out parameters are kept either way",
    "finetune_l2sp": "finetune: alpha of the L2-SP pull (alpha/2) ||theta - theta_pretrained||^2 (0 = off)",
    "upper_folds": "bilevel: the real windows fall into F folds (blocks of input_len + horizon steps); at "
                   "step t the upper level G reads fold (t mod F) and theta's real loss the others, so lambda "
                   "learns from windows theta is not fitting then (1, default: G on every real "
                   "window, which theta also descends)",
    "learn_share": "bilevel: learn the simulated share s of the lower level (1 - s) x real loss + s x "
                   "weighted simulated loss, which can fall towards 0 (real only); needs upper_folds >= 2",
    "share_init": "bilevel: the simulated share s at the start (fixed with learn_share=false); 0.5 is the "
                  "balance of mix with equal batch sizes",
    "lambda_opt": "bilevel: lambda optimizer: sgd (steps in units of the running RMS of the hypergradient, "
                  "pulled to the start, so noise leaves the weights near 0.5; the held-out form) or adam (default)",
    "lambda_pull": "bilevel, sgd: pull of every lambda (and the share) towards its start per update (noise "
                   "band of lambda ~ sqrt(lr_lambda / (2 x lambda_pull)))",
    "eps_quantile": "bilevel: eps follows this quantile of h over the last eps_window steps, so the "
                    "constraint binds about (1 - q) of the time (null, default = eps fixed at eps_factor x "
                    "the warm-start h; a binding constraint cost test MAE on the real Milano block, see "
                    "docs/results/sim2real-evidence.md)",
    "eps_window": "bilevel: steps of h the running eps_quantile reads",
    "plane_max_age": "bilevel: a cutting plane is dropped this many iterations after it was cut, in phase 2 too "
                     "(a linearization of h means nothing far from where it was cut; null = kept while its "
                     "dual is positive, default)",
    "dual_max": "bilevel: every dual (planes and the live constraint) is projected onto [0, dual_max] "
                "(null = unbounded, default)",
    "dual_reg": "bilevel: the duals ascend the Lagrangian minus (mu_t/2) gamma^2, mu_t = dual_reg / "
                "sqrt(1 + steps since the warm start) (0 = unregularised, default)",
    "upper_trains_theta": "bilevel, upper_folds >= 2: theta also descends G on the held-out fold, so every "
                          "real window trains theta at every step (false: the held-out fold only teaches "
                          "lambda and the share at that step)",
    "constraint_lambda": "bilevel: the constraint's terms (planes and live) also move lambda and the share, "
                         "as in the paper (false: they move theta only; lambda and the share follow the "
                         "held-out hypergradient, since h can also be lowered by weighting what theta already "
                         "fits); with upper_folds=1 they always do",
    "freeze_weights": "bilevel ablation: lambda and the share never move (the constraint and the lower "
                      "level still train theta)",
    "mix_warm_start": "mix ablation: start with bilevel's warm start (warm_start_epochs on simulated "
                      "windows only)",
}
_S2R_CHOICES = {"upper": ("unrolled", "theta"), "live_phase2": ("dual", "penalty"),
                "lambda_opt": ("sgd", "adam")}


def _make_sim2real_section() -> type:
    from simmstnet.train.sim2real import Sim2RealConfig as Core
    from simmstnet.train.sim2real import modes

    hints = typing.get_type_hints(Core)
    core_defaults = Core()
    specs = []
    for name, hint, default, help_, choices in _S2R_DATA_KEYS:
        specs.append((name, hint, _opt(default, help_, modes() if choices == "modes" else choices)))
    for f in dataclasses.fields(Core):
        if f.name == "mode":
            continue
        if f.name not in _S2R_HELP:  # a new reweighter field must get its help text here
            raise RuntimeError(f"config: no help for sim2real.{f.name}")
        specs.append((f.name, hints[f.name],
                      _opt(getattr(core_defaults, f.name), _S2R_HELP[f.name], _S2R_CHOICES.get(f.name))))
    cls = dataclasses.make_dataclass("Sim2RealConfig", specs)
    cls.__module__ = __name__
    cls.__doc__ = ("The sim2real section: the data-side keys (mode, sim_data, max_sim_windows, sim_stride, "
                   "upper_data) and every field of simmstnet.train.sim2real.Sim2RealConfig.")
    return cls


Sim2RealConfig = _make_sim2real_section()


def reweighter_config(section: Any):
    """The :class:`simmstnet.train.sim2real.Sim2RealConfig` of a config's sim2real section."""
    from simmstnet.train.sim2real import Sim2RealConfig as Core

    return Core(**{f.name: getattr(section, f.name) for f in dataclasses.fields(Core)}).validate()


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the data and its windows"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the forecasting model"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})
    sim2real: Sim2RealConfig = field(default_factory=Sim2RealConfig, metadata={"help": "simulated data"})
    out: Optional[str] = _opt(None, "run folder (null = runs/<model>-<date>-<time>)")


SECTIONS = ("data", "model", "train", "sim2real")

# --------------------------------------------------------------------------- value checking

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        args = typing.get_args(hint)
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint))


def _plain(value: Any) -> Any:
    """YAML reads 2013-11-20 as a date: keep dates as ISO text (the split accepts ISO dates)."""
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` checked against ``hint`` (ints accepted for floats), else raise UserError."""
    bad = UserError(f"config key {key!r} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    origin = typing.get_origin(hint)
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        for a in inner:
            try:
                return _coerce(key, value, a)
            except UserError:
                pass
        raise bad
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # PyYAML (YAML 1.1) reads 3e-4 (no dot) as text; take it as the number it clearly is.
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value)
        else:
            raise bad
        if not math.isfinite(number):  # .inf / .nan (or 1e999) would only fail epochs later
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise bad
        args = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _check_split(value: Any) -> list:
    key = "data.split"
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise UserError(f"config key {key!r} must be three ratios [train, val, test] or ISO dates "
                        f"[val_start, test_start(, test_end)], got {value!r}")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if len(value) != 3:
            raise UserError(f"config key {key!r}: ratios must be three numbers [train, val, test], got {value!r}")
        ratios = [float(v) for v in value]
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise UserError(f"config key {key!r}: ratios must be non-negative and sum to 1, got {value!r}")
        return ratios
    if all(isinstance(v, str) for v in value):
        for v in value:
            try:
                _dt.datetime.fromisoformat(v)
            except ValueError:
                raise UserError(f"config key {key!r}: {v!r} is not an ISO date (e.g. 2013-12-20)") from None
        return list(value)
    raise UserError(f"config key {key!r} mixes ratios and dates: {value!r}")


def _validate(cfg: "ExperimentConfig") -> None:
    """Cross-field checks that single values cannot express."""
    d, t = cfg.data, cfg.train
    for key, v in (("data.input_len", d.input_len), ("data.horizon", d.horizon), ("data.patch", d.patch),
                   ("data.stride", d.stride), ("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                   ("train.log_every", t.log_every)):
        if v < 1:
            raise UserError(f"config key {key!r} must be at least 1, got {v}")
    if not 0 <= d.label_len <= d.input_len:
        raise UserError(f"config key 'data.label_len' must be in [0, data.input_len={d.input_len}], got {d.label_len}")
    if d.season_days is not None and d.season_days < 0:
        raise UserError(f"config key 'data.season_days' must be 0 (off) or a number of days, got {d.season_days}")
    if d.patch % 2 == 0:
        raise UserError(f"config key 'data.patch' must be odd (the cell sits at the centre), got {d.patch}")
    if d.train_days is not None and d.train_days < 1:
        raise UserError(f"config key 'data.train_days' must be a positive number of days or null, got {d.train_days}")
    for key, v in (("train.eval_batch_size", t.eval_batch_size), ("train.max_windows_per_epoch", t.max_windows_per_epoch),
                   ("train.max_val_windows", t.max_val_windows)):
        if v is not None and v < 1:
            raise UserError(f"config key {key!r} must be at least 1 or null, got {v}")
    for key, v in (("train.lr", t.lr), ("train.lr_gamma", t.lr_gamma)):
        if not v > 0:
            raise UserError(f"config key {key!r} must be positive, got {v}")
    for key, v in (("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                   ("train.patience", t.patience)):
        if v < 0:
            raise UserError(f"config key {key!r} must be non-negative, got {v}")
    if not 0 <= t.weighting_beta < 1:
        raise UserError(f"config key 'train.weighting_beta' must be in [0, 1), got {t.weighting_beta}")
    if not t.weighting_tau > 0:
        raise UserError(f"config key 'train.weighting_tau' must be positive, got {t.weighting_tau}")
    s = cfg.sim2real
    for key in ("max_sim_windows", "sim_stride", "steps_per_epoch"):
        v = getattr(s, key)
        if v is not None and v < 1:
            raise UserError(f"config key 'sim2real.{key}' must be at least 1 or null, got {v}")
    reweighter_config(s)  # the reweighter's own range checks name sim2real.<field>
    dev = t.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UserError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {dev!r}")


# --------------------------------------------------------------------------- setting keys


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# The spelling of the two main sim2real keys; the sim2real section is the primary form.
_ALIASES = {"train.sim2real": "sim2real.mode", "train.sim_data": "sim2real.sim_data"}


def _set(cfg: ExperimentConfig, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` (``train.lr``, ``out``, ``model.d_model``) on ``cfg`` after checking it."""
    where = f"{source}: " if source else ""
    key = _ALIASES.get(key, key)
    parts = key.split(".")
    value = _plain(value)
    top = _fields(ExperimentConfig)
    if parts[0] not in top:
        raise UserError(f"{where}unknown config key {parts[0]!r}; known keys: {', '.join(top)}")
    if parts[0] == "out":
        if len(parts) != 1:
            raise UserError(f"{where}config key 'out' has no sub-keys (got {key!r})")
        cfg.out = None if value is None else str(_coerce("out", value, Optional[str]))
        return
    section = getattr(cfg, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise UserError(f"{where}config key {key!r} is a section: give a mapping or set {key}.<key>, "
                            f"got {value!r}")
        for sub, v in value.items():
            _set(cfg, f"{key}.{sub}", v, source)
        return
    if len(parts) > 2:
        raise UserError(f"{where}config key {key!r} is too deep; keys are section.key")
    name = parts[1]
    if parts[0] == "model" and name not in ("name", "options"):
        # Free model options; the model's own config checks them (see _check_model_options).
        section.options[name] = value
        return
    known = _fields(type(section))
    if name not in known:
        raise UserError(f"{where}unknown config key {key!r}; known keys in {parts[0]}: {', '.join(known)}")
    if parts[0] == "model" and name == "options":
        if not isinstance(value, dict):
            raise UserError(f"{where}config key 'model.options' must be a mapping, got {value!r}")
        section.options.update(value)
        return
    hints = typing.get_type_hints(type(section))
    if key == "sim2real.mode" and value is False:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    if key == "data.services" and isinstance(value, str):
        value = [value]  # data.services=net means [net]
    if key == "data.services" and value == []:
        raise UserError(f"{where}config key 'data.services' is an empty list: name at least one "
                        "service (e.g. [net]), or null for every service in the file")
    try:
        if key == "data.split":
            checked = _check_split(value)
        else:
            checked = _coerce(key, value, hints[name])
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None
    choices = known[name].metadata.get("choices")
    if choices is not None and checked not in choices:
        raise UserError(f"{where}config key {key!r} must be one of {', '.join(choices)}, got {checked!r}")
    setattr(section, name, checked)


def _check_model_options(cfg: ExperimentConfig) -> None:
    """Let the model's own config dataclass judge the options now, before any data is read."""
    from simmstnet.models.registry import build_config

    try:
        build_config(cfg.model.name, **cfg.model.options)
    except UserError as exc:
        raise UserError(f"model section: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML would keep the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"cannot read override {text!r}: use KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"cannot read override {text!r}: the key is empty")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        line = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise UserError(f"cannot read the value of override {key!r} as YAML: {line}") from None
    return key, value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (UserError for a missing or malformed file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        with open(path) as fh:
            data = _load_yaml(fh)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{at} invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_mapping(cfg: ExperimentConfig, data: dict, source: str = "") -> ExperimentConfig:
    """Set every key of a nested mapping (a YAML file's content) on ``cfg``."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{source + ': ' if source else ''}config keys must be text, got {key!r}")
        _set(cfg, key, value, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: ExperimentConfig | None = None, check_model: bool = True) -> ExperimentConfig:
    """Defaults (or ``base``), then the YAML file ``path``, then ``KEY=VALUE`` overrides, checked.

    Raises UserError naming the file or key for an unknown key, a wrongly typed value or an
    impossible combination. ``check_model`` also validates the model options against the
    registered model's config (it imports the model code).
    """
    cfg = copy_config(base) if base is not None else ExperimentConfig()
    if path is not None:
        apply_mapping(cfg, read_yaml(path), str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, "")
    _validate(cfg)
    if check_model:
        _check_model_options(cfg)
    return cfg


def copy_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return config_from_dict(config_to_dict(cfg), check_model=False)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain nested dict (the YAML layout: model options sit beside ``model.name``)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        if name == "model":
            section = {"name": section["name"], **section["options"]}
        out[name] = section
    out["out"] = cfg.out
    return out


def config_from_dict(data: dict, check_model: bool = True) -> ExperimentConfig:
    cfg = apply_mapping(ExperimentConfig(), data, "config")
    _validate(cfg)
    if check_model:
        _check_model_options(cfg)
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_help(model_name: str | None = None) -> str:
    """Every key with its default and one-line help (``simmstnet train --help-config``)."""
    lines = []
    defaults = ExperimentConfig()
    for f in dataclasses.fields(ExperimentConfig):
        if f.name not in SECTIONS:
            lines.append(f"{f.name} = {_show(getattr(defaults, f.name))}  # {f.metadata['help']}")
            continue
        lines.append(f"{f.name}:  # {f.metadata['help']}")
        section = getattr(defaults, f.name)
        for sf in dataclasses.fields(section):
            if f.name == "model" and sf.name == "options":
                continue
            choices = sf.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"  {f.name}.{sf.name} = {_show(getattr(section, sf.name))}  # {sf.metadata['help']}{extra}")
        if f.name == "model":
            name = model_name or defaults.model.name
            try:
                from simmstnet.models.registry import config_help as model_help

                rows = model_help(name)
            except ImportError:
                rows = []
            except UserError as exc:
                if model_name is not None:  # the user asked for this model: say it is unknown
                    raise UserError(f"--help-config model.name={model_name}: {exc}") from None
                rows = []
            if rows:
                lines.append(f"  # options of model {name!r} (other models: `simmstnet models`, "
                             f"`--help-config model.name=NAME`):")
                for key, default, help_ in rows:
                    lines.append(f"  model.{key} = {_show(default)}  # {help_}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()
