"""Scoring rows with a reference (and optional base) model: per-token losses in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from slm.data.packing import PackedRow
from slm.io import sha256_files
from slm.token_loss import token_losses


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a checkpoint's weight files (safetensors or bin)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return sha256_files(files) if files else ""


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
