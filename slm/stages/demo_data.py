"""`slm data demo`: write the embedded demo corpus and its tokenizer (deterministic from the seed)."""

from __future__ import annotations

import time
from pathlib import Path

from slm.config import DemoDataConfig
from slm.data.demo import generate_demo
from slm.data.tokenizer import tokenizer_fingerprint
from slm.evaluation.harness import write_demo_task
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.utils.io import sha256_file


@locked_stage("demo_data")
def run(cfg: DemoDataConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("demo_data", cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]demo_data[/]: {out} is complete for this config; skipping")
        return done
    started = time.time()
    say(f"demo_data: generating {cfg.hq_documents} high-quality and {cfg.train_documents} web documents into {out}")
    files = generate_demo(cfg)
    outputs = {name: str(getattr(files, name)) for name in ("hq", "train", "validation", "questions", "tokenizer")}
    # the held-out questions as an lm-evaluation-harness task:
    #   slm eval harness --tasks slm_demo_questions --include-path DIR
    outputs["harness_task"] = str(write_demo_task(files.questions, out / "harness"))
    fingerprints = {
        "config": config_fingerprint(cfg),
        "tokenizer": tokenizer_fingerprint(files.tokenizer),
        "train": sha256_file(files.train),
    }
    return stage.complete(fingerprints, {}, started, outputs)
