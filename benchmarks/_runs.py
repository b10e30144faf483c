"""What the benchmark scripts share: one training run per folder, reused when finished."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def run_one(folder: Path, overrides: list[str]) -> dict:
    """metrics.json of the run in ``folder``: read when it exists, else train it (a folder left by
    a killed run is started again) with the dotted ``overrides`` plus ``out=folder``."""
    from simmstnet.config import load_config
    from simmstnet.train.trainer import Trainer

    if (folder / "metrics.json").exists():
        return json.loads((folder / "metrics.json").read_text())
    if folder.exists():
        shutil.rmtree(folder)
    cfg = load_config(None, [*overrides, f"out={folder}"])
    return Trainer(cfg, progress=False, quiet=True).run()
