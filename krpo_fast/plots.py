"""PNG plots of a run's reward and accuracy curves from its metrics rows."""

from __future__ import annotations

import os
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
        values = [r[key] for r in rows]
        ax.plot(steps, values, marker=".", linewidth=0.5, alpha=0.5, label="per step")
        # Per-step values swing with the sampled prompts; the running mean shows the trend.
        window = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
            for i in range(len(values))
        ]
        ax.plot(steps, smooth, linewidth=2, label=f"mean of last {window}")
        ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(output_dir) / f"{key.split('_')[0]}.png"
        # Through a temporary file: a kill mid-write never leaves a torn plot.
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written
