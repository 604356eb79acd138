"""What a stage's output says about its progress, read from disk only (no Slurm): a finished
`stage.json`, and for scoring which shards are whole and which array tasks still have work."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from slm.errors import SlmError
from slm.shards.layout import MANIFEST, part_shards, whole_run_config, whole_shards
from slm.stages.common import STAGE_FILE, StageRun


def stage_cfg_for_fingerprint(kind: str, cfg: BaseModel) -> BaseModel:
    """The config a stage fingerprints in its stage.json (scoring: one record for all parts)."""
    return whole_run_config(cfg) if kind == "score" else cfg


def finished_run(stage: str, kind: str, cfg: BaseModel, out_dir: Path) -> tuple[StageRun, dict] | None:
    """(the stage, its stage.json) when `out_dir/stage.json` records a finished run of this config, else None;
    a finished run of another config is an error, as it is for the stage itself."""
    run = StageRun(kind, stage_cfg_for_fingerprint(kind, cfg), Path(out_dir))
    try:
        done = run.finished()
    except SlmError as e:
        raise SlmError(f"stage {stage!r}: {e}") from None
    return (run, done) if done is not None else None


def stage_file_complete(out_dir: Path) -> bool:
    """stage.json says complete (whatever the config): for `slm jobs status`."""
    path = Path(out_dir) / STAGE_FILE
    try:
        return path.is_file() and json.loads(path.read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def num_shards(shards_dir: Path) -> int | None:
    """Shards of the whole corpus, from manifest.json (None before any part has finished)."""
    path = Path(shards_dir) / MANIFEST
    try:
        return int(json.loads(path.read_text())["num_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unfinished_parts(shards_dir: Path, parts: int) -> list[int]:
    """Array tasks (parts) that own at least one shard that is not whole; all of them while no
    manifest tells how many shards the corpus makes."""
    total = num_shards(shards_dir)
    if total is None:
        return list(range(parts))
    whole = whole_shards(shards_dir)
    return [p for p in range(parts) if any(k not in whole for k in part_shards(total, p, parts))]
