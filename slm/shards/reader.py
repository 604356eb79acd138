"""Reading shards: memory-mapped tables, metadata checks, rows by global index, verification."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from slm.errors import SlmError, describe
from slm.shards.format import ShardMetadata, fixed_list_to_numpy, metadata_from_schema, shard_schema
from slm.shards.layout import DONE_DIR
from slm.shards.manifest import Manifest, load_manifest
from slm.utils.io import sha256_file


def open_shard(path: Path) -> pa.Table:
    """A shard as a zero-copy table over a memory map (an Arrow IPC stream file)."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise SlmError(
            f"{path}: corrupt or truncated shard ({describe(e)}); "
            "run `slm shards verify` and rerun `slm score` to repair"
        ) from None


REPAIR = "run `slm shards verify` for the full list; rerun `slm score` with the same config to repair"


class ShardSet:
    """All whole shards of a directory, seen as one sequence of rows.

    At start-up every listed shard must exist with its manifest size, and (verify="full") its sha256; with
    verify="size" the sha256 is checked when the shard is first loaded instead. Loading a shard also checks its
    rows, metadata, token ids (< the metadata's vocab_size) and token / NaN-token counts against the manifest.
    Any difference is one SlmError naming the shard, before a row of it is used.
    """

    def __init__(self, directory: str | Path, require_complete: bool = True, verify: str = "full"):
        if verify not in ("full", "size"):
            raise ValueError(f"verify={verify!r}: expected full or size")
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        if require_complete and not self.manifest.complete:
            raise SlmError(
                f"{self.directory}: incomplete shards "
                f"({len(self.manifest.shards)} of {self.manifest.num_shards} whole); finish `slm score` first"
            )
        if not self.manifest.shards:
            raise SlmError(f"{self.directory}: the manifest lists no shard")
        self.names = sorted(self.manifest.shards)
        counts = np.array([self.manifest.shards[n]["rows"] for n in self.names], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._tables: dict[str, pa.Table] = {}
        self._hashed: set[str] = set()
        for name in self.names:
            self._check_file(name, hash_it=verify == "full")

    def _check_file(self, name: str, hash_it: bool) -> None:
        path, entry = self.directory / name, self.manifest.shards[name]
        if not path.is_file():
            raise SlmError(f"{path}: shard listed in the manifest is missing; {REPAIR}")
        if (size := path.stat().st_size) != entry["bytes"]:
            raise SlmError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered); {REPAIR}")
        if hash_it and name not in self._hashed:
            if (digest := sha256_file(path)) != entry["sha256"]:
                raise SlmError(
                    f"{path}: sha256 {digest[:12]}..., the manifest says {entry['sha256'][:12]}... (altered); {REPAIR}"
                )
            self._hashed.add(name)

    def _check_table(self, name: str, table: pa.Table) -> None:
        path, entry, meta = self.directory / name, self.manifest.shards[name], self.metadata
        if table.num_rows != entry["rows"]:
            raise SlmError(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}; {REPAIR}")
        if (mine := metadata_from_schema(table.schema, str(path))) != meta:
            diff = [k for k, v in meta.to_json().items() if mine.to_json()[k] != v]
            raise SlmError(f"{path}: schema metadata differs from the manifest in {diff}; {REPAIR}")
        ids = fixed_list_to_numpy(table.column("input_ids"), meta.seq_len)
        bad = (ids < 0) | (ids >= meta.vocab_size)
        if bad.any():
            row, pos = (int(i) for i in np.argwhere(bad)[0])
            raise SlmError(
                f"{path}: token id {int(ids[row, pos])} at row {row} position {pos} is outside the vocabulary "
                f"[0, {meta.vocab_size}) of the shards' metadata ({int(bad.sum())} such ids; corrupt ids); {REPAIR}"
            )
        if problems := count_problems(table, entry, meta.seq_len):
            raise SlmError(f"{path}: {problems[0]}; {REPAIR}")

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
            self._check_file(name, hash_it=True)  # its size again, and its sha256 unless start-up checked it
            table = open_shard(self.directory / name)
            self._check_table(name, table)
            self._tables[name] = table
        return self._tables[name]

    @cached_property
    def columns(self) -> list[str]:
        return self.table(self.names[0]).schema.names

    def rows(
        self, indices: np.ndarray, columns: tuple[str, ...] = ("input_ids", "ref_loss", "loss_mask")
    ) -> dict[str, np.ndarray]:
        """Rows at global `indices` (any order) as arrays [n, seq_len] (sequence_id as [n])."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = {c: [None] * len(indices) for c in columns}
        for s in np.unique(shard_of):
            table = self.table(self.names[s])
            where = np.nonzero(shard_of == s)[0]
            local = indices[where] - self.offsets[s]
            for c in columns:
                if pa.types.is_fixed_size_list(table.schema.field(c).type):  # per token: [rows, seq_len]
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
            problems.append(
                f"{path.name}: not listed in the manifest (a partial or stray shard; rerun `slm score` or delete it)"
            )
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
            problems.extend(f"{name}: {p}" for p in count_problems(table, entry, meta.seq_len))
    return problems


def count_problems(table: pa.Table, entry: dict, seq_len: int) -> list[str]:
    """Token and NaN-token counts recomputed from the data, as the writer counts them, against the entry."""
    if "loss_mask" not in table.schema.names or "ref_loss" not in table.schema.names:
        return []
    mask = fixed_list_to_numpy(table.column("loss_mask"), seq_len).astype(bool)
    problems = []
    if "tokens" in entry and int(mask.sum()) != int(entry["tokens"]):
        problems.append(f"{int(mask.sum())} tokens, manifest says {entry['tokens']}")
    if "nan_tokens" in entry:
        # position 0 is NaN by definition (no context); the writer counts only NaNs the model produced
        nan = int((np.isnan(fixed_list_to_numpy(table.column("ref_loss"), seq_len))[:, 1:] & mask[:, 1:]).sum())
        if nan != int(entry["nan_tokens"]):
            problems.append(f"{nan} NaN token losses, manifest says {entry['nan_tokens']}")
    return problems


def leftover_temp_files(directory: str | Path) -> list[Path]:
    """Temp files of interrupted atomic writes (`slm.utils.io.atomic_open`: `.NAME.XXXXXXXX.tmp`) in a shard
    directory and its `.done/` sidecars: dead weight a crash (SIGKILL, node loss) left behind, safe to delete."""
    directory = Path(directory)
    found = []
    for folder in (directory, directory / DONE_DIR):
        if folder.is_dir():
            found.extend(p for p in folder.iterdir() if p.name.endswith(".tmp") and p.is_file())
    return sorted(found)
