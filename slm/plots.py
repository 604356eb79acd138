"""Plots people would rather see than read (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_learning_curves(runs: dict[str, list[dict]], path: str | Path, key: str = "heldout_loss", ylabel: str = "held-out loss") -> Path:
    """One line per run: `key` against tokens seen."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in runs.items():
        pts = [(h["tokens"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
