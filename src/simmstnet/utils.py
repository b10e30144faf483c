"""Small shared helpers: atomic writes, seeding, step parsing."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from simmstnet.errors import UserError

_STEP_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_step(text: str | int) -> int:
    """Parse a time step such as ``10min``, ``1h``, ``30s``, ``1d`` (or seconds as int) to seconds."""
    if isinstance(text, (int,)) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"step must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _STEP_UNITS:
        raise UserError(f"cannot read step {text!r}: use a number and a unit, e.g. 10min, 1h, 30s, 1d")
    seconds = int(m.group(1)) * _STEP_UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise UserError(f"step must be positive, got {text!r}")
    return seconds


def format_step(seconds: int) -> str:
    """Inverse of :func:`parse_step` for display: 600 -> '10min', 3600 -> '1h'."""
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or a user error half-way leaves no half-written output behind.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes[-1:]),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the output the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # torch is a dependency, but keep the data layer usable without it
        pass
