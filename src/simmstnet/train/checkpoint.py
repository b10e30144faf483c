"""Checkpoints of a run folder: atomic writes, RNG capture, and loading a finished run.

A run folder (``out``) holds ``config.yaml``, ``last.pt`` (everything needed to continue:
model, optimizer, scheduler, loss-weighting state, RNG states of every rank, epoch, best
metric, early-stopping counter, history), ``best.pt`` (the best model and what is needed to
use it: model name and options, data sizes, services, scaler state, data step), plus
``metrics.json``, ``history.csv`` and plots.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``. Writes go to a temporary file that is renamed into place
(:func:`simmstnet.utils.atomic_path`): a run killed mid-write keeps its previous checkpoint.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path

FORMAT = 1
CONFIG_FILE = "config.yaml"
LAST = "last.pt"
BEST = "best.pt"
# What load_run needs from best.pt.
BEST_KEYS = ("model", "model_name", "model_options", "dims", "scaler", "services", "step")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save({"format": FORMAT, **state}, tmp)
        except RuntimeError as exc:
            # torch's archive writer reports a failed write (disk full, ulimit -f) as a
            # RuntimeError such as "[enforce fail at inline_container.cc:...] unexpected pos".
            text = (str(exc).strip().splitlines() or [""])[0]
            if "inline_container" not in text and "write" not in text.lower():
                raise
            raise UserError(f"{path}: cannot write the checkpoint (disk full or file-size limit? "
                            f"{text})") from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (UserError if absent or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        text = str(exc).strip()
        detail = f": {text.splitlines()[0]}" if text else ""  # an empty file gives an empty message
        empty = " (empty file)" if path.stat().st_size == 0 else ""
        raise UserError(f"{path}: cannot read checkpoint{empty} ({type(exc).__name__}{detail})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a simmstnet checkpoint of format {FORMAT}")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": _to_lists(random.getstate()),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


@dataclass
class LoadedRun:
    """A trained run ready to forecast: its config, model (eval mode, on ``device``), scaler."""

    folder: Path
    config: Any  # ExperimentConfig
    model: torch.nn.Module
    scaler: Any  # Scaler
    services: tuple[str, ...]
    step: int
    checkpoint: dict[str, Any]


def load_run(folder: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the best model of run ``folder`` from ``config.yaml`` and ``best.pt``."""
    from simmstnet.config import load_config
    from simmstnet.data.scaling import Scaler
    from simmstnet.models.registry import DataDims, build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: not a run folder (no {CONFIG_FILE})")
    if not (folder / BEST).is_file():
        raise UserError(f"{folder}: the run has no {BEST} yet (still training, or killed before its "
                        "first epoch ended)")
    cfg = load_config(folder / CONFIG_FILE)
    path = folder / BEST
    ckpt = load_checkpoint(path, map_location="cpu")
    missing = [k for k in BEST_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a best-model checkpoint (no {', '.join(repr(k) for k in missing)})")
    try:
        dims = DataDims(**ckpt["dims"])
        model = build_model(ckpt["model_name"], dims, **ckpt["model_options"])
        scaler = Scaler.from_state_dict(ckpt["scaler"])
        services, step = tuple(str(s) for s in ckpt["services"]), int(ckpt["step"])
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: damaged checkpoint ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0]})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        # load_state_dict lists every mismatched key over many lines: show the first
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise UserError(f"{path}: the weights do not fit model {ckpt['model_name']!r} "
                        f"({detail[:200]})") from None
    model.to(device).eval()
    return LoadedRun(folder, cfg, model, scaler, services, step, ckpt)
