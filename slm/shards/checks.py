"""Checks of token-score shards against the pretraining run that reads them, before its first step: the shards'
seq_len, tokenizer and vocabulary are the run's, and its selection can keep at least one token."""

from __future__ import annotations

import numpy as np

from slm.config import PretrainConfig
from slm.data.tokenizer import tokenizer_fingerprint
from slm.errors import SlmError
from slm.selection import REFERENCE_FREE
from slm.shards.format import fixed_list_to_numpy
from slm.shards.reader import ShardSet


def check_shards_match(shards: ShardSet, cfg: PretrainConfig, tokenizer_dir: str, vocab: int) -> None:
    """The shards were scored at the run's train.seq_len with its tokenizer (sha256) and vocabulary; mode=static
    also needs their base_loss column."""
    meta, where = shards.metadata, cfg.shards
    if cfg.train.seq_len != meta.seq_len:
        raise SlmError(
            f"{where}: shards have seq_len {meta.seq_len}, train.seq_len is {cfg.train.seq_len}; "
            f"set train.seq_len={meta.seq_len}"
        )
    mine = tokenizer_fingerprint(tokenizer_dir)
    if mine != meta.tokenizer_sha256:
        raise SlmError(
            f"{where}: shards were scored with tokenizer sha256 {meta.tokenizer_sha256[:12]}, "
            f"tokenizer {tokenizer_dir!r} has {mine[:12]}"
        )
    if vocab != meta.vocab_size:
        raise SlmError(f"{where}: shards have vocab_size {meta.vocab_size}, tokenizer {tokenizer_dir!r} has {vocab}")
    if cfg.selection.mode == "static" and "base_loss" not in shards.columns:
        raise SlmError(f"{where}: selection.mode=static needs base_loss in the shards; score with base_model set")


def check_something_to_learn(shards: ShardSet, cfg: PretrainConfig) -> None:
    """A run whose selection can keep no token learns nothing (loss 0 at every step): refuse it before the first step.

    Valid tokens are loss_mask 1 with a finite ref_loss (and base_loss for mode=static), past position 0, which has no
    context. The manifest bounds them: at least tokens - nan_tokens - rows; when that is not positive, count them.
    """
    t = shards.manifest.totals()
    free = cfg.selection.mode in REFERENCE_FREE  # no reference loss enters: a NaN one does not matter
    if cfg.selection.mode != "static" and t["tokens"] - (0 if free else t["nan_tokens"]) - t["rows"] > 0:
        return
    cols = ("loss_mask",) + (() if free else ("ref_loss",)) + (("base_loss",) if cfg.selection.mode == "static" else ())
    for name in shards.names:
        table = shards.table(name)
        mask, *scores = (fixed_list_to_numpy(table.column(c), shards.seq_len)[:, 1:] for c in cols)
        if (mask.astype(bool) & np.logical_and.reduce([np.isfinite(s) for s in scores])).any():
            return
    if free:
        raise SlmError(f"{cfg.shards}: no token can be trained on: every position past the first is masked")
    scored = "base_loss and ref_loss" if cfg.selection.mode == "static" else "ref_loss"
    raise SlmError(
        f"{cfg.shards}: no token can be trained on: of {t['tokens']} tokens in {t['rows']} rows none has "
        f"loss_mask 1 and a finite {scored} (all NaN, or every position masked); rescore the shards with `slm score`"
    )
