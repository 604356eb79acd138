"""`slm data real-text`: the real-text corpus of the machine's manual pages and documentation, with junk."""

from __future__ import annotations

import json
import time
from pathlib import Path

from slm.config import RealTextDataConfig
from slm.data.real_text import build_real_text, sources_fingerprint
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.utils.io import sha256_file


@locked_stage("real_text_data")
def run(cfg: RealTextDataConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("real_text_data", cfg, out)
    inputs = sources_fingerprint(cfg)  # the machine's manual pages and documentation as they are now
    if (done := stage.prepare(force, inputs)) is not None:
        say(f"[green]real_text_data[/]: {out} is complete for this config; skipping")
        return done
    started = time.time()
    say(
        f"real_text_data: {cfg.reference_documents} reference, {cfg.train_documents} training (with "
        f"{cfg.junk_share:.0%} junk) and {cfg.validation_documents} held-out documents"
    )
    files = build_real_text(cfg)
    outputs = {name: str(getattr(files, name)) for name in ("reference", "train", "validation", "manifest")}
    splits = json.loads(files.manifest.read_text())["splits"]
    for name, entry in splits.items():
        say(f"  {name}: {entry['documents']} documents, {entry['characters']:,} characters")
    fingerprints = {"config": config_fingerprint(cfg), **{n: sha256_file(getattr(files, n)) for n in splits}}
    return stage.complete(fingerprints, {"splits": splits}, started, outputs, inputs)
