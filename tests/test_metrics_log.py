"""`metrics.jsonl` describes one run: afresh without a checkpoint (old lines kept as .prev), trimmed on resume."""

from __future__ import annotations

import json
from pathlib import Path

from slm.stages import reference
from slm.training.metrics import MetricsLog, read_metrics


def steps(path) -> list[int]:
    return [m["step"] for m in read_metrics(path)]


def test_killed_before_and_after_the_first_checkpoint_leaves_unique_increasing_steps(tiny_reference_cfg):
    cfg = tiny_reference_cfg("killed", max_steps=6, checkpoint_every=3, eval_every=3)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    prev = metrics.with_name("metrics.jsonl.prev")

    assert reference.run(cfg, stop_after=2) == {"status": "stopped", "step": 2}  # killed before any checkpoint
    first_lines = metrics.read_text()
    assert steps(metrics) == [1, 2] and not prev.exists()

    assert reference.run(cfg, stop_after=5)["step"] == 5  # no checkpoint to resume: starts afresh, old file kept
    assert prev.read_text() == first_lines
    assert steps(metrics) == [1, 2, 3, 4, 5]

    metrics.write_text(metrics.read_text() + '{"step": 6, "loss": 1.')  # a line cut short by the kill
    done = reference.run(cfg)  # resumes from the step-3 checkpoint: lines 4 and 5 (and the cut line) dropped
    assert done["metrics"]["resumed_from"] == 3
    assert steps(metrics) == [1, 2, 3, 4, 5, 6]
    assert prev.read_text() == first_lines


def test_start_afresh_replaces_an_older_prev_and_resume_keeps_lines_up_to_the_step(tmp_path):
    log = MetricsLog(tmp_path)
    for s in (1, 2, 3):
        log.log(s, {"loss": float(s)})
    log.start(resumed_step=2)
    assert steps(log.path) == [1, 2] and not log.prev_path.exists()
    log.start(resumed_step=None)
    assert not log.path.exists() and steps(log.prev_path) == [1, 2]
    log.log(1, {"loss": 9.0})
    log.start(resumed_step=None)
    assert [json.loads(line)["loss"] for line in log.prev_path.read_text().splitlines()] == [9.0]
    MetricsLog(tmp_path, enabled=False).start(resumed_step=None)  # ranks other than 0 leave the files alone
    assert log.prev_path.exists()
