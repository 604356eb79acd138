"""Aggregating per-sample scores into RULER tables, and the plots (matplotlib, Agg canvas)."""

from __future__ import annotations

import math
from pathlib import Path

from slm.evaluation.ruler.scoring import mean, summarize


def fmt_length(n: int) -> str:
    """4096 -> '4K', 131072 -> '128K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def depth_key(depth: float | None) -> str:
    return "all" if depth is None else f"{depth:g}"


def aggregate(
    rows: list[dict], tasks: list[str], lengths: list[int], ci: str = "wilson", confidence: float = 0.95
) -> dict:
    """rows: one per sample with task, length, depth, score (0..1), metric.

    Returns {"scores": {task: {length: {score, ci_low, ci_high, n, metric, by_depth}}},
    "average": {length: mean over tasks of the task score}} with lengths as strings (JSON keys).
    """
    scores: dict[str, dict[str, dict]] = {}
    for task in tasks:
        scores[task] = {}
        for length in lengths:
            mine = [r for r in rows if r["task"] == task and r["length"] == length]
            entry = summarize([r["score"] for r in mine], ci, confidence)
            entry["metric"] = mine[0]["metric"] if mine else None
            by_depth: dict[str, list[float]] = {}
            for r in mine:
                by_depth.setdefault(depth_key(r["depth"]), []).append(r["score"])
            entry["by_depth"] = {
                d: 100 * mean(v) for d, v in sorted(by_depth.items(), key=lambda kv: _depth_order(kv[0]))
            }
            scores[task][str(length)] = entry
    average = {str(L): mean(scores[t][str(L)]["score"] for t in tasks) for L in lengths}
    return {"scores": scores, "average": average}


def _depth_order(key: str) -> float:
    return -1.0 if key == "all" else float(key)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    from slm.utils.plots import save_png

    save_png(fig, path, dpi=fig.dpi, bbox_inches="tight")


def plot_heatmap(task: str, task_scores: dict[str, dict], lengths: list[int], path: str | Path) -> Path:
    """Depth (rows) x length (columns) heatmap of one task's scores, annotated, 0..100."""
    import numpy as np

    depth_keys = sorted({d for L in lengths for d in task_scores[str(L)]["by_depth"]}, key=_depth_order) or ["all"]
    grid = np.full((len(depth_keys), len(lengths)), np.nan)
    for j, L in enumerate(lengths):
        for i, d in enumerate(depth_keys):
            v = task_scores[str(L)]["by_depth"].get(d)
            if v is not None:
                grid[i, j] = v
    fig = _figure(1.1 + 0.8 * len(lengths), 1.0 + 0.45 * len(depth_keys))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [fmt_length(L) for L in lengths])
    ax.set_yticks(range(len(depth_keys)), [d if d == "all" else f"{100 * float(d):.0f}%" for d in depth_keys])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    overall = ", ".join(f"{fmt_length(L)} {task_scores[str(L)]['score']:.0f}" for L in lengths)
    ax.set_title(f"{task}  (mean: {overall})", fontsize=9)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05, label="score")
    path = Path(path)
    _save(fig, path)
    return path


def plot_average(average: dict[str, float], lengths: list[int], effective: dict, path: str | Path) -> Path:
    """Task-averaged score per length with the threshold and the effective length marked."""
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ys = [average[str(L)] for L in lengths]
    ax.plot(range(len(lengths)), ys, marker="o", label="average")
    ax.axhline(effective["threshold"], color="gray", linestyle="--", label=f"threshold {effective['threshold']:.1f}")
    if effective["length"] is not None:
        ax.axvline(
            lengths.index(effective["length"]),
            color="green",
            linestyle=":",
            label=f"effective {fmt_length(effective['length'])}",
        )
    ax.set_xticks(range(len(lengths)), [fmt_length(L) for L in lengths])
    ax.set_ylim(0, 100)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (average over tasks)")
    ax.legend(fontsize=8)
    path = Path(path)
    _save(fig, path)
    return path


def summary_table(results: dict) -> str:
    """Plain-text table of a results dict: tasks x lengths, the average, the effective length."""
    lengths = results["lengths"]
    width = max([len("average")] + [len(t) for t in results["tasks"]])
    head = " " * width + "".join(f"{fmt_length(L):>9}" for L in lengths)
    lines = [head]
    for task in results["tasks"]:
        lines.append(f"{task:<{width}}" + "".join(f"{results['scores'][task][str(L)]['score']:9.1f}" for L in lengths))
    lines.append(f"{'average':<{width}}" + "".join(f"{results['average'][str(L)]:9.1f}" for L in lengths))
    eff = results["effective_length"]
    what = f"{eff['threshold']:.1f}" + (
        f" (= {eff['relative_threshold']:g} x shortest)" if eff["kind"] == "relative" else ""
    )
    got = fmt_length(eff["length"]) if eff["length"] is not None else "none (the shortest length is already below)"
    lines.append(f"effective length at threshold {what}: {got}")
    return "\n".join(lines)
