"""Which stages of a pipeline read which, and which finished stages are older than what they read.

A stage reads an earlier stage when a path in its config is that stage's `out_dir` or lies under it
(`eval_slm` reads `pretrain_slm/model`, not `pretrain_clm`). `slm jobs submit` chains its jobs by these
reads; `slm run` redoes a finished stage whose stage.json is older than one it reads (the rule of make):
a rebuilt corpus is tokenized, scored and trained on again instead of being skipped under outputs of the
old one. stage.json is replaced atomically when a stage finishes, so its mtime is when that run ended."""

from __future__ import annotations

import os
from pathlib import Path

from slm.stages.common import STAGE_FILE


def absolute(path: str, cwd: Path) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def stage_reads(stages: list[tuple[str, dict, str]], cwd: Path) -> dict[str, list[str]]:
    """stage -> the earlier stages whose output it reads. `stages` holds (name, config dump, out_dir)."""
    reads: dict[str, list[str]] = {}
    for i, (name, cfg, out) in enumerate(stages):
        paths = [absolute(s, cwd) for s in _strings(cfg) if s and absolute(s, cwd) != absolute(out, cwd)]
        reads[name] = [
            other
            for other, _, other_out in stages[:i]
            if any(p == (o := absolute(other_out, cwd)) or p.startswith(o + os.sep) for p in paths)
        ]
    return reads


def finished_at(out_dir: str | Path) -> int | None:
    """mtime (ns) of the stage's stage.json, None when it has none."""
    try:
        return (Path(out_dir) / STAGE_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


def rebuilt_inputs(out_dir: str | Path, inputs: dict[str, str | Path]) -> list[str]:
    """The stages of `inputs` (name -> out_dir) that finished after the stage in `out_dir` did."""
    mine = finished_at(out_dir)
    if mine is None:
        return []
    return [name for name, d in inputs.items() if (t := finished_at(d)) is not None and t > mine]
