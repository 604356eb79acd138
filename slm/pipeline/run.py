"""`slm run`: the stages of a pipeline YAML in order, each skipped when its output is whole, its config
unchanged and no stage it read was rebuilt since (each stage checks that itself: `slm.stages.reads`), continued
when it crashed, redone with --force or --from; then a summary table and every key figure in full."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slm.errors import SlmError
from slm.pipeline.load import load_pipeline
from slm.stages.common import STAGE_FILE, console
from slm.stages.registry import STAGES, stage_runner


def run_pipeline(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> list[dict]:
    pipeline, stages, path = load_pipeline(path, overrides)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise SlmError(f"--from {from_stage!r}: no such stage in {path}; stages are {names}")
    redo_from = names.index(from_stage) if from_stage else (0 if force else len(names))
    console.print(f"[bold]slm run[/] {pipeline.name}: {len(stages)} stages, work_dir={pipeline.work_dir}")
    summary = []
    for i, stage in enumerate(stages):
        out_dir = Path(stage.cfg.out_dir)
        before = _file_version(out_dir / STAGE_FILE)
        console.rule(f"[bold]{stage.name}[/] ({stage.kind})")
        started = time.time()
        record = stage_runner(stage.kind)(stage.cfg, force=i >= redo_from)
        status = record.get("status", "complete")
        summary.append(
            {
                "stage": stage.name,
                "kind": stage.kind,
                # skipped: the stage.json it returned is the one that was there (a stage may redo a finished run
                # whose inputs changed, and writes a new one)
                "status": "skipped"
                if status == "complete" and before and before == _file_version(out_dir / STAGE_FILE)
                else status,
                "seconds": round(time.time() - started, 1),
                "output": str(out_dir),
                "metrics": record.get("metrics", {}),
            }
        )
        if status != "complete":
            break
    print_summary(summary, pipeline.work_dir)
    return summary


def _file_version(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when absent: stage.json is replaced atomically whenever a stage finishes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _metric(metrics: dict, key: str):
    for part in key.split("."):
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics


def format_figure(value) -> str:
    """A figure in full: integers with every digit, other numbers to 6 significant digits (never cut)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def key_results(kind: str, metrics: dict) -> list[str]:
    """`name=value (rows=R, tokens=T)` for each key figure of a stage that it reported."""
    lines = []
    for key, covers in STAGES[kind].key_figures if kind in STAGES else ():  # declared by each stage kind
        value = _metric(metrics, key)
        if value is None:
            continue
        named = [f"{c.rsplit('_', 1)[-1]}={format_figure(_metric(metrics, c))}" for c in covers if c in metrics]
        lines.append(f"{key}={format_figure(value)}" + (f" ({', '.join(named)})" if named else ""))
    return lines


def short_path(path: str, root: str | None, keep: int = 48) -> str:
    """`path` relative to `root` (the work_dir) when inside it; else, when long, `…/` and its last parts."""
    p = Path(path)
    if root is not None:
        try:
            return str(p.relative_to(root)) or "."
        except ValueError:
            pass
    if len(path) <= keep:
        return path
    tail = p.name
    for part in reversed(p.parent.parts):
        if len(tail) + len(part) + 3 > keep:
            break
        tail = f"{part}/{tail}"
    return f"…/{tail}"


def print_summary(summary: list[dict], work_dir: str | None = None, out: Console | None = None) -> None:
    """The stages with status, time and output (paths relative to work_dir), then every key figure in full.

    The figures are printed as lines under the table, never in a cell: a narrow terminal wraps them, it cannot cut
    them (a table column would shorten `final_heldout_loss=5.142` to `final_heldou…`)."""
    out = out or console
    title = "slm run: summary" + (f" (outputs under {work_dir})" if work_dir else "")
    table = Table(title=title)
    for col in ("stage", "kind", "status", "seconds", "output"):
        table.add_column(col, overflow="fold")
    for row in summary:
        table.add_row(
            row["stage"], row["kind"], row["status"], str(row["seconds"]), short_path(row["output"], work_dir)
        )
    out.print(table)
    for row in summary:
        for line in key_results(row["kind"], row["metrics"]):
            out.print(f"{row['stage']}: {line}", soft_wrap=True, highlight=False, markup=False)
