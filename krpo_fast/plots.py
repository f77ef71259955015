"""PNG plots of a run's reward and accuracy curves from its metrics rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(rows: list[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Write reward.png and accuracy.png into ``output_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    written = []
    for key, label in (("reward_mean", "mean reward"), ("accuracy", "sampled accuracy")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r[key] for r in rows], marker=".", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(output_dir) / f"{key.split('_')[0]}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
