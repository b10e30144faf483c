"""Evaluation: masked metrics (``metrics``), running models over windows (``forecast``) and
figures (``plots``). Submodules are imported where used."""
