"""The shard schema, written down once.

One row per packed sequence of `seq_len` tokens. Columns (fixed-size lists of length seq_len):
  input_ids  int32    the tokens
  ref_loss   float32  ref_loss[t] = -log p_ref(input_ids[t] | input_ids[<t]); position 0 has
                      no context and holds NaN; so do padding positions and any NaN the model made
  loss_mask  int8     1 for real tokens, 0 for padding
  base_loss  float32  optional: the same quantity under a base model (static excess = base - ref)
  noise      int8     optional (demo): 1 where the token lies in a noise span; measurement only
  ref_loss_<i> float32  with k > 1 references (metadata `references`), reference i's own losses, i = 0..k-1;
                      ref_loss is then their combination (metadata `combine`, see slm.shards.scoring.combine_losses)
and per row:
  sequence_id int64   the row's global index (shard_index * ROW_STRIDE + row in shard)
  doc_starts  list<int32>  positions where a document begins inside the row
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np
import pyarrow as pa

from slm.errors import SlmError

FORMAT_VERSION = 1
ROW_STRIDE = 1 << 32  # sequence_id = shard_index * ROW_STRIDE + row_in_shard
METADATA_KEY = b"slm"


@dataclass(frozen=True)
class ShardMetadata:
    """What a reader must agree with before it trusts the scores."""

    format_version: int
    tokenizer_name: str
    tokenizer_sha256: str
    vocab_size: int
    seq_len: int
    reference_model: str
    reference_sha256: str
    corpus_fingerprint: str
    slm_version: str
    documents_per_shard: int
    base_model: str | None = None
    base_sha256: str | None = None
    tokenizer_path: str | None = None
    # the reference's own sizes (None in shards written before slm recorded them): a tokenizer is checked against the
    # embedding even when the reference folder holds no tokenizer files
    reference_vocab_size: int | None = None
    reference_embedding_shape: list[int] | None = None
    # several references (None with one): each {model, sha256, domain, vocab_size, embedding_shape}, in column order
    # ref_loss_0..k-1; `combine` made ref_loss of them, `domain_field` named the documents' domains (min_per_domain).
    # reference_model and reference_sha256 then stand for the set: "combine(model_0, ...)" and the sha256 of the
    # references' sha256s, domains and the rule, so that a reader refuses shards of another set or rule.
    references: list[dict] | None = None
    combine: str | None = None
    domain_field: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict, source: str) -> ShardMetadata:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in obj and f.default is MISSING]  # the rest are optional
        if missing:
            raise SlmError(f"{source}: shard metadata lacks {sorted(missing)}")
        if obj.get("format_version") != FORMAT_VERSION:
            raise SlmError(
                f"{source}: shard format version {obj.get('format_version')!r}, this slm reads version {FORMAT_VERSION}"
            )
        return cls(**{k: v for k, v in obj.items() if k in names})


def reference_columns(meta: ShardMetadata) -> list[str]:
    """The per-reference loss columns: ref_loss_0..k-1 with k > 1 references, none with one."""
    k = len(meta.references or [])
    return [f"ref_loss_{i}" for i in range(k)] if k > 1 else []


def shard_schema(meta: ShardMetadata, with_base: bool, with_noise: bool) -> pa.Schema:
    L = meta.seq_len
    cols = [
        pa.field("sequence_id", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32(), L)),
        pa.field("ref_loss", pa.list_(pa.float32(), L)),
        *(pa.field(name, pa.list_(pa.float32(), L)) for name in reference_columns(meta)),
        pa.field("loss_mask", pa.list_(pa.int8(), L)),
        pa.field("doc_starts", pa.list_(pa.int32())),
    ]
    if with_base:
        cols.append(pa.field("base_loss", pa.list_(pa.float32(), L)))
    if with_noise:
        cols.append(pa.field("noise", pa.list_(pa.int8(), L)))
    return pa.schema(cols, metadata={METADATA_KEY: json.dumps(meta.to_json(), sort_keys=True).encode()})


def metadata_from_schema(schema: pa.Schema, source: str) -> ShardMetadata:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SlmError(f"{source}: not an slm shard (no 'slm' schema metadata)")
    return ShardMetadata.from_json(json.loads(raw), source)


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, length: int) -> np.ndarray:
    """A fixed_size_list<T, length> column as a [rows, length] array (zero-copy when possible)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, length)
