"""Atomic shard writing: stream record batches to a temp file, fsync, rename, then record."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from slm.shards.format import ShardMetadata, reference_columns, shard_schema
from slm.shards.layout import shard_name
from slm.shards.manifest import record_shard
from slm.utils.io import atomic_open, sha256_file


def _fixed_list(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, L = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=typ), L)


class ShardWriter:
    def __init__(self, directory: str | Path, meta: ShardMetadata, with_base: bool = False, with_noise: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.schema = shard_schema(meta, with_base, with_noise)

    def record_batch(self, batch: dict) -> pa.RecordBatch:
        columns = {
            "sequence_id": pa.array(np.asarray(batch["sequence_id"], dtype=np.int64)),
            "input_ids": _fixed_list(np.asarray(batch["input_ids"], dtype=np.int32), pa.int32()),
            "ref_loss": _fixed_list(np.asarray(batch["ref_loss"], dtype=np.float32), pa.float32()),
            **{
                c: _fixed_list(np.asarray(batch[c], dtype=np.float32), pa.float32())
                for c in reference_columns(self.meta)
            },
            "loss_mask": _fixed_list(np.asarray(batch["loss_mask"], dtype=np.int8), pa.int8()),
            "doc_starts": pa.array(batch["doc_starts"], type=pa.list_(pa.int32())),
        }
        if "base_loss" in self.schema.names:
            columns["base_loss"] = _fixed_list(np.asarray(batch["base_loss"], dtype=np.float32), pa.float32())
        if "noise" in self.schema.names:
            columns["noise"] = _fixed_list(np.asarray(batch["noise"], dtype=np.int8), pa.int8())
        return pa.RecordBatch.from_arrays([columns[n] for n in self.schema.names], schema=self.schema)

    def write(self, index: int, batches: Iterable[dict], extra: dict | None = None) -> dict:
        """Write shard `index` from `batches`; returns (and records) its manifest entry."""
        name = shard_name(index)
        final = self.directory / name
        rows = tokens = nan_tokens = 0
        with atomic_open(final) as f, pa.ipc.new_stream(f, self.schema) as stream:
            for batch in batches:
                rb = self.record_batch(batch)
                stream.write_batch(rb)
                mask = np.asarray(batch["loss_mask"], dtype=bool)
                rows += rb.num_rows
                tokens += int(mask.sum())
                # position 0 is NaN by definition; count only NaNs the model produced
                nan_tokens += int((np.isnan(np.asarray(batch["ref_loss"]))[:, 1:] & mask[:, 1:]).sum())
        entry = {
            "rows": rows,
            "tokens": tokens,
            "nan_tokens": nan_tokens,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            **(extra or {}),
        }
        try:
            record_shard(self.directory, name, entry)
        except BaseException:  # (a full disk) a shard no sidecar records is redone by the next run: free its space now
            final.unlink(missing_ok=True)
            raise
        return entry
