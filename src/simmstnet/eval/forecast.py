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
    """Move a batch to ``device``; add ``row``/``col`` (B,) for models with ``needs_cells``, and
    ``start`` (B,) for models with ``needs_history`` (after ``model.bind(ds)``, once per dataset)."""
    if getattr(_unwrap(model), "needs_cells", False):
        _, row, col = ds.window_info(batch["index"].cpu())
        batch = {**batch, "row": torch.from_numpy(row), "col": torch.from_numpy(col)}
    if getattr(_unwrap(model), "needs_history", False):
        if getattr(_unwrap(model), "bound_dataset", None) is not ds:
            _unwrap(model).bind(ds)
        start, _, _ = ds.window_info(batch["index"].cpu())
        batch = {**batch, "start": torch.from_numpy(start)}
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


def evaluation_subset(n: int, max_windows: int | None) -> np.ndarray | None:
    """Window indices of a per-epoch validation subset: ``max_windows`` evenly spaced over the
    dataset (every part of the span and every cell block is sampled), or None for all ``n``."""
    if max_windows is None or max_windows >= n:
        return None
    return np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))


def evaluate(model, ds, batch_size: int = 256, device: torch.device | str = "cpu", amp: bool = True,
             loss_kind: str = "mse", max_windows: int | None = None, progress: bool = False,
             desc: str = "evaluate", intervals=None, interval_method: str | None = None,
             collect=None) -> dict:
    """Masked metrics in original units plus per-task losses in scaled units.

    Returns ``{"metrics": {service: {...}, "overall": {...}}, "task_losses": [C floats]}``,
    over every window of ``ds`` or, with ``max_windows``, that many evenly spaced windows.

    With ``intervals`` (a :class:`~simmstnet.eval.intervals.Calibration`) also ``"intervals"``
    (coverage, width, Winkler score, pinball, CRPS per service; see
    :class:`~simmstnet.eval.intervals.IntervalAccumulator`), ``"cells"`` (per-cell MAE, mean and
    coverage arrays for the maps) and ``"interval_method"``; ``interval_method`` "split"
    (default: the calibration's method) or "aci" (adaptive conformal inference over the span's
    issue times, which adds ``"aci"``). ``collect`` (a
    :class:`~simmstnet.eval.intervals.ScoreCollector`) receives every batch's forecasts in the
    same pass (calibration on the validation span without a second pass).
    """
    from simmstnet.train.losses import masked_sample_losses

    if intervals is not None or collect is not None:
        return _evaluate_with_intervals(model, ds, batch_size, device, amp, loss_kind, max_windows, progress,
                                        desc, intervals, interval_method, collect)

    indices = evaluation_subset(len(ds), max_windows)
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


def _evaluate_with_intervals(model, ds, batch_size, device, amp, loss_kind, max_windows, progress, desc,
                             cal, method, collect) -> dict:
    """:func:`evaluate` plus interval metrics and/or score collection (one pass over the windows)."""
    import time

    from simmstnet.eval.intervals import AciBuffer, IntervalAccumulator, check_method
    from simmstnet.train.losses import masked_sample_losses

    indices = evaluation_subset(len(ds), max_windows)
    acc = MetricAccumulator(ds.services, horizon=ds.horizon)
    loss_sum = torch.zeros(ds.n_services, dtype=torch.float64)
    loss_n = torch.zeros(ds.n_services, dtype=torch.float64)
    method = check_method(method or (cal.method if cal is not None else None))
    iacc = IntervalAccumulator(ds.services, cal.levels, ds.grid.shape[1:3]) if cal is not None else None
    aci = AciBuffer(cal) if cal is not None and method == "aci" else None
    interval_seconds = 0.0
    for batch, pred in forecast_batches(model, ds, indices, batch_size, device, amp, progress, desc):
        p = ds.scaler.inverse(pred.double())
        acc.update(p, batch["y_raw"], batch["y_mask"])
        sums, counts = masked_sample_losses(pred, batch["y"], batch["y_mask"], kind=loss_kind)
        loss_sum += sums.sum(0).double()
        loss_n += counts.sum(0).double()
        t0 = time.perf_counter()
        start, rows, cols = ds.window_info(batch["index"])
        p_np, y_np, m_np = p.numpy(), batch["y_raw"].double().numpy(), batch["y_mask"].numpy()
        if collect is not None:
            collect.update(p_np, y_np, m_np, rows, cols)
        if aci is not None:
            aci.update(start, rows, cols, p_np, y_np, m_np)
        elif iacc is not None:
            lower, upper = cal.bounds(p_np, rows, cols)
            iacc.update(p_np, y_np, m_np, lower, upper, rows, cols)
        interval_seconds += time.perf_counter() - t0
    losses = (loss_sum / loss_n.clamp_min(1)).tolist()
    out = {"metrics": acc.result(), "task_losses": losses}
    if iacc is not None:
        t0 = time.perf_counter()
        if aci is not None:
            out["aci"] = aci.finish(iacc)
        out["intervals"] = iacc.result()
        out["cells"] = iacc.cell_table()
        out["interval_method"] = method
        interval_seconds += time.perf_counter() - t0
    out["interval_seconds"] = interval_seconds
    return out


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
