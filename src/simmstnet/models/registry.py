"""Model registry: one name per forecasting network, built from data sizes plus config overrides.

A model file declares a config dataclass (defaults, one-line help per field in
``field(metadata={"help": ...})``) and registers its class::

    @register_model("sim-mstnet", multitask=True, description="...", config=SimMSTNetConfig)
    class SimMSTNet(nn.Module):
        def __init__(self, dims: DataDims, config: SimMSTNetConfig): ...

``build_model(name, dims, **overrides)`` fills the config from ``overrides`` (unknown keys and
wrongly typed values raise :class:`~simmstnet.errors.UserError`) and returns the instance.

Every model also takes the option ``norm`` (``model.norm=...``), handled here rather than in
each model so that it is applied in one place: ``window`` wraps the network in
:class:`~simmstnet.models.norm.WindowNorm` (reversible per-window normalization: scale-free
forecasting on grids whose cells differ by orders of magnitude), ``none`` feeds it the globally
scaled values, ``auto`` (the default) takes the model's own setting, declared with
``register_model(..., norm=...)``: ``window`` for Sim-MSTNet/STNet (chosen by measurement, see
docs/results/uneven.md), the paper's setting (``none``) for the published baselines.

The built-in models (``simmstnet.models.sim_mstnet`` and every module of the
``simmstnet.models.baselines`` package) are imported on the first lookup, so importing this
module stays cheap and a new baseline file registers itself just by existing.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from simmstnet.errors import UserError


@dataclass(frozen=True)
class DataDims:
    """Sizes of the data a model is built for (they come from the window dataset, not the user)."""

    n_services: int  # C: services (tasks) per batch, the last axis of x / y
    input_len: int  # L: encoder input steps
    label_len: int  # known steps at the head of the decoder input
    horizon: int  # H: forecast steps
    patch: int  # k: side of the square neighbourhood patch (odd)
    n_marks: int = 5  # F: calendar features per step
    season_days: int = 0  # > 0: batches carry the seasonal history (x_season, y_season, masks)

    @classmethod
    def from_dataset(cls, ds: Any) -> "DataDims":
        """Read the sizes off a ``WindowDataset`` (attributes per docs/contracts.md)."""
        return cls(n_services=int(ds.n_services), input_len=int(ds.input_len),
                   label_len=int(ds.label_len), horizon=int(ds.horizon), patch=int(ds.patch),
                   n_marks=int(ds.n_marks), season_days=int(getattr(ds, "season_days", 0)))


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model name."""

    name: str
    cls: type
    config: type | None  # config dataclass, None for models without options
    multitask: bool
    description: str
    norm: str = "none"  # what model.norm=auto means for this model


NORM_CHOICES = ("auto", "window", "none")
NORM_HELP = ("input normalization: window (each window scaled by its own observed mean/std, the "
             "forecast mapped back: scale-free), none (the global per-service scaler only), auto (the "
             "model's default)")


_REGISTRY: dict[str, ModelEntry] = {}
_LOADED = False


def register_model(name: str, multitask: bool, description: str,
                   config: type | None = None, norm: str = "none") -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name``.

    ``config`` is the model's config dataclass; when omitted, the class attribute
    ``config_class`` is used if present. The class is constructed as ``cls(dims, config)``
    (or ``cls(dims)`` when it has no config). ``norm`` is what ``model.norm=auto`` means for it.
    """
    if norm not in ("window", "none"):
        raise ValueError(f"model {name!r}: norm must be 'window' or 'none', got {norm!r}")

    def decorate(cls: type) -> type:
        cfg = config if config is not None else getattr(cls, "config_class", None)
        if cfg is not None and not dataclasses.is_dataclass(cfg):
            raise TypeError(f"model {name!r}: config must be a dataclass, got {cfg!r}")
        old = _REGISTRY.get(name)
        # Re-registering the same class (module reloaded) is harmless; two classes is a bug.
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"model name {name!r} registered twice ({old.cls.__qualname__}, {cls.__qualname__})")
        _REGISTRY[name] = ModelEntry(name, cls, cfg, bool(multitask), description, norm)
        return cls

    return decorate


def _load_builtin_models() -> None:
    """Import the modules that register models (once). Import errors propagate: a broken model
    file should fail loudly, not vanish from the list."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # set first: a model module that looks up the registry must not recurse
    importlib.import_module("simmstnet.models.sim_mstnet")
    try:
        baselines = importlib.import_module("simmstnet.models.baselines")
    except ModuleNotFoundError as exc:
        if exc.name != "simmstnet.models.baselines":
            raise
        return
    # Works for a regular package and for a folder without __init__.py alike.
    for info in pkgutil.iter_modules(baselines.__path__, prefix="simmstnet.models.baselines."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


def _entry(name: str) -> ModelEntry:
    _load_builtin_models()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown model {name!r}; known models: {known}")
    return _REGISTRY[name]


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (UserError listing the known names if absent)."""
    return _entry(name)


def list_models() -> list[tuple[str, bool, str]]:
    """Every registered model as ``(name, multitask, description)``, sorted by name."""
    _load_builtin_models()
    return [(e.name, e.multitask, e.description) for e in sorted(_REGISTRY.values(), key=lambda e: e.name)]


def config_help(name: str) -> list[tuple[str, Any, str]]:
    """``(field, default, help)`` for each option of model ``name`` (for `--help`-style listings)."""
    entry = _entry(name)
    rows = [("norm", "auto", f"{NORM_HELP}; auto = {entry.norm} for {name}")]
    if entry.config is None:
        return rows
    for f in dataclasses.fields(entry.config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


def _coerce(model: str, key: str, value: Any, default: Any) -> Any:
    """Check an override against the type of its default; accept ints where floats are expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"model {model!r} option {key!r} must be {type(default).__name__}, "
                    f"got {type(value).__name__} {value!r}")


