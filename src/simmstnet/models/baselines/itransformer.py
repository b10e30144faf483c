"""iTransformer baseline (Liu et al., "iTransformer: inverted Transformers are effective for time
series forecasting", ICLR 2024).

Inverted: each variate's whole input series is one token (a linear map of its L steps), a
Transformer encoder attends across variates, and a linear head maps each token to its H future
steps. As in the reference implementation (thuml/iTransformer):

- series stationarization ("use_norm"): each variate's window is centred and divided by its
  standard deviation before embedding, and the forecast is mapped back with the same statistics;
- the calendar features are extra variate tokens (their L values each), read but not forecast;
- encoder-only: full self-attention + GELU feed-forward, post-LayerNorm, final LayerNorm.

Variates here. By default the tokens are the C services of the target cell (plus the F
calendar tokens), so the model is purely temporal as in the paper's Table 1 ("limited to
temporal modelling"); with C = 1 the attention has one series token and the calendar tokens to
attend to. ``neighbours=True`` adds the k x k - 1 neighbouring cells of the patch, per service,
as further variate tokens (read, not forecast): an iTransformer that sees space through
attention across neighbouring series. It is off by default to keep the paper's baseline.

Adapted for missing data: a token is [normalized values, observed flags] (2L numbers) rather
than L values, the normalization statistics use observed steps only, and unobserved steps
(and cells outside the grid) enter as 0 with flag 0.

Defaults (reference in brackets: thuml/iTransformer ``run.py`` argparse): enc_layers 2 [2],
n_heads 8 [8], dropout 0.1 [0.1], use_norm on [on]; widths reduced for CPU: d_model 64 [512],
d_ff 256 [2048], keeping the 4:1 ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.baselines._temporal import check_batch, check_dims, check_options
from simmstnet.models.layers.encoder import Encoder
from simmstnet.models.norm import window_stats
from simmstnet.models.registry import DataDims, register_model

# Added to the variance before the square root, as the reference does: a flat window does not
# divide by zero.
NORM_EPS = 1e-5


@dataclass
class ITransformerConfig:
    """Options of the iTransformer baseline (set via ``model.<field>=...``)."""

    d_model: int = field(default=64, metadata={"help": "token width (reference 512, reduced for CPU)"})
    n_heads: int = field(default=8, metadata={"help": "attention heads, must divide d_model (reference 8)"})
    enc_layers: int = field(default=2, metadata={"help": "encoder layers (reference 2)"})
    d_ff: int = field(default=256, metadata={"help": "feed-forward width (reference 2048, reduced for CPU)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability in training (reference 0.1)"})
    use_norm: bool = field(default=True, metadata={"help": "normalize each variate's window and map the forecast "
                                                           "back (reference: on)"})
    marks_as_tokens: bool = field(default=True, metadata={"help": "calendar features as extra variate tokens "
                                                                  "(reference: on)"})
    neighbours: bool = field(default=False, metadata={"help": "add the k x k - 1 neighbouring cells of every "
                                                              "service as variate tokens (off: temporal only)"})


def masked_stats(values: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over observed steps (values, observed: (B, N, L) -> (B, N, 1));
    a token with nothing observed gets mean 0 (the training mean) and std sqrt(NORM_EPS). The
    reference's form of :func:`simmstnet.models.norm.window_stats` (eps added to the variance,
    no floor)."""
    return window_stats(values, observed, dim=-1, floor=0.0, eps=NORM_EPS)


@register_model("itransformer", multitask=False, config=ITransformerConfig,
                description="iTransformer: inverted Transformer, one token per variate (services; "
                            "optionally neighbour cells)")
class ITransformerForecaster(nn.Module):
    """Encoder over variate tokens; forecasts the C services of the centre cell."""

    config_class = ITransformerConfig

    def __init__(self, dims: DataDims, config: ITransformerConfig | None = None):
        super().__init__()
        cfg = config or ITransformerConfig()
        check_options("itransformer", cfg, ("d_model", "n_heads", "enc_layers", "d_ff"))
        check_dims("itransformer", dims)
        if cfg.neighbours and (dims.patch < 3 or dims.patch % 2 == 0):
            raise UserError(f"model 'itransformer' option neighbours needs an odd data.patch >= 3, "
                            f"got patch={dims.patch}")
        self.dims, self.config = dims, cfg
        # One shared embedding for every token: [L values, L observed flags] -> d_model.
        self.embedding = nn.Linear(2 * dims.input_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg.enc_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, "full", dropout=cfg.dropout)
        self.head = nn.Linear(cfg.d_model, dims.horizon)

    def _series_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and observed flags of the series tokens: (B, N, L) each, the C centre series
        first, then (with ``neighbours``) the C * (k*k - 1) neighbouring cells."""
        x, x_mask = batch["x"], batch["x_mask"].to(batch["x"].dtype)
        values, observed = [x.transpose(1, 2)], [x_mask.transpose(1, 2)]
        if self.config.neighbours:
            k, (b, l, c) = self.dims.patch, x.shape
            if tuple(batch["x_patch"].shape[1:]) != (l, c, k, k):
                raise UserError(f"model 'itransformer': batch x_patch has shape {tuple(batch['x_patch'].shape)}, "
                                f"the model was built for (B, {l}, {c}, {k}, {k}) (patch={k})")
            keep = torch.arange(k * k, device=x.device) != (k * k) // 2  # every cell but the centre
            patch = batch["x_patch"].reshape(b, l, c, k * k)[..., keep]
            flags = batch["patch_mask"].reshape(b, l, c, k * k)[..., keep].to(x.dtype)
            values.append(patch.permute(0, 2, 3, 1).reshape(b, -1, l))
            observed.append(flags.permute(0, 2, 3, 1).reshape(b, -1, l))
        return torch.cat(values, dim=1), torch.cat(observed, dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_mark: (B, L, F); with ``neighbours`` also x_patch, patch_mask
        (B, L, C, k, k) -> (B, H, C) scaled forecasts.

        Tokens: N = C (+ C*(k*k-1) neighbours) series, then F calendar tokens; (B, N+F, d)."""
        check_batch("itransformer", self.dims, batch)
        c = self.dims.n_services
        values, observed = self._series_tokens(batch)                   # (B, N, L)
        if self.config.use_norm:
            mean, std = masked_stats(values, observed)
            values = (values - mean) / std * observed                   # unobserved stay 0
        tokens = torch.cat([values, observed], dim=-1)                  # (B, N, 2L)
        if self.config.marks_as_tokens and self.dims.n_marks > 0:
            marks = batch["x_mark"].transpose(1, 2)                     # (B, F, L), always known
            tokens = torch.cat([tokens, torch.cat([marks, torch.ones_like(marks)], dim=-1)], dim=1)
        h = self.encoder(self.dropout(self.embedding(tokens)))          # (B, N+F, d)
        out = self.head(h[:, :c])                                       # (B, C, H): centre cell only
        if self.config.use_norm:
            out = out * std[:, :c] + mean[:, :c]
        return out.transpose(1, 2)
