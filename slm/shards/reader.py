"""Reading shards: memory-mapped tables, metadata checks, rows by global index, verification."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from slm.errors import SlmError, describe
from slm.io import sha256_file
from slm.shards.format import ShardMetadata, fixed_list_to_numpy, metadata_from_schema, shard_schema
from slm.shards.manifest import DONE_DIR, Manifest, load_manifest

FIXED_COLUMNS = ("input_ids", "ref_loss", "loss_mask", "base_loss", "noise")


def open_shard(path: Path) -> pa.Table:
    """A shard as a zero-copy table over a memory map (an Arrow IPC stream file)."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise SlmError(f"{path}: corrupt or truncated shard ({describe(e)}); run `slm shards verify` and rerun `slm score` to repair") from None


class ShardSet:
    """All whole shards of a directory, seen as one sequence of rows."""

    def __init__(self, directory: str | Path, require_complete: bool = True):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        if require_complete and not self.manifest.complete:
            raise SlmError(
                f"{self.directory}: incomplete shards ({len(self.manifest.shards)} of {self.manifest.num_shards} whole); finish `slm score` first"
            )
        if not self.manifest.shards:
            raise SlmError(f"{self.directory}: the manifest lists no shard")
        self.names = sorted(self.manifest.shards)
        counts = np.array([self.manifest.shards[n]["rows"] for n in self.names], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._tables: dict[str, pa.Table] = {}

    @property
    def metadata(self) -> ShardMetadata:
        return self.manifest.metadata

    @property
    def seq_len(self) -> int:
        return self.metadata.seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def table(self, name: str) -> pa.Table:
        if name not in self._tables:
            path = self.directory / name
            if not path.is_file():
                raise SlmError(f"{path}: shard listed in the manifest is missing; rerun `slm score` to repair")
            table = open_shard(path)
            if table.num_rows != self.manifest.shards[name]["rows"]:
                raise SlmError(f"{path}: {table.num_rows} rows, the manifest says {self.manifest.shards[name]['rows']}; rerun `slm score` to repair")
            self._tables[name] = table
        return self._tables[name]

    @cached_property
    def columns(self) -> list[str]:
        return self.table(self.names[0]).schema.names

    def rows(self, indices: np.ndarray, columns: tuple[str, ...] = ("input_ids", "ref_loss", "loss_mask")) -> dict[str, np.ndarray]:
        """Rows at global `indices` (any order) as arrays [n, seq_len] (sequence_id as [n])."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = {c: [None] * len(indices) for c in columns}
        for s in np.unique(shard_of):
            table = self.table(self.names[s])
            where = np.nonzero(shard_of == s)[0]
            local = indices[where] - self.offsets[s]
            for c in columns:
                if c in FIXED_COLUMNS:
                    values = fixed_list_to_numpy(table.column(c), self.seq_len)[local]
                else:
                    values = table.column(c).to_numpy()[local]
                for k, w in enumerate(where):
                    out[c][w] = values[k]
        return {c: np.stack(v) for c, v in out.items()}


def verify_shards(directory: str | Path, check_sha: bool = True) -> list[str]:
    """Every problem found, one line each, naming the shard; empty when all is well.

    A problem is a listed shard that is missing, of another size, sha256 (full check only), schema,
    metadata, row count, or token / NaN-token count (full check only) than its manifest entry, and a
    `shard-*.arrow` file the manifest does not list (a partial write, or a stray copy).
    Leftover temp files are not problems (readers never see them): see `leftover_temp_files`.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    if not manifest.complete:
        problems.append(f"{directory}: {len(manifest.shards)} of {manifest.num_shards} shards whole")
    for path in sorted(directory.glob("shard-*.arrow")):
        if path.name not in manifest.shards:
            problems.append(f"{path.name}: not listed in the manifest (a partial or stray shard; rerun `slm score` or delete it)")
    meta = manifest.metadata
    for name, entry in sorted(manifest.shards.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']} (truncated or altered)")
            continue
        if check_sha and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (altered)")
            continue
        try:
            table = open_shard(path)
        except SlmError as e:
            problems.append(f"{name}: {e}")
            continue
        try:
            shard_meta = metadata_from_schema(table.schema, name)
        except SlmError as e:
            problems.append(str(e))
            continue
        if shard_meta != meta:
            diff = [k for k in meta.to_json() if meta.to_json()[k] != shard_meta.to_json()[k]]
            problems.append(f"{name}: schema metadata differs from the manifest in {diff}")
        expected = shard_schema(meta, "base_loss" in table.schema.names, "noise" in table.schema.names)
        if not table.schema.remove_metadata().equals(expected.remove_metadata()):
            problems.append(f"{name}: schema differs from format version {meta.format_version}")
        if table.num_rows != entry["rows"]:
            problems.append(f"{name}: {table.num_rows} rows, manifest says {entry['rows']}")
        elif check_sha:
            problems.extend(_count_problems(name, table, entry, meta.seq_len))
    return problems


def _count_problems(name: str, table: pa.Table, entry: dict, seq_len: int) -> list[str]:
    """Token and NaN-token counts recomputed from the data, as the writer counts them, against the entry."""
    if "loss_mask" not in table.schema.names or "ref_loss" not in table.schema.names:
        return []
    mask = fixed_list_to_numpy(table.column("loss_mask"), seq_len).astype(bool)
    problems = []
    if "tokens" in entry and int(mask.sum()) != int(entry["tokens"]):
        problems.append(f"{name}: {int(mask.sum())} tokens, manifest says {entry['tokens']}")
    if "nan_tokens" in entry:
        # position 0 is NaN by definition (no context); the writer counts only NaNs the model produced
        nan = int((np.isnan(fixed_list_to_numpy(table.column("ref_loss"), seq_len))[:, 1:] & mask[:, 1:]).sum())
        if nan != int(entry["nan_tokens"]):
            problems.append(f"{name}: {nan} NaN token losses, manifest says {entry['nan_tokens']}")
    return problems


def leftover_temp_files(directory: str | Path) -> list[Path]:
    """Temp files of interrupted atomic writes (`slm.io.atomic_open`: `.NAME.XXXXXXXX.tmp`) in a shard
    directory and its `.done/` sidecars: dead weight a crash (SIGKILL, node loss) left behind, safe to delete."""
    directory = Path(directory)
    found = []
    for folder in (directory, directory / DONE_DIR):
        if folder.is_dir():
            found.extend(p for p in folder.iterdir() if p.name.endswith(".tmp") and p.is_file())
    return sorted(found)
