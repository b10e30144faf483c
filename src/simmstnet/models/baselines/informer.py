"""Informer baseline (Zhou et al., "Informer: beyond efficient Transformer for long sequence
time-series forecasting", AAAI 2021).

The three ideas of the paper, built from the shared layers:

- ProbSparse self-attention in the encoder (:mod:`simmstnet.models.layers.attention`): only the
  ``factor * ceil(ln L)`` most active queries get full attention, the others the mean value;
- self-attention distilling between encoder layers (conv, norm, ELU, stride-2 max-pool), so
  each layer sees half the steps of the previous one;
- generative-style decoder: its input is the last ``label_len`` known values followed by zeros
  for the horizon, decoded in one forward pass (no step-by-step roll-out); masked self-attention,
  then cross-attention onto the encoder output, linear head; the last H steps are the forecast.

As in the reference implementation (zhouhaoyi/Informer2020), the decoder's masked
self-attention is ProbSparse too (``attn`` switches encoder and decoder self-attention together)
and its cross-attention is full. The shared decoder layer has dense self-attention and a
configurable cross-attention (Sim-MSTNet's choice), so its self-attention kernel is swapped for
a causal ProbSparse one here rather than writing a second decoder.

Adapted: [value, observed flag] are embedded together (missing steps are marked, not invented);
the distilling step normalizes with LayerNorm instead of BatchNorm (see
:class:`~simmstnet.models.layers.encoder.DistilLayer`); the reference's head "mix" reshuffle of
the decoder self-attention output is not reproduced. Services are independent univariate series
with shared weights (see ``_temporal``); the model never reads the neighbourhood patch.

Defaults (reference in brackets: Informer2020 ``main_informer.py``): enc_layers 2 [2],
dec_layers 1 [1], n_heads 8 [8], factor 5 [5], dropout 0.05 [0.05], distil on [on], attn prob
[prob]; widths reduced for CPU: d_model 64 [512], d_ff 256 [2048], keeping the 4:1 ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.baselines._temporal import check_batch, check_dims, check_options, decoder_inputs, \
    encoder_inputs, unfold_services
from simmstnet.models.layers.attention import FullAttention, ProbSparseAttention, set_prob_measure
from simmstnet.models.layers.decoder import Decoder
from simmstnet.models.layers.embeddings import DataEmbedding
from simmstnet.models.layers.encoder import Encoder
from simmstnet.models.registry import DataDims, register_model


@dataclass
class InformerConfig:
    """Options of the Informer baseline (set via ``model.<field>=...``)."""

    d_model: int = field(default=64, metadata={"help": "model width (Informer2020 default 512, reduced for CPU)"})
    n_heads: int = field(default=8, metadata={"help": "attention heads, must divide d_model (Informer2020: 8)"})
    enc_layers: int = field(default=2, metadata={"help": "encoder layers (Informer2020: 2)"})
    dec_layers: int = field(default=1, metadata={"help": "decoder layers (Informer2020: 1)"})
    d_ff: int = field(default=256, metadata={"help": "feed-forward width (Informer2020 default 2048, reduced for CPU)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout probability in training (Informer2020: 0.05)"})
    attn: str = field(default="prob", metadata={"help": "encoder and decoder self-attention: prob (ProbSparse) "
                                                        "or full (Informer2020: prob)"})
    factor: int = field(default=5, metadata={"help": "ProbSparse sampling factor c, u = c * ceil(ln L) "
                                                     "(Informer2020: 5)"})
    distil: bool = field(default=True, metadata={"help": "self-attention distilling: halve the steps between "
                                                         "encoder layers (Informer2020: on)"})
    seed: int = field(default=0, metadata={"help": "seed of the ProbSparse key sampling"})
    prob_measure: str = field(default="reference", metadata={
        "help": "ProbSparse query measure: reference (sampled scores' sum / L_K, as Informer2020's code) or "
                "sample-mean (/ number of sampled keys, the paper's formula)"})


@register_model("informer", multitask=False, config=InformerConfig,
                description="Informer: ProbSparse attention, distilling encoder, generative decoder (temporal only)")
class InformerForecaster(nn.Module):
    """Informer encoder-decoder, one univariate series per service."""

    config_class = InformerConfig

    def __init__(self, dims: DataDims, config: InformerConfig | None = None):
        super().__init__()
        cfg = config or InformerConfig()
        check_options("informer", cfg, ("d_model", "n_heads", "enc_layers", "dec_layers", "d_ff", "factor"))
        if cfg.attn not in ("prob", "full"):
            raise UserError(f"model 'informer' option attn must be 'prob' or 'full', got {cfg.attn!r}")
        check_dims("informer", dims)
        self.dims, self.config = dims, cfg
        d = cfg.d_model
        self.enc_embedding = DataEmbedding(2, dims.n_marks, d, dims.input_len, cfg.dropout)
        self.encoder = Encoder(cfg.enc_layers, d, cfg.n_heads, cfg.d_ff, cfg.attn, cfg.factor, cfg.dropout,
                               cfg.distil, cfg.seed)
        self.dec_embedding = DataEmbedding(2, dims.n_marks, d, dims.label_len + dims.horizon, cfg.dropout)
        self.decoder = Decoder(cfg.dec_layers, d, cfg.n_heads, cfg.d_ff, cross_attn="full", factor=cfg.factor,
                               dropout=cfg.dropout)
        for i, layer in enumerate(self.decoder.layers):
            # Kernels hold no weights: swapping one keeps the layer's projections as they are.
            layer.self_attention.kernel = (ProbSparseAttention(cfg.factor, cfg.dropout, cfg.seed + 100 + i)
                                           if cfg.attn == "prob" else FullAttention(cfg.dropout))
        set_prob_measure(self, cfg.prob_measure)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_mark: (B, L, F); dec_in: (B, S, C); y_mark: (B, S, F)
        -> (B, H, C) scaled forecasts (S = label_len + H)."""
        check_batch("informer", self.dims, batch, decoder=True)
        enc_values, enc_marks = encoder_inputs(batch)
        memory = self.encoder(self.enc_embedding(enc_values, enc_marks))      # (B*C, L', d), L' ~ L/2^(layers-1)
        dec_values, dec_marks = decoder_inputs(batch, self.dims)
        out = self.decoder(self.dec_embedding(dec_values, dec_marks), memory)  # (B*C, S)
        return unfold_services(out[:, -self.dims.horizon:], self.dims.n_services)
