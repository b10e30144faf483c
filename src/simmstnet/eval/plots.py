"""Figures of a run: loss curves and forecast-vs-truth (the paper's Figure 2 style).

matplotlib with the non-interactive Agg backend (works on servers without a display); every
figure is written atomically.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Sequence

import numpy as np

from simmstnet.utils import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def plot_loss_curves(history: Sequence[dict], services: Sequence[str], path: str | Path) -> Path:
    """Train and validation loss (scaled units) per task against the epoch, one panel per
    service, plus the validation MAE (original units) in the last panel.

    history: rows with ``epoch``, ``train_loss_<s>``, ``val_loss_<s>`` and ``val_mae``.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(services) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for ax, s in zip(axes[0], services):
        ax.plot(epochs, [row.get(f"train_loss_{s}") for row in history], "o-", color="tab:blue", label="train")
        ax.plot(epochs, [row.get(f"val_loss_{s}") for row in history], "o-", color="tab:orange", label="val")
        ax.set_title(f"{s} loss (scaled)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    ax.plot(epochs, [row.get("val_mae") for row in history], "o-", color="tab:red")
    ax.set_title("val MAE (original units)")
    ax.set_xlabel("epoch")
    for a in axes[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not history:
        for a in axes[0]:
            a.text(0.5, 0.5, "no training epochs\n(model without parameters)", ha="center",
                   va="center", transform=a.transAxes, fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_forecast(times: Sequence[dt.datetime] | np.ndarray, truth: np.ndarray, forecast: np.ndarray,
                  path: str | Path, title: str = "", label: str = "model",
                  second: tuple[str, np.ndarray] | None = None, ylabel: str = "activity",
                  xlabel: str = "") -> Path:
    """One cell, one horizon step over a span: truth black, model red, optional second model blue.

    times: (N,) datetimes; truth, forecast: (N,) original units (truth NaN where unobserved,
    which leaves a gap); second: (label, (N,) forecast) of a model to compare.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.0))
    ax.plot(times, truth, color="black", lw=1.2, label="ground truth")
    ax.plot(times, forecast, color="red", lw=1.0, label=label)
    if second is not None:
        ax.plot(times, second[1], color="blue", lw=1.0, label=second[0])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8, loc="upper right")
    fig.autofmt_xdate()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
