"""Scoring rows with a reference (and optional base) model: per-token losses in bounded memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from slm.data.packing import PackedRow
from slm.errors import SlmError
from slm.io import sha256_files
from slm.token_loss import token_losses

# backbones that carry state across segments (blocks, windows): attention never spans more than a
# segment and RoPE is computed per position, so max_position_embeddings is nominal, not a limit
STREAMING_MODEL_TYPES = ("slm_infini", "slm_megalodon", "slm_fam", "slm_beacon")


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a checkpoint's weight files (safetensors or bin)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return sha256_files(files) if files else ""


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


def _batched(rows: Iterable[PackedRow], size: int) -> Iterator[list[PackedRow]]:
    batch: list[PackedRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def score_rows(
    rows: Iterable[PackedRow],
    reference,
    batch_size: int,
    chunk_tokens: int,
    first_sequence_id: int,
    base=None,
    device: torch.device = torch.device("cpu"),
    on_tokens=None,
) -> Iterator[dict]:
    """Batches ready for ShardWriter: ids, masks, document starts, reference (and base) losses.

    Padding positions get NaN losses like position 0: they have no valid score.
    """
    next_id = first_sequence_id
    for batch in _batched(rows, batch_size):
        ids = np.array([r.input_ids for r in batch], dtype=np.int32)
        mask = np.array([r.loss_mask for r in batch], dtype=np.int8)
        x = torch.from_numpy(ids).long().to(device)
        out = {
            "sequence_id": np.arange(next_id, next_id + len(batch), dtype=np.int64),
            "input_ids": ids,
            "loss_mask": mask,
            "doc_starts": [r.doc_starts for r in batch],
        }
        for name, model in (("ref_loss", reference), ("base_loss", base)):
            if model is None:
                continue
            loss = token_losses(model, x, chunk_tokens).float().cpu().numpy()
            loss[mask == 0] = np.nan
            out[name] = loss
        if batch[0].noise is not None:
            out["noise"] = np.array([r.noise for r in batch], dtype=np.int8)
        next_id += len(batch)
        if on_tokens is not None:
            on_tokens(int(mask.sum()))
        yield out
