"""Running a model over windows: forecasts in original units, masked evaluation, one-cell series.

Evaluation covers every window of the dataset (no dropped last batch) unless a caller asks
for an evenly spaced subset (per-epoch validation on huge grids). Predictions are inverse
scaled with the dataset's scaler and compared with ``y_raw`` (the grid's own values) where
``y_mask`` is True; see :mod:`simmstnet.eval.metrics` for the figures.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from simmstnet.eval.metrics import MetricAccumulator


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_batch(batch: dict[str, torch.Tensor], ds, model, device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; add ``row``/``col`` (B,) for models with ``needs_cells``."""
    if getattr(_unwrap(model), "needs_cells", False):
        _, row, col = ds.window_info(batch["index"].cpu())
        batch = {**batch, "row": torch.from_numpy(row), "col": torch.from_numpy(col)}
    if device.type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def _unwrap(model):
    return getattr(model, "module", model)


def forecast_batches(model, ds, indices: np.ndarray | None = None, batch_size: int = 256,
                     device: torch.device | str = "cpu", amp: bool = True,
                     progress: bool = False, desc: str = "forecast") -> Iterator[tuple[dict, torch.Tensor]]:
    """Yield ``(batch, pred)`` over windows ``indices`` (default: all, in order).

    batch: the CPU batch (keys per contracts.md); pred: (B, H, C) float32 on CPU, scaled units.
    The model is put in eval mode and run without gradients.
    """
    device = torch.device(device)
    model.eval()
    order = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    starts = range(0, order.shape[0], batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress or None)
    with torch.no_grad():
        for lo in bar:
            batch = ds.get_batch(order[lo:lo + batch_size])
            inputs = prepare_batch(batch, ds, model, device)
            with autocast(device, amp):
                pred = model(inputs)
            yield batch, pred.float().cpu()


def evaluate(model, ds, batch_size: int = 256, device: torch.device | str = "cpu", amp: bool = True,
             loss_kind: str = "mse", max_windows: int | None = None, progress: bool = False,
             desc: str = "evaluate") -> dict:
    """Masked metrics in original units plus per-task losses in scaled units.

    Returns ``{"metrics": {service: {...}, "overall": {...}}, "task_losses": [C floats]}``,
    over every window of ``ds`` or, with ``max_windows``, that many evenly spaced windows.
    """
    from simmstnet.train.losses import masked_sample_losses

    indices = None
    if max_windows is not None and max_windows < len(ds):
        # Evenly spaced over the dataset: every part of the span and every cell block is sampled.
        indices = np.unique(np.linspace(0, len(ds) - 1, max_windows).round().astype(np.int64))
    acc = MetricAccumulator(ds.services, horizon=ds.horizon)
    loss_sum = torch.zeros(ds.n_services, dtype=torch.float64)
    loss_n = torch.zeros(ds.n_services, dtype=torch.float64)
    for batch, pred in forecast_batches(model, ds, indices, batch_size, device, amp, progress, desc):
        acc.update(ds.scaler.inverse(pred.double()), batch["y_raw"], batch["y_mask"])
        sums, counts = masked_sample_losses(pred, batch["y"], batch["y_mask"], kind=loss_kind)
        loss_sum += sums.sum(0).double()
        loss_n += counts.sum(0).double()
    losses = (loss_sum / loss_n.clamp_min(1)).tolist()
    return {"metrics": acc.result(), "task_losses": losses}


def cell_series(model, ds, row: int, col: int, horizon_step: int = 1, batch_size: int = 256,
                device: torch.device | str = "cpu", amp: bool = True):
    """Forecast and truth of one cell at one horizon step over the dataset's span.

    Returns ``(target_time_index (N,), truth (N, C), forecast (N, C))`` in original units,
    truth NaN where unobserved; ``horizon_step`` counts from 1.
    """
    start, rows, cols = ds.window_info(np.arange(len(ds)))
    pick = np.flatnonzero((rows == row) & (cols == col))
    pick = pick[np.argsort(start[pick], kind="stable")]
    h = horizon_step - 1
    times, truth, fc = [], [], []
    for batch, pred in forecast_batches(model, ds, pick, batch_size, device, amp):
        s, _, _ = ds.window_info(batch["index"])
        times.append(s + ds.input_len + h)
        y = batch["y_raw"][:, h].double().numpy()
        truth.append(np.where(batch["y_mask"][:, h].numpy(), y, np.nan))
        fc.append(ds.scaler.inverse(pred[:, h].double()).numpy())
    if not times:
        C = ds.n_services
        return np.zeros(0, np.int64), np.zeros((0, C)), np.zeros((0, C))
    return np.concatenate(times), np.concatenate(truth), np.concatenate(fc)
