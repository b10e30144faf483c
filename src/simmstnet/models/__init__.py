"""Forecasting models: Sim-MSTNet (``sim_mstnet``), shared layers (``layers``), baselines
(``baselines``, one file each) and the name registry (``registry``).

Registry lookups import the model modules on first use, so ``build_model("last-value", dims)``
works for any baseline file present in ``simmstnet/models/baselines/``.
"""
from simmstnet.models.registry import DataDims, build_model, list_models, register_model

__all__ = ["DataDims", "build_model", "list_models", "register_model"]
