"""Checks between a model and the tokenizer and sequence length it is used with."""

from __future__ import annotations

from pathlib import Path

from slm.data.tokenizer import tokenizer_fingerprint
from slm.errors import SlmError

# backbones that carry state across segments (blocks, windows): attention never spans more than a
# segment and RoPE is computed per position, so max_position_embeddings is nominal, not a limit
STREAMING_MODEL_TYPES = ("slm_infini", "slm_megalodon", "slm_fam", "slm_beacon")


def check_vocab(model, tokenizer, tokenizer_name: str) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if model_vocab < len(tokenizer):
        raise SlmError(
            f"vocabulary mismatch: tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens, "
            f"the model's embedding has {model_vocab}; use the tokenizer the model was trained with"
        )


def check_tokenizer_matches(tokenizer_dir: str, model_dir: str, what: str) -> bool:
    """`tokenizer_dir` must be the tokenizer the model in `model_dir` was trained with (their files' sha256); True
    when the model's folder ships a tokenizer to compare, False when it ships none."""
    if (Path(model_dir) / "tokenizer.json").is_file() or (Path(model_dir) / "tokenizer_config.json").is_file():
        mine, theirs = tokenizer_fingerprint(tokenizer_dir), tokenizer_fingerprint(model_dir)
        if mine != theirs:
            raise SlmError(
                f"tokenizer {tokenizer_dir!r} (sha256 {mine[:12]}) "
                f"is not the tokenizer of {what} {model_dir!r} (sha256 {theirs[:12]})"
            )
        return True
    return False


def check_tokenizer_fits(model, tokenizer, tokenizer_dir: str, model_dir: str, what: str) -> None:
    """Without tokenizer files beside the model, its embedding is the only witness: beyond `check_vocab` (every token
    id has a row), the rows no token reaches must be no more than padding explains (embeddings are padded to a
    multiple of 64-256, or for tensor parallelism): at most max(256, 2%) of them."""
    rows, tokens = model.get_input_embeddings().weight.shape[0], len(tokenizer)
    allowed = max(256, rows // 50)
    if rows - tokens > allowed:
        raise SlmError(
            f"tokenizer {tokenizer_dir!r} has {tokens} tokens, the embedding of {what} {model_dir!r} has {rows} rows: "
            f"{rows - tokens} rows no token reaches, more than padding explains (at most {allowed}); "
            f"it is not the tokenizer the model was trained with"
        )


def check_seq_len(config, seq_len: int, where: str, model: str) -> str | None:
    """`seq_len` against the model's `max_position_embeddings`: an SlmError past it, unless the model is built for
    longer inputs: a streaming backbone, or RoPE scaling (yarn, longrope, dynamic, ...); then a warning to show."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or seq_len <= limit:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    scaling = sorted({r.get("rope_type", r.get("type", "default")) for r in per_layer} - {"default"})
    said = f"{where}={seq_len} exceeds max_position_embeddings={limit} of {model}"
    if config.model_type in STREAMING_MODEL_TYPES:
        return f"{said}; allowed: {config.model_type} carries state across segments and attends within one"
    if scaling:
        return f"{said}; allowed with RoPE scaling {'/'.join(scaling)}, but positions past {limit} were not trained"
    raise SlmError(
        f"{said}: positions past {limit} were never trained; use {where} <= {limit}, or a model with a "
        f"larger max_position_embeddings or RoPE scaling (model.rope_scaling)"
    )
