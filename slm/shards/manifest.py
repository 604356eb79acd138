"""The manifest: which shards are whole, with their counts and checksums.

A shard is listed only once it is whole. Each writer (a Slurm array task, a data-parallel rank)
records a finished shard in a small sidecar file `.done/shard-NNNNN.json`, then merges all
sidecars into `manifest.json` under a file lock, so parts never overwrite each other's entries.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError
from slm.shards.format import FORMAT_VERSION, ShardMetadata
from slm.shards.layout import DONE_DIR, MANIFEST, sidecar
from slm.utils.io import atomic_write_json, read_json


@dataclass
class Manifest:
    metadata: ShardMetadata
    num_shards: int  # expected when the whole corpus is scored
    shards: dict[str, dict] = field(default_factory=dict)  # name -> rows, tokens, bytes, sha256, ...

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    def totals(self) -> dict:
        keys = ("rows", "tokens", "bytes", "nan_tokens", "documents")
        return {k: sum(int(s.get(k, 0)) for s in self.shards.values()) for k in keys}

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata.to_json(),
            "num_shards": self.num_shards,
            "complete": self.complete,
            "totals": self.totals(),
            "shards": dict(sorted(self.shards.items())),
        }


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_shard(directory: Path, name: str, entry: dict) -> None:
    atomic_write_json(sidecar(directory, name), entry)


def forget_shard(directory: Path, name: str) -> None:
    sidecar(directory, name).unlink(missing_ok=True)


def merge_manifest(directory: Path, metadata: ShardMetadata, num_shards: int) -> Manifest:
    """Rebuild manifest.json from the sidecars of whole shards (atomic, under a lock)."""
    with _locked(directory):
        shards = {
            p.name[: -len(".json")]: json.loads(p.read_text()) for p in sorted((directory / DONE_DIR).glob("*.json"))
        }
        manifest = Manifest(metadata, num_shards, shards)
        atomic_write_json(directory / MANIFEST, manifest.to_json())
    return manifest


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise SlmError(f"{directory}: shard directory not found")
    if not path.is_file():
        raise SlmError(f"{path}: no manifest; is this a shard directory written by `slm score`?")
    obj = read_json(path)
    if not isinstance(obj, dict) or "metadata" not in obj or "shards" not in obj:
        raise SlmError(f"{path}: not an slm manifest (expected keys metadata, shards)")
    meta = ShardMetadata.from_json(obj["metadata"], str(path))
    return Manifest(meta, int(obj.get("num_shards", len(obj["shards"]))), dict(obj["shards"]))
