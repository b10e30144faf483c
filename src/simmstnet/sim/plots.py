"""Pictures of one simulated scenario: mean maps per service, total time series, daily profiles."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmstnet.data.grid import TrafficGrid
from simmstnet.utils import atomic_path


def plot_scenario(grid: TrafficGrid, out_dir: str | Path, prefix: str = "sim") -> list[Path]:
    """Save ``{prefix}-overview.png`` in ``out_dir``: a (log) mean map per service, the grid total
    over the first two weeks (normalized per service) and the normalized daily profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    C = len(grid.services)
    vals = np.where(grid.mask, grid.values, np.nan)
    fig, ax = plt.subplots(1, C + 2, figsize=(3.2 * (C + 2), 3))
    for c, s in enumerate(grid.services):
        m = np.nanmean(vals[..., c], 0)
        im = ax[c].imshow(np.log10(np.maximum(m, 1e-6)), origin="lower", cmap="viridis")
        ax[c].set(title=f"{s}: log10 mean", xticks=[], yticks=[])
        fig.colorbar(im, ax=ax[c], fraction=0.046)
    local = pd.to_datetime(grid.timestamps, unit="s", utc=True).tz_convert(grid.timezone)
    n = min(len(local), 14 * 86400 // grid.step)
    hours = local.hour.to_numpy()
    for c, s in enumerate(grid.services):
        total = np.nansum(vals[..., c], (1, 2))
        ax[C].plot(local[:n].tz_localize(None), total[:n] / total.mean(), lw=0.8, label=s)
        prof = np.array([total[hours == h].mean() for h in range(24)])
        ax[C + 1].plot(prof / prof.mean(), "-o", ms=3, label=s)
    ax[C].set(title="grid total (first 2 weeks)")
    ax[C].tick_params(axis="x", labelrotation=45, labelsize=7)
    ax[C + 1].set(title="daily profile", xlabel="local hour")
    ax[C + 1].legend()
    p = grid.meta.get("preset", "?")
    fig.suptitle(f"simulated city: preset {p}, seed {grid.meta.get('seed')}, scenario {grid.meta.get('scenario')}",
                 fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{prefix}-overview.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=70, format="png")
    plt.close(fig)
    return [path]
