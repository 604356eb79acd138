"""A shard directory's layout, written down once: file names, which documents each shard holds, which part of a
split scoring run writes it, and when a shard is whole.

    shard-NNNNN.arrow              shard k: the corpus documents [k*D, (k+1)*D) packed into rows
                                   (D = documents_per_shard; the last shard ends with the corpus)
    .done/shard-NNNNN.arrow.json   its sidecar (rows, tokens, bytes, sha256), written once the shard is whole
    manifest.json                  the sidecars merged (slm.shards.manifest)

A shard's content never depends on how the work is split: part i of n scores the shards with k % n == i, and inside
a part each data-parallel rank every world-th of those. `slm score` writes this layout; `slm jobs` (which array tasks
still have work), the selection report and the noise-kind analysis (which documents a shard holds) read it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel

from slm.utils.io import sha256_file

MANIFEST = "manifest.json"
DONE_DIR = ".done"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def shard_index(name: str) -> int | None:
    """k for the file name `shard_name(k)`; None for any other name."""
    digits = name.removeprefix("shard-").removesuffix(".arrow")
    return int(digits) if digits.isdigit() and name == shard_name(int(digits)) else None


def shard_count(num_documents: int, documents_per_shard: int) -> int:
    """Shards of a corpus of `num_documents` documents."""
    return math.ceil(num_documents / documents_per_shard)


def shard_documents(index: int, documents_per_shard: int, num_documents: int) -> tuple[int, int]:
    """[lo, hi): the corpus documents shard `index` holds."""
    return index * documents_per_shard, min((index + 1) * documents_per_shard, num_documents)


def part_shards(num_shards: int, part: int, parts: int, rank: int = 0, world: int = 1) -> list[int]:
    """The shards that part `part` of `parts` scores (k % parts == part), and of those the ones data-parallel rank
    `rank` of `world` takes: every world-th."""
    of_part = [k for k in range(num_shards) if k % parts == part]
    return of_part[rank::world]


def whole_run_config(cfg: BaseModel) -> BaseModel:
    """A scoring config without its split (part 0 of 1): what a scoring run fingerprints, since the shards do not
    depend on the split; every part of one run shares one stage.json (`slm run` and a `slm jobs` array agree)."""
    return cfg.model_copy(update={"part": 0, "parts": 1})


def sidecar(directory: Path, name: str) -> Path:
    """The `.done/` record of shard `name`: present only once the shard is whole."""
    return Path(directory) / DONE_DIR / f"{name}.json"


def is_whole(directory: Path, name: str, check_sha256: bool = True) -> bool:
    """Shard `name` is whole: its sidecar is there and readable, and the shard file has the recorded size and
    (`check_sha256`) sha256."""
    shard = Path(directory) / name
    try:
        entry = json.loads(sidecar(directory, name).read_text())
        size = entry["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not (shard.is_file() and shard.stat().st_size == size):
        return False
    return not check_sha256 or sha256_file(shard) == entry["sha256"]


def whole_shards(directory: Path) -> set[int]:
    """Indices of the shards that are whole by size (`is_whole` without the sha256, which the scoring job itself
    checks before it skips one)."""
    whole = set()
    for entry in (Path(directory) / DONE_DIR).glob("shard-*.json"):
        name = entry.name.removesuffix(".json")
        index = shard_index(name)
        if index is not None and is_whole(directory, name, check_sha256=False):
            whole.add(index)
    return whole


def drop_dead_temp_files(directory: Path, names: list[str]) -> None:
    """Remove the temp files (`slm.utils.io.atomic_open`) of these shards and their sidecars that a killed writer left.
    The caller is the only writer of these shards (its part's lock, slm.locks; each rank its own shards), so no
    temp file of theirs belongs to a live writer."""
    for name in names:
        for folder, stem in ((Path(directory), name), (Path(directory) / DONE_DIR, f"{name}.json")):
            for tmp in folder.glob(f".{stem}.*.tmp"):
                tmp.unlink(missing_ok=True)
