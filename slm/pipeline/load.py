"""A pipeline YAML loaded and validated: the built-in demo recipe or a file, `--set` overrides (a stage's keys as
`stages.NAME.key=value`), `${work_dir}` substituted, each stage's config checked against its kind's config class.
What `slm run` runs and `slm jobs` renders."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from slm.config import PipelineConfig, apply_overrides, read_yaml, substitute, validate
from slm.errors import SlmError
from slm.stages.registry import stage_config_class

BUILTIN_DEMO = "demo"


def builtin_recipe(name: str = BUILTIN_DEMO) -> Path:
    path = Path(str(files("slm") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise SlmError(f"built-in pipeline {name!r} not found in {path.parent}")
    return path


@dataclass
class LoadedStage:
    name: str
    kind: str
    cfg: object
    slurm: dict


def _apply_pipeline_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set work_dir=...` or `--set stages.NAME.key=value` (stage NAME's config key)."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    # each stage gets its own copy: stages that share a YAML anchor must not share an override
    by_name = {
        s.get("name"): copy.deepcopy({"config": s.get("config", {}), "slurm": s.get("slurm", {})})
        for s in stages
        if isinstance(s, dict)
    }
    top = {k: v for k, v in raw.items() if k != "stages"}
    top["stages"] = by_name
    fixed = []
    for item in overrides:
        key = item.split("=", 1)[0]
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) > 2:
            if parts[1] not in by_name:
                raise SlmError(f"--set {item!r}: no stage named {parts[1]!r}; stages are {list(by_name)}")
            if parts[2] not in ("config", "slurm"):
                item = ".".join(parts[:2] + ["config"] + parts[2:]) + "=" + item.split("=", 1)[1]
        fixed.append(item)
    top = apply_overrides(top, fixed)
    merged = top.pop("stages")
    for s in stages:
        if isinstance(s, dict) and s.get("name") in merged:
            s["config"], s["slurm"] = merged[s["name"]]["config"], merged[s["name"]]["slurm"]
    return {**top, "stages": stages}


def load_pipeline(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[PipelineConfig, list[LoadedStage], Path]:
    path = Path(path) if path else builtin_recipe()
    raw = _apply_pipeline_overrides(read_yaml(path), overrides or [])
    if "work_dir" in raw:
        raw = substitute(raw, {"work_dir": raw["work_dir"]})
    pipeline = validate(raw, PipelineConfig, str(path))
    stages = [
        LoadedStage(
            s.name,
            s.kind,
            validate(s.config, stage_config_class(s.kind), f"{path}: stages[{s.name}].config"),
            {**pipeline.slurm, **s.slurm},
        )
        for s in pipeline.stages
    ]
    return pipeline, stages, path
