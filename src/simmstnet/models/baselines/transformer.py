"""Vanilla Transformer baseline (Vaswani et al. 2017), as used for time series forecasting.

Follows the "Transformer" of the Time-Series-Library (thuml), which is also the Transformer
baseline of the Informer paper: an encoder-decoder with canonical (full) attention everywhere,

- embedding: [value, observed flag] through a width-3 convolution + calendar features (linear)
  + sinusoidal positions (shared :class:`~simmstnet.models.layers.embeddings.DataEmbedding`);
- encoder: ``enc_layers`` layers of full self-attention + GELU feed-forward, post-LayerNorm;
- decoder: input = the last ``label_len`` known values then zeros for the horizon (one-shot
  "start token" decoding, no autoregressive loop), causal full self-attention, full
  cross-attention onto the encoder output, linear head; the last H steps are the forecast.

Services are independent univariate series with shared weights (see ``_temporal``); the model
never reads the neighbourhood patch.

Defaults (reference in brackets: Time-Series-Library argparse defaults): enc_layers 2 [2],
dec_layers 1 [1], n_heads 8 [8], dropout 0.1 [0.1]; widths reduced for CPU: d_model 64 [512],
d_ff 256 [2048], keeping the reference's 4:1 ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.models.baselines._temporal import check_batch, check_dims, check_options, decoder_inputs, \
    encoder_inputs, unfold_services
from simmstnet.models.layers.decoder import Decoder
from simmstnet.models.layers.embeddings import DataEmbedding
from simmstnet.models.layers.encoder import Encoder
from simmstnet.models.registry import DataDims, register_model


@dataclass
class TransformerConfig:
    """Options of the vanilla Transformer baseline (set via ``model.<field>=...``)."""

    d_model: int = field(default=64, metadata={"help": "model width (reference 512, reduced for CPU)"})
    n_heads: int = field(default=8, metadata={"help": "attention heads, must divide d_model (reference 8)"})
    enc_layers: int = field(default=2, metadata={"help": "encoder layers (reference 2)"})
    dec_layers: int = field(default=1, metadata={"help": "decoder layers (reference 1)"})
    d_ff: int = field(default=256, metadata={"help": "feed-forward width (reference 2048, reduced for CPU)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability in training (reference 0.1)"})


@register_model("transformer", multitask=False, config=TransformerConfig,
                description="Transformer: vanilla encoder-decoder with full attention (temporal only)")
class TransformerForecaster(nn.Module):
    """Encoder-decoder Transformer with full attention, one univariate series per service."""

    config_class = TransformerConfig

    def __init__(self, dims: DataDims, config: TransformerConfig | None = None):
        super().__init__()
        cfg = config or TransformerConfig()
        check_options("transformer", cfg, ("d_model", "n_heads", "enc_layers", "dec_layers", "d_ff"))
        check_dims("transformer", dims)
        self.dims, self.config = dims, cfg
        d = cfg.d_model
        self.enc_embedding = DataEmbedding(2, dims.n_marks, d, dims.input_len, cfg.dropout)
        self.encoder = Encoder(cfg.enc_layers, d, cfg.n_heads, cfg.d_ff, "full", dropout=cfg.dropout)
        self.dec_embedding = DataEmbedding(2, dims.n_marks, d, dims.label_len + dims.horizon, cfg.dropout)
        # cross_attn="full": the shared decoder's self-attention is already full and causal.
        self.decoder = Decoder(cfg.dec_layers, d, cfg.n_heads, cfg.d_ff, cross_attn="full", dropout=cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_mark: (B, L, F); dec_in: (B, S, C); y_mark: (B, S, F)
        -> (B, H, C) scaled forecasts (S = label_len + H)."""
        check_batch("transformer", self.dims, batch, decoder=True)
        enc_values, enc_marks = encoder_inputs(batch)
        memory = self.encoder(self.enc_embedding(enc_values, enc_marks))      # (B*C, L, d)
        dec_values, dec_marks = decoder_inputs(batch, self.dims)
        out = self.decoder(self.dec_embedding(dec_values, dec_marks), memory)  # (B*C, S)
        return unfold_services(out[:, -self.dims.horizon:], self.dims.n_services)
