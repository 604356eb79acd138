"""Noise tags by kind, aligned with the shards' rows: which kinds of noise does the selection keep?

The shards' `noise` column says only noise/clean. The demo corpus also records each span's kind
(`noise_kinds`, parallel to `noise_spans`). This re-tokenises and re-packs the documents of the
shards that hold the first `n_rows` rows, exactly as `slm score` did, tagging every token with its
kind's code (0 = clean, i + 1 = kinds[i]), and checks that the packed tokens equal the shard's
`input_ids`, so a code can never be attached to the wrong token.
"""

from __future__ import annotations

import numpy as np

from slm.config import CorpusConfig
from slm.data.corpus import load_corpus
from slm.data.packed import BATCH_DOCS
from slm.data.packing import pack_documents, tokenize_documents
from slm.errors import SlmError
from slm.shards.layout import shard_documents, shard_index


def noise_kind_codes(
    shards, corpus: CorpusConfig, tokenizer, n_rows: int, kinds_field: str = "noise_kinds"
) -> tuple[np.ndarray, list[str]]:
    """([n_rows, seq_len] int16 codes for the shards' first rows, kind names: code i + 1 is names[i])."""
    if corpus.noise_field is None:
        raise SlmError("noise kinds need corpus.noise_field (the noise spans)")
    docs = load_corpus(corpus)
    if kinds_field not in docs.column_names:
        raise SlmError(
            f"corpus.path {corpus.path!r}: no field {kinds_field!r} (the kind of each noise span); "
            f"columns are {docs.column_names}"
        )
    names = sorted({k for row in docs[kinds_field] for k in row})
    code_of = {k: i + 1 for i, k in enumerate(names)}
    per_shard = shards.metadata.documents_per_shard
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i, name in enumerate(shards.names):
        if shards.offsets[i] >= n_rows:
            break
        if (k := shard_index(name)) is None:
            raise SlmError(f"{shards.directory / name}: not a shard name")
        lo, hi = shard_documents(k, per_shard, len(docs))
        tagged = []
        for start in range(lo, hi, BATCH_DOCS):
            batch = docs[start : min(start + BATCH_DOCS, hi)]
            codes = [[code_of[x] for x in kinds] for kinds in batch[kinds_field]]
            tagged += tokenize_documents(tokenizer, batch[corpus.text_field], batch[corpus.noise_field], codes)
        rows = list(pack_documents(tagged, shards.seq_len, tokenizer.eos_token_id, pad_id, corpus.packing))
        want = min(len(rows), n_rows - int(shards.offsets[i]))
        stored = shards.rows(np.arange(shards.offsets[i], shards.offsets[i] + want), ("input_ids",))["input_ids"]
        packed = np.array([r.input_ids for r in rows[:want]], dtype=stored.dtype)
        if len(rows) != shards.offsets[i + 1] - shards.offsets[i] or not np.array_equal(packed, stored):
            raise SlmError(
                f"{shards.directory / name}: its tokens differ from corpus.path {corpus.path!r} "
                f"documents {lo}-{hi} re-packed; "
                "not the corpus (or tokenizer) these shards were scored from"
            )
        out.append(np.array([r.noise for r in rows[:want]], dtype=np.int16))
    return np.concatenate(out)[:n_rows], names
