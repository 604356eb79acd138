"""`slm analyze token-dynamics`: RHO-1's token categories over a series of checkpoints
(slm.analysis.token_dynamics), as a stage.

Skipped when stage.json records this config and the same checkpoints: for `run_dir`, the same whole checkpoints
(a run trained further has more, and is analysed again), each with unchanged weight files.
"""

from __future__ import annotations

import time
from pathlib import Path

from slm.analysis.token_dynamics import CATEGORIES, resolve_checkpoints, token_dynamics
from slm.config import TokenDynamicsConfig
from slm.errors import SlmError
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.utils.io import checkpoint_identity, sha256_json


def inputs_fingerprint(cfg: TokenDynamicsConfig) -> str | None:
    """The checkpoints' identities, in order (None while they cannot be resolved: the analysis names why)."""
    try:
        checkpoints = resolve_checkpoints(cfg)
    except SlmError:
        return None
    extra = [cfg.architecture or str(Path(cfg.run_dir) / "model")] if cfg.run_dir else []
    dirs = [str(c.path) for c in checkpoints] + [d for d in extra if Path(d).is_dir()]
    return sha256_json([[d, checkpoint_identity(d)] for d in dirs])


@locked_stage("token_dynamics")
def run(cfg: TokenDynamicsConfig, force: bool = False, progress: bool = True, console=None) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("token_dynamics", cfg, out)
    inputs = inputs_fingerprint(cfg)
    if (done := stage.prepare(force, inputs)) is not None:
        say(f"[green]token_dynamics[/]: {out} is complete for these checkpoints; skipping (use --force to redo)")
        return done
    started = time.time()
    summary = token_dynamics(cfg, progress=progress, console=console)
    say(f"token_dynamics: {summary['tokens']} tokens over {len(summary['checkpoints'])} checkpoints; wrote {out}")
    metrics = {
        "tokens": summary["tokens"],
        "rows": summary["rows"],
        "checkpoints": len(summary["checkpoints"]),
        "level": summary["thresholds"]["level"],
        "shares": {name: summary["categories"][name]["share"] for name in CATEGORIES},
    }
    fingerprints = {"config": config_fingerprint(cfg)}
    return stage.complete(fingerprints, metrics, started, summary["outputs"], inputs=inputs_fingerprint(cfg))
