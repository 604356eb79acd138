"""`slm compare`: SLM against the CLM baseline from finished pretrain (and eval) runs; JSON, Markdown and a plot."""

from __future__ import annotations

import time
from pathlib import Path

from slm.analysis.compare import compare_runs, comparison_markdown
from slm.config import CompareConfig
from slm.stages.common import StageRun, config_fingerprint, console, locked_stage, say
from slm.utils.io import atomic_write_json, atomic_write_text
from slm.utils.plots import plot_learning_curves

KEY_FIGURES = ("equal_budget", "target_loss", "slm_tokens_to_clm_final", "slm_token_ratio", "final_heldout_loss_delta")


@locked_stage("compare")
def run(cfg: CompareConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("compare", cfg, out)
    if (done := stage.prepare(force)) is not None:  # redone when an input run was redone since (`prepare`)
        say(f"[green]compare[/]: {out} is complete for these runs; skipping (use --force to redo)")
        return done
    started = time.time()
    comparison = compare_runs(cfg.slm, cfg.clm, cfg.evals)
    if not comparison["equal_budget"]:
        say(
            f"[yellow]compare[/]: SLM saw {comparison['slm']['tokens_seen']} tokens and CLM "
            f"{comparison['clm']['tokens_seen']}: not an equal-budget comparison"
        )
    atomic_write_json(out / "comparison.json", comparison)
    report = comparison_markdown(comparison)
    atomic_write_text(out / "comparison.md", report)
    curves = {
        "SLM": [{"tokens": t, "heldout_loss": v} for t, v in comparison["slm"]["curve"]],
        "CLM": [{"tokens": t, "heldout_loss": v} for t, v in comparison["clm"]["curve"]],
    }
    plot_learning_curves(curves, out / "learning_curves.png", ylabel="held-out loss (eval-point sample)")
    console.print(report, markup=False, highlight=False)
    metrics = {k: comparison[k] for k in KEY_FIGURES}
    metrics["slm_final_heldout_loss"] = comparison["slm"]["final_heldout_loss"]
    metrics["clm_final_heldout_loss"] = comparison["clm"]["final_heldout_loss"]
    fingerprints = {"config": config_fingerprint(cfg)}
    outputs = {n: str(out / n) for n in ("comparison.json", "comparison.md", "learning_curves.png")}
    return stage.complete(fingerprints, metrics, started, outputs)
