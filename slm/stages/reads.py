"""What a stage reads: the finished stages whose output its config names, and whether they were rebuilt since.

A stage reads another when a path in its config is that stage's `out_dir` or lies under it (`eval_slm` reads
`pretrain_slm/model`, not `pretrain_clm`). Two uses of the one rule:
- `slm jobs` chains a pipeline's jobs by these reads (`stage_reads`, from the configs alone);
- every stage, when it finds its own finished run, checks the stages it read (`upstream_stages`: the nearest
  directory at or above each existing path of its config that holds a stage.json). A finished run records a
  sha256 of each of those stage.json files; when one differs now, that input was rebuilt (a new corpus, `slm score
  --force`) and the stage runs again instead of skipping under outputs of the old input: the rule of make, for
  `slm run`, a stage's own command and a Slurm job alike. Every finished run writes a new stage.json (it holds a
  fresh `run_id`), so a rebuild always changes its hash. A record written before slm kept these hashes is compared
  by time instead: an input whose stage.json is newer than the stage's own (stage.json is replaced atomically when
  a stage finishes, so its mtime is when that run ended)."""

from __future__ import annotations

import os
from pathlib import Path

from slm.utils.io import sha256_file

STAGE_FILE = "stage.json"


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


def _stage_dir_of(path: Path) -> Path | None:
    """The nearest directory at or above an existing `path` that holds a stage.json: the stage that wrote it."""
    if not path.exists():
        return None
    return next((d for d in (path, *path.parents) if (d / STAGE_FILE).is_file()), None)


def upstream_stages(cfg_dump: dict, out_dir: str | Path, cwd: Path) -> dict[str, str]:
    """{stage dir: sha256 of its stage.json} for every finished stage whose output a path of the config lies in,
    the stage's own `out_dir` (and anything inside it) left out."""
    own = Path(absolute(str(out_dir), cwd))
    found: dict[str, str] = {}
    for path in (Path(absolute(s, cwd)) for s in _strings(cfg_dump) if s):
        if path == own or own in path.parents:
            continue
        if (d := _stage_dir_of(path)) is not None and str(d) not in found:
            found[str(d)] = sha256_file(d / STAGE_FILE)
    return found


def rebuilt_upstream(record: dict, stage_file: Path, now: dict[str, str]) -> list[str]:
    """The stage dirs of `now` (`upstream_stages`) rebuilt since the finished run `record` (read from `stage_file`)
    read them: its recorded hash differs; for a record without hashes, its stage.json is newer than `stage_file`."""
    recorded = record.get("fingerprints", {}).get("upstream")
    if recorded is not None:
        return [d for d, digest in now.items() if d in recorded and recorded[d] != digest]
    mine = stage_file.stat().st_mtime_ns
    return [d for d in now if (Path(d) / STAGE_FILE).stat().st_mtime_ns > mine]
