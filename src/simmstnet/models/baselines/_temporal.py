"""Pieces shared by the temporal single-task baselines (lstm, transformer, informer, itransformer).

Not a model module: the leading underscore keeps the registry from importing it as one.

Services: LSTM, Transformer and Informer forecast each service as its own univariate series with
weights shared across services ("channel independence"): the service axis is folded into the
batch. With one service (the paper's Table 1 setting, Net only) this is exactly the univariate
model; with several it neither crashes nor mixes services, which is what a single-task baseline
should do. iTransformer instead reads services as tokens (see its module).
"""
from __future__ import annotations

import torch

from simmstnet.errors import UserError
from simmstnet.models.registry import DataDims


def check_options(model: str, cfg, positive: tuple[str, ...], dropout: str = "dropout") -> None:
    """UserError naming the first option of ``cfg`` that is out of range."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"model {model!r} option {name} must be at least 1, got {getattr(cfg, name)}")
    if hasattr(cfg, "n_heads") and hasattr(cfg, "d_model") and cfg.d_model % cfg.n_heads:
        raise UserError(f"model {model!r} option d_model={cfg.d_model} must be divisible by "
                        f"n_heads={cfg.n_heads}")
    value = getattr(cfg, dropout, 0.0)
    if not 0.0 <= value < 1.0:
        raise UserError(f"model {model!r} option {dropout} must be in [0, 1), got {value}")


def check_dims(model: str, dims: DataDims) -> None:
    if dims.n_services < 1 or dims.input_len < 1 or dims.horizon < 1 or dims.label_len < 0:
        raise UserError(f"data sizes do not fit model {model!r}: {dims}")
    if dims.label_len > dims.input_len:
        raise UserError(f"model {model!r}: label_len={dims.label_len} exceeds input_len={dims.input_len}")


def check_batch(model: str, dims: DataDims, batch: dict, decoder: bool = False) -> None:
    """UserError when the batch's x (and dec_in when ``decoder``) do not match ``dims``."""
    x = batch["x"]
    if x.dim() != 3 or tuple(x.shape[1:]) != (dims.input_len, dims.n_services):
        raise UserError(f"model {model!r}: batch x has shape {tuple(x.shape)}, the model was built for "
                        f"(B, {dims.input_len}, {dims.n_services}) (input_len, services)")
    if decoder:
        s = dims.label_len + dims.horizon
        if tuple(batch["dec_in"].shape[1:]) != (s, dims.n_services):
            raise UserError(f"model {model!r}: batch dec_in has shape {tuple(batch['dec_in'].shape)}, the "
                            f"model was built for (B, {s}, {dims.n_services}) (label_len + horizon, services)")


def fold_services(series: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B*C, T); row b*C + c is service c of window b."""
    b, t, c = series.shape
    return series.transpose(1, 2).reshape(b * c, t)


def unfold_services(series: torch.Tensor, n_services: int) -> torch.Tensor:
    """(B*C, T) -> (B, T, C), the inverse of :func:`fold_services`."""
    return series.view(-1, n_services, series.shape[-1]).transpose(1, 2)


def repeat_marks(marks: torch.Tensor, n_services: int) -> torch.Tensor:
    """Calendar marks (B, T, F) -> (B*C, T, F), aligned with :func:`fold_services` rows."""
    return marks.repeat_interleave(n_services, dim=0)


def encoder_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-service encoder input and marks: ((B*C, L, 2) [value, observed flag], (B*C, L, F)).

    The observed flag lets the model tell a missing step (value 0) from a true 0 (the training
    mean under standard scaling)."""
    x, x_mask = batch["x"], batch["x_mask"].to(batch["x"].dtype)
    c = x.shape[-1]
    values = torch.stack([fold_services(x), fold_services(x_mask)], dim=-1)
    return values, repeat_marks(batch["x_mark"], c)


def decoder_inputs(batch: dict, dims: DataDims) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-service decoder input and marks: ((B*C, S, 2) [value, known flag], (B*C, S, F)).

    The known flag is the observed flag on the label part and 0 on the horizon (the zeros that
    stand in for the unknown future, Informer's generative-style decoder input)."""
    x, x_mask, dec_in = batch["x"], batch["x_mask"].to(batch["x"].dtype), batch["dec_in"]
    b, c = x.shape[0], x.shape[-1]
    known = torch.cat([x_mask[:, dims.input_len - dims.label_len:], x.new_zeros(b, dims.horizon, c)], dim=1)
    values = torch.stack([fold_services(dec_in), fold_services(known)], dim=-1)
    return values, repeat_marks(batch["y_mark"], c)
