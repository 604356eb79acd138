"""Packing documents into fixed `seq_len` rows, EOS after every document.

Each row records where documents start inside it (`doc_starts`), so that document boundaries
survive packing. The last row is padded with `pad_id` and its `loss_mask` is 0 on padding.

`packing` (CorpusConfig.packing):
- concat: documents follow each other and rows are cut every `seq_len` tokens.
- whole: every document that fits in a row stays within one row: a document that would cross the end
  of the current row starts the next one instead, and the rest of the row is padding (loss_mask 0).
  Retrieval documents need it: a pass key split from its question teaches nothing.
- single: one document per row, the rest padding (as supervised fine-tuning sets are batched). No
  other document shares its context: with `whole`, a row of several pass-key documents asks for the
  last key with earlier ones in view, and a model learning to copy has to learn to ignore them too.
A document longer than a row is still split, in every mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRow:
    input_ids: list[int]
    loss_mask: list[int]
    doc_starts: list[int]  # positions in the row where a document begins
    noise: list[int] | None = None
    extras: dict = field(default_factory=dict)


def pack_documents(
    docs: Iterable[tuple[list[int], list[int] | None]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    packing: str = "concat",
) -> Iterator[PackedRow]:
    """docs: (token ids, optional per-token noise tags). Yields rows of exactly `seq_len` tokens."""
    if packing not in ("concat", "whole", "single"):
        raise ValueError(f"packing {packing!r}: expected concat, whole or single")
    ids: list[int] = []
    noise: list[int] = []
    starts: list[int] = []
    has_noise = None

    def padded_row() -> PackedRow:
        pad = seq_len - len(ids)
        return PackedRow(
            input_ids=ids + [pad_id] * pad,
            loss_mask=[1] * len(ids) + [0] * pad,
            doc_starts=starts,
            noise=(noise + [0] * pad) if has_noise else None,
        )

    for doc_ids, doc_noise in docs:
        if has_noise is None:
            has_noise = doc_noise is not None
        crosses = len(ids) + len(doc_ids) + 1 > seq_len  # it would cross the row's end
        if ids and (packing == "single" or (packing == "whole" and crosses)):  # start the next row
            yield padded_row()
            ids, noise, starts = [], [], []
        starts.append(len(ids))
        ids.extend(doc_ids)
        ids.append(eos_id)
        if has_noise:
            noise.extend(doc_noise)
            noise.append(0)
        while len(ids) >= seq_len:
            yield PackedRow(
                input_ids=ids[:seq_len],
                loss_mask=[1] * seq_len,
                doc_starts=[s for s in starts if s < seq_len],
                noise=noise[:seq_len] if has_noise else None,
            )
            ids, noise = ids[seq_len:], noise[seq_len:]
            starts = [s - seq_len for s in starts if s >= seq_len]
    if ids:
        yield padded_row()


def token_documents(rows: Iterable[PackedRow], first: int = 0) -> Iterator[tuple[PackedRow, np.ndarray]]:
    """Each row of `pack_documents` with, per token, the index of the document holding it (documents numbered in
    packing order from `first`; -1 on padding). A document's EOS is its own; a row's tokens before its first
    `doc_starts` entry continue the last document begun in the rows before."""
    started = first  # documents begun so far
    for row in rows:
        starts = np.asarray(row.doc_starts, dtype=np.int64)
        at = np.searchsorted(starts, np.arange(len(row.input_ids)), side="right")  # starts at or before t
        yield row, np.where(np.asarray(row.loss_mask) != 0, started - 1 + at, -1)
        started += len(starts)


def noise_tags_from_spans(
    offsets: list[tuple[int, int]], spans: list[list[int]], codes: list[int] | None = None
) -> list[int]:
    """Per token, the code of the noise span holding its character midpoint (default 1), else 0."""
    if not spans:
        return [0] * len(offsets)
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    spans = [spans[i] for i in order]
    codes = [1] * len(spans) if codes is None else [codes[i] for i in order]
    tags, j = [], 0
    for start, end in offsets:
        mid = (start + end - 1) / 2 if end > start else start
        while j < len(spans) and spans[j][1] <= mid:
            j += 1
        tags.append(codes[j] if j < len(spans) and spans[j][0] <= mid < spans[j][1] else 0)
    return tags


def tokenize_documents(
    tokenizer, texts: list[str], noise_spans: list | None = None, span_codes: list | None = None
) -> list[tuple[list[int], list[int] | None]]:
    """Batch-tokenise texts (no special tokens); with noise spans, tag each token (1, or its span's code)."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=noise_spans is not None)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        tags = None
        if noise_spans is not None:
            tags = noise_tags_from_spans(
                enc["offset_mapping"][i], noise_spans[i] or [], span_codes[i] if span_codes is not None else None
            )
        out.append((ids, tags))
    return out
