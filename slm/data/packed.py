"""A text corpus tokenised and packed once into an Arrow file of fixed-length rows.

Used for the reference model's training data and for every held-out split. The file is written
incrementally (memory does not grow with the corpus) and atomically, and named after the
fingerprints of corpus, tokenizer and seq_len, so a rerun reuses it. Besides `input_ids` and
`loss_mask` it records per row `doc_index`, the corpus document that holds the row's first token,
so that a held-out sample can be spread across documents (`sample_rows`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from slm.config import CorpusConfig
from slm.data.corpus import corpus_fingerprint, load_corpus
from slm.data.packing import pack_documents, token_documents, tokenize_documents
from slm.data.tokenizer import tokenizer_fingerprint
from slm.errors import SlmError
from slm.shards.format import fixed_list_to_numpy
from slm.utils.io import atomic_open, sha256_json

BATCH_DOCS = 256
LAYOUT = 2  # 2: with the doc_index column (part of the file name: files of layout 1 are packed again)


def iter_documents(
    corpus, tokenizer, text_field: str, noise_field: str | None = None, start: int = 0, stop: int | None = None
):
    """(token ids, noise tags or None) per document of `corpus[start:stop]`, tokenised in batches."""
    stop = len(corpus) if stop is None else stop
    for lo in range(start, stop, BATCH_DOCS):
        batch = corpus[lo : min(lo + BATCH_DOCS, stop)]
        yield from tokenize_documents(tokenizer, batch[text_field], batch[noise_field] if noise_field else None)


def iter_completion_documents(corpus, tokenizer, prompt_field: str, completion_field: str):
    """(token ids, completion tags) per prompt/completion pair: prompt + completion tokenised as one text
    (so the boundary tokenises as it reads), a token tagged 1 where its characters are the completion's."""
    for lo in range(0, len(corpus), BATCH_DOCS):
        batch = corpus[lo : min(lo + BATCH_DOCS, len(corpus))]
        prompts, completions = batch[prompt_field], batch[completion_field]
        spans = [[[len(p), len(p) + len(c)]] for p, c in zip(prompts, completions)]
        yield from tokenize_documents(tokenizer, [p + c for p, c in zip(prompts, completions)], spans)


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

    @property
    def num_documents(self) -> int:
        """Documents in the corpus packed here (some may lie wholly inside a row another document opens)."""
        return int(self.table.schema.metadata[b"documents"])

    def documents(self) -> np.ndarray:
        """Per row, the index of the corpus document that holds its first token (non-decreasing)."""
        return self.table.column("doc_index").to_numpy()


def sample_rows(documents: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` rows spread evenly across documents, the same for the same inputs.

    `documents[i]` is row i's document. The documents are visited in a seeded random order, taking one
    not yet taken row of each (a seeded random one) per round, so that every document gives
    floor(size / documents) or one more rows, up to the rows it has. All rows when size >= len(documents).
    Used for the held-out sample of training (`train.eval_batches`) and `slm eval`'s `max_batches`.
    """
    n = len(documents)
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, n])
    docs, doc_of_row = np.unique(documents, return_inverse=True)
    doc_order = rng.permutation(len(docs))[doc_of_row]  # each row's document's place in the visiting order
    by_doc = np.lexsort((rng.random(n), doc_of_row))  # rows grouped by document, shuffled inside each
    first_of_doc = np.searchsorted(doc_of_row[by_doc], np.arange(len(docs)))
    round_of = np.empty(n, dtype=np.int64)
    round_of[by_doc] = np.arange(n) - first_of_doc[doc_of_row[by_doc]]  # 0 for a document's first pick, ...
    return np.sort(np.lexsort((doc_order, round_of))[:size])


def packed_corpus(cfg: CorpusConfig, tokenizer, tokenizer_dir: str, seq_len: int, cache_dir: str | Path) -> PackedRows:
    """Pack `cfg` into `cache_dir/packed-<fingerprint>.arrow` unless it is already there."""
    key = sha256_json(
        {
            "corpus": corpus_fingerprint(cfg),
            "tokenizer": tokenizer_fingerprint(tokenizer_dir),
            "seq_len": seq_len,
            "layout": LAYOUT,
        }
    )[:16]
    path = Path(cache_dir) / f"packed-{key}.arrow"
    if path.is_file():
        return PackedRows(path)
    corpus = load_corpus(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    field = pa.list_(pa.int32(), seq_len)
    schema = pa.schema(
        [("input_ids", field), ("loss_mask", pa.list_(pa.int8(), seq_len)), ("doc_index", pa.int64())],
        metadata={"documents": str(len(corpus))},
    )
    n_rows = 0
    with atomic_open(path) as f, pa.ipc.new_stream(f, schema) as stream:
        buffer: list = []
        doc_index: list[int] = []

        def flush():
            ids = np.array([r.input_ids for r in buffer], dtype=np.int32)
            mask = np.array([r.loss_mask for r in buffer], dtype=np.int8)
            if cfg.completion_field is not None:  # 0 padding, 1 prompt, 2 completion
                mask += np.array([r.noise for r in buffer], dtype=np.int8)
            stream.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len),
                        pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq_len),
                        pa.array(doc_index, pa.int64()),
                    ],
                    schema=schema,
                )
            )
            buffer.clear()
            doc_index.clear()

        if cfg.completion_field is None:
            docs = iter_documents(corpus, tokenizer, cfg.text_field)
        else:
            docs = iter_completion_documents(corpus, tokenizer, cfg.text_field, cfg.completion_field)
        rows = pack_documents(docs, seq_len, tokenizer.eos_token_id, pad_id, cfg.packing)
        for row, documents in token_documents(rows):
            doc_index.append(int(documents[0]))  # the document of the row's first token
            buffer.append(row)
            n_rows += 1
            if len(buffer) == 1024:
                flush()
        if buffer:
            flush()
        if n_rows == 0:  # raised inside: the partial file is removed
            raise SlmError(f"corpus.path {cfg.path!r}: no tokens after tokenisation")
    return PackedRows(path)
