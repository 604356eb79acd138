"""A text corpus tokenised and packed once into an Arrow file of fixed-length rows.

Used for the reference model's training data and for every held-out split. The file is written
incrementally (memory does not grow with the corpus) and atomically, and named after the
fingerprints of corpus, tokenizer and seq_len, so a rerun reuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from slm.config import CorpusConfig
from slm.data.corpus import corpus_fingerprint, load_corpus
from slm.data.packing import pack_documents, tokenize_documents
from slm.data.tokenizer import tokenizer_fingerprint
from slm.errors import SlmError
from slm.io import atomic_open, sha256_json
from slm.shards.format import fixed_list_to_numpy

BATCH_DOCS = 256


def iter_documents(
    corpus, tokenizer, text_field: str, noise_field: str | None = None, start: int = 0, stop: int | None = None
):
    """(token ids, noise tags or None) per document of `corpus[start:stop]`, tokenised in batches."""
    stop = len(corpus) if stop is None else stop
    for lo in range(start, stop, BATCH_DOCS):
        batch = corpus[lo : min(lo + BATCH_DOCS, stop)]
        yield from tokenize_documents(tokenizer, batch[text_field], batch[noise_field] if noise_field else None)


class PackedRows:
    """Rows of a packed Arrow file: `input_ids`, `loss_mask` (and `noise` when tagged)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.table = pa.ipc.open_stream(pa.memory_map(str(self.path))).read_all()
        self.seq_len = self.table.schema.field("input_ids").type.list_size
        self.columns = self.table.schema.names

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices, columns=("input_ids", "loss_mask")) -> dict[str, np.ndarray]:
        return {c: fixed_list_to_numpy(self.table.column(c), self.seq_len)[np.asarray(indices)] for c in columns}


def packed_corpus(cfg: CorpusConfig, tokenizer, tokenizer_dir: str, seq_len: int, cache_dir: str | Path) -> PackedRows:
    """Pack `cfg` into `cache_dir/packed-<fingerprint>.arrow` unless it is already there."""
    key = sha256_json(
        {"corpus": corpus_fingerprint(cfg), "tokenizer": tokenizer_fingerprint(tokenizer_dir), "seq_len": seq_len}
    )[:16]
    path = Path(cache_dir) / f"packed-{key}.arrow"
    if path.is_file():
        return PackedRows(path)
    corpus = load_corpus(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    field = pa.list_(pa.int32(), seq_len)
    schema = pa.schema([("input_ids", field), ("loss_mask", pa.list_(pa.int8(), seq_len))])
    n_rows = 0
    with atomic_open(path) as f, pa.ipc.new_stream(f, schema) as stream:
        buffer: list = []

        def flush():
            ids = np.array([r.input_ids for r in buffer], dtype=np.int32)
            mask = np.array([r.loss_mask for r in buffer], dtype=np.int8)
            stream.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len),
                        pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq_len),
                    ],
                    schema=schema,
                )
            )
            buffer.clear()

        docs = iter_documents(corpus, tokenizer, cfg.text_field)
        for row in pack_documents(docs, seq_len, tokenizer.eos_token_id, pad_id, whole=cfg.packing == "whole"):
            buffer.append(row)
            n_rows += 1
            if len(buffer) == 1024:
                flush()
        if buffer:
            flush()
        if n_rows == 0:  # raised inside: the partial file is removed
            raise SlmError(f"corpus.path {cfg.path!r}: no tokens after tokenisation")
    return PackedRows(path)
