"""Plots people would rather see than read (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slm.utils.io import atomic_write_bytes  # noqa: E402


def save_png(fig, path: str | Path, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write `fig` as a PNG atomically (rendered in memory, then temp file and rename) and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_learning_curves(
    runs: dict[str, list[dict]], path: str | Path, key: str = "heldout_loss", ylabel: str = "held-out loss"
) -> Path:
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
    return save_png(fig, path)
