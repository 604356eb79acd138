"""`slm eval ruler`: RULER-style long-context tasks on a checkpoint (slm.evaluation.ruler), as a stage.

Skipped when stage.json records this config and the model's files are unchanged (`checkpoint_identity`);
after a crash `run_ruler` reuses the predictions already decoded into predictions.jsonl.
"""

from __future__ import annotations

import time
from pathlib import Path

from slm.config import RulerConfig
from slm.data.tokenizer import tokenizer_fingerprint
from slm.evaluation.ruler import run_ruler
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.utils.io import checkpoint_identity, sha256_json


def inputs_fingerprint(cfg: RulerConfig) -> str | None:
    """The model's and tokenizer's identity (None while the model is missing: `run_ruler` names it)."""
    model, tokenizer = Path(cfg.model), Path(cfg.tokenizer or cfg.model)
    if not model.is_dir() or not tokenizer.is_dir():
        return None
    return sha256_json({"model": checkpoint_identity(model), "tokenizer": tokenizer_fingerprint(tokenizer)})


@locked_stage("ruler")
def run(cfg: RulerConfig, force: bool = False, progress: bool = True) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("ruler", cfg, out)
    inputs = inputs_fingerprint(cfg)
    if (done := stage.prepare(force, inputs)) is not None:
        say(f"[green]ruler[/]: {out} is complete for this config and model; skipping (use --force to redo)")
        return done
    started = time.time()
    results = run_ruler(cfg, progress=progress)
    eff = results["effective_length"]
    say(
        f"ruler: {results['samples']} samples ({results['reused_predictions']} reused), effective length "
        f"{eff['length'] if eff['length'] is not None else 'none'} at threshold {eff['threshold']:.1f}; wrote {out}"
    )
    metrics = {
        "effective_length": eff["length"],
        "effective_threshold": eff["threshold"],
        "average": results["average"],
        "samples": results["samples"],
        "reused_predictions": results["reused_predictions"],
        "device": results["device"],
        "precision": results["precision"],
    }
    fingerprints = {"config": config_fingerprint(cfg)}
    outputs = {"results": str(out / "results.json"), "predictions": str(out / results["predictions"])}
    outputs.update({f"plot_{name}": str(out / file) for name, file in results["plots"].items()})
    return stage.complete(fingerprints, metrics, started, outputs, inputs=inputs_fingerprint(cfg))