def resolve_norm(name: str, value: Any = "auto") -> str:
    """``window`` or ``none``: what ``model.norm=value`` means for model ``name``."""
    entry = _entry(name)
    if value not in NORM_CHOICES:
        raise UserError(f"model option 'norm' must be one of {', '.join(NORM_CHOICES)}, got {value!r}")
    return entry.norm if value == "auto" else value


def build_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of ``name`` with defaults replaced by ``overrides`` (``norm`` is
    checked and set aside: it belongs to :func:`build_model`, not to the model's config)."""
    entry = _entry(name)
    overrides = dict(overrides)
    resolve_norm(name, overrides.pop("norm", "auto"))
    if entry.config is None:
        if overrides:
            raise UserError(f"model {name!r} takes no options, got {', '.join(sorted(overrides))}")
        return None
    fields = {f.name: f for f in dataclasses.fields(entry.config)}
    for key in overrides:
        if key not in fields:
            raise UserError(f"unknown option {key!r} for model {name!r}; known options: "
                            f"{', '.join(fields)}")
    defaults = entry.config()
    values = {k: _coerce(name, k, v, getattr(defaults, k)) for k, v in overrides.items()}
    return dataclasses.replace(defaults, **values)


# What data.season_days=null means for a model that reads the seasonal history: one week of days.
SEASON_DAYS_AUTO = 7


def resolve_season_days(name: str, requested: int | None, step: int | None, horizon: int) -> int:
    """``data.season_days`` for model ``name``: ``requested`` when set; else (null) SEASON_DAYS_AUTO
    for models that read it, when the grid step divides a day and the horizon is at most a day
    (``step`` None: the grid is not known, that check is skipped), and 0 otherwise."""
    from simmstnet.data.windows import DAY

    if requested is not None:
        return int(requested)
    if not getattr(_entry(name).cls, "reads_season", False):
        return 0
    if step is not None and (step <= 0 or DAY % step or horizon > DAY // step):
        return 0
    return SEASON_DAYS_AUTO


def build_model(name: str, dims: DataDims, **overrides: Any):
    """Instantiate model ``name`` for data of size ``dims``; ``overrides`` set config fields.

    Raises UserError for an unknown name (listing the known ones), an unknown option (naming
    it and listing the known ones) or a wrongly typed value.
    """
    entry = _entry(name)
    overrides = dict(overrides)
    norm = resolve_norm(name, overrides.pop("norm", "auto"))
    cfg = build_config(name, **overrides)
    model = entry.cls(dims) if entry.config is None else entry.cls(dims, cfg)
    if dims.season_days and not getattr(model, "reads_season", False):
        raise UserError(f"model {name!r} does not read the seasonal history: set data.season_days=0 "
                        f"for it (models that read it: sim-mstnet, stnet)")
    if norm == "window" and hasattr(model, "fit"):
        raise UserError(f"model {name!r} is fitted on the globally scaled training data: model.norm=window "
                        f"does not apply to it (use model.norm=none)")
    if norm == "window":
        from simmstnet.models.norm import WindowNorm

        model = WindowNorm(model, dims.label_len)
    return model
