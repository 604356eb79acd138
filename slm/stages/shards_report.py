"""`slm shards report`: the selection report of a shard directory (HTML and JSON), no ground-truth column needed."""

from __future__ import annotations

import time
from pathlib import Path

from slm.config import ShardsReportConfig
from slm.data.tokenizer import load_tokenizer
from slm.errors import SlmError
from slm.shards import ShardSet
from slm.shards.report import build_report, write_report
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.threads import apply_threads
from slm.utils.io import sha256_json, weights_fingerprint


@locked_stage("shards_report")
def run(cfg: ShardsReportConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("shards_report", cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]shards_report[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.threads, "threads")
    shards = ShardSet(cfg.shards)
    tokenizer_dir = shards.metadata.tokenizer_path
    if not tokenizer_dir:
        raise SlmError(f"{cfg.shards}: shards record no tokenizer path")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = None
    if cfg.model:
        from slm.models import load_pretrained
        from slm.training.distributed import device

        model = load_pretrained(cfg.model).float().to(device()).eval()
    report = build_report(cfg, tokenizer, model)
    files = write_report(report, out)
    say(
        f"shards_report: kept {report['kept_fraction']:.1%} of {report['valid_tokens']} sampled tokens "
        f"({report['rule']}); wrote {files['html']}"
    )
    metrics = {k: report[k] for k in ("sampled_rows", "valid_tokens", "kept_fraction", "mean_ref_loss_kept", "score")}
    metrics.update(threads)
    fingerprints = {
        "config": config_fingerprint(cfg),
        "data": sha256_json({n: e["sha256"] for n, e in shards.manifest.shards.items()}),
        "model": weights_fingerprint(cfg.model) if cfg.model else None,
    }
    return stage.complete(fingerprints, metrics, started, {k: str(v) for k, v in files.items()})
