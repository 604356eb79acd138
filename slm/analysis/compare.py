"""SLM against the CLM baseline, from two finished pretrain runs (their stage.json and metrics.jsonl).

The question RHO-1 answers: how many tokens does selective training need to reach the loss that plain causal-LM
training ends at? Both runs log a held-out loss every `train.eval_every` steps on the same fixed sample of the
validation file (`train.eval_seed`, `slm.training.loop.heldout_sample`), so their curves are comparable point by
point; the target is the baseline's last eval point, and the crossing is interpolated linearly between SLM's points.
The whole-file `final_heldout_loss` of each run is reported beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

from slm.errors import SlmError
from slm.utils.io import read_json


def tokens_to_reach(curve: list[tuple[float, float]], target: float, lower_is_better: bool) -> float | None:
    """First crossing of `target` on the curve, linearly interpolated between points; None if never."""
    ok = (lambda y: y <= target) if lower_is_better else (lambda y: y >= target)
    for i, (x, y) in enumerate(curve):
        if ok(y):
            if i == 0:
                return float(x)
            x0, y0 = curve[i - 1]
            return float(x0 + (target - y0) * (x - x0) / (y - y0)) if y != y0 else float(x)
    return None


def finished_record(run_dir: str | Path, kind: str, role: str) -> dict:
    """stage.json of a complete `kind` run in `run_dir`, or a one-line error naming what is missing."""
    path = Path(run_dir) / "stage.json"
    if not path.is_file():
        raise SlmError(f"{role} {str(run_dir)!r}: no stage.json; run its {kind} stage first")
    record = read_json(path)
    if record.get("status") != "complete" or record.get("kind") != kind:
        raise SlmError(
            f"{role} {str(run_dir)!r}: expected a complete {kind} run, found "
            f"{record.get('kind')!r} with status {record.get('status')!r}"
        )
    return record


def run_summary(run_dir: str | Path, role: str) -> dict:
    """One pretrain run: its selection, budget, final whole-file held-out loss and the eval-point curve."""
    from slm.training.loop import learning_curve
    from slm.training.metrics import read_metrics

    record = finished_record(run_dir, "pretrain", role)
    metrics_file = Path(run_dir) / "metrics.jsonl"
    if not metrics_file.is_file():
        raise SlmError(f"{role} {str(run_dir)!r}: no metrics.jsonl")
    curve = learning_curve(read_metrics(metrics_file))
    if not curve:
        raise SlmError(f"{role} {str(run_dir)!r}: metrics.jsonl has no held-out loss; give the run a validation corpus")
    m, cfg = record.get("metrics", {}), record.get("config", {})
    return {
        "run": str(run_dir),
        "backbone": cfg.get("model", {}).get("backbone"),
        "selection": cfg.get("selection"),
        "steps": m.get("steps"),
        "tokens_seen": m.get("tokens_seen"),
        "final_heldout_loss": m.get("final_heldout_loss"),
        "final_heldout_rows": m.get("final_heldout_rows"),
        "final_heldout_tokens": m.get("final_heldout_tokens"),
        "eval_sample_rows": m.get("eval_sample_rows"),
        "last_eval_loss": curve[-1][1],
        "kept_fraction": m.get("kept_fraction"),
        "curve": curve,
    }


def eval_summary(eval_dir: str | Path, label: str) -> dict:
    """The figures of a finished eval stage (held-out loss with its rows and tokens, domain accuracy)."""
    m = finished_record(eval_dir, "eval", f"evals.{label}").get("metrics", {})
    keys = ("heldout_loss", "heldout_rows", "heldout_tokens", "domain_accuracy")
    return {"run": str(eval_dir), **{k: m[k] for k in keys if m.get(k) is not None}}


def compare_runs(slm_dir: str | Path, clm_dir: str | Path, evals: dict[str, str] | None = None) -> dict:
    """The comparison (JSON-ready): both runs, equal-budget check, SLM's tokens to CLM's final eval-point loss."""
    slm, clm = run_summary(slm_dir, "slm"), run_summary(clm_dir, "clm")
    target = clm["last_eval_loss"]
    reach = tokens_to_reach(slm["curve"], target, lower_is_better=True)
    budget = clm["tokens_seen"]
    final = (slm["final_heldout_loss"], clm["final_heldout_loss"])
    return {
        "slm": slm,
        "clm": clm,
        "equal_budget": slm["tokens_seen"] == clm["tokens_seen"],
        "target_loss": target,
        "slm_tokens_to_clm_final": reach,
        "slm_token_ratio": reach / budget if reach is not None and budget else None,
        "final_heldout_loss_delta": (
            final[0] - final[1] if None not in final and all(map(math.isfinite, final)) else None
        ),
        "evals": {label: eval_summary(d, label) for label, d in (evals or {}).items()},
    }


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def comparison_markdown(c: dict) -> str:
    """The comparison as a short Markdown report (tables and one sentence of verdict)."""
    s, b = c["slm"], c["clm"]
    sel = s.get("selection") or {}
    lines = [
        "# SLM vs CLM",
        "",
        f"SLM: `{s['run']}` (selection mode {sel.get('mode')}, ratio {sel.get('ratio')}); CLM: `{b['run']}`.",
        "",
        "| | SLM | CLM |",
        "| --- | --- | --- |",
        f"| tokens seen | {s['tokens_seen']} | {b['tokens_seen']} |",
        f"| final held-out loss (whole validation file) | {_fmt(s['final_heldout_loss'])} | "
        f"{_fmt(b['final_heldout_loss'])} |",
        f"| held-out rows / tokens | {s['final_heldout_rows']} / {s['final_heldout_tokens']} | "
        f"{b['final_heldout_rows']} / {b['final_heldout_tokens']} |",
        f"| last eval-point loss (sample of {b['eval_sample_rows']} rows) | {_fmt(s['last_eval_loss'])} | "
        f"{_fmt(b['last_eval_loss'])} |",
        "",
    ]
    if not c["equal_budget"]:
        lines += ["**The two runs saw different numbers of tokens: the comparison is not at equal budget.**", ""]
    if c["slm_tokens_to_clm_final"] is None:
        lines.append(f"SLM did not reach CLM's final eval-point loss {_fmt(c['target_loss'])} within its budget.")
    else:
        lines.append(
            f"SLM reached CLM's final eval-point loss {_fmt(c['target_loss'])} after "
            f"{c['slm_tokens_to_clm_final']:.0f} tokens, {c['slm_token_ratio']:.2f}x CLM's {b['tokens_seen']} "
            "(first crossing, interpolated linearly between eval points)."
        )
    if c["evals"]:
        lines += ["", "| eval | held-out loss | rows | tokens | domain accuracy |", "| --- | --- | --- | --- | --- |"]
        for label, e in c["evals"].items():
            lines.append(
                f"| {label} | {_fmt(e.get('heldout_loss'))} | {_fmt(e.get('heldout_rows'))} | "
                f"{_fmt(e.get('heldout_tokens'))} | {_fmt(e.get('domain_accuracy'))} |"
            )
    return "\n".join(lines) + "\n"
