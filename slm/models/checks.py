"""Checks between a model and the tokenizer or shards it is used with."""

from __future__ import annotations

from slm.errors import SlmError


def check_vocab(model, tokenizer, tokenizer_name: str) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if model_vocab < len(tokenizer):
        raise SlmError(
            f"vocabulary mismatch: tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens, "
            f"the model's embedding has {model_vocab}; use the tokenizer the model was trained with"
        )
