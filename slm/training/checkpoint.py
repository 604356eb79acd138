"""Checkpoints through DeepSpeed with client state, marked whole only once fully written.

Layout: `<out>/checkpoints/step-00000100/` (DeepSpeed's files), one `rng-rankNNNNN.pt` per rank
(each rank's torch, CUDA, numpy and Python generator states: DeepSpeed's client state is written
by rank 0 only), and `slm-complete.json` written atomically by rank 0 after every rank has saved.
`--resume auto` takes the newest directory with that marker; a crash mid-save leaves a directory
without it, which is ignored.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError
from slm.io import atomic_open, atomic_write_json, read_json
from slm.training.distributed import barrier, rank

MARKER = "slm-complete.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(checkpoint: Path, rank_: int) -> Path:
    return checkpoint / f"rng-rank{rank_:05d}.pt"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def whole_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / MARKER).is_file())


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    with atomic_open(rng_file(ckpt_dir / tag, rank())) as f:
        torch.save(rng_state(), f)
    barrier()
    if rank() == 0:
        atomic_write_json(ckpt_dir / tag / MARKER, {"step": step, "fingerprints": client_state["fingerprints"]})
        for old in whole_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_dir / tag


def check_fingerprints(saved: dict, current: dict, where: Path) -> None:
    """Refuse a checkpoint of another run: name every fingerprint that differs."""
    diffs = [
        f"{k} ({saved.get(k, 'absent')!s:.12} in checkpoint vs {current[k]!s:.12} now)"
        for k in current
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise SlmError(
            f"{where}: checkpoint belongs to another run; differs in "
            + ", ".join(diffs)
            + "; use --force to start over"
        )


def load_latest(engine, ckpt_dir: Path, fingerprints: dict) -> dict | None:
    """Restore the newest whole checkpoint into `engine`; its client state, or None if there is none."""
    found = whole_checkpoints(ckpt_dir)
    if not found:
        return None
    latest = found[-1]
    check_fingerprints(read_json(latest / MARKER)["fingerprints"], fingerprints, latest)
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=latest.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise SlmError(f"{latest}: DeepSpeed could not load this checkpoint")
    own = rng_file(latest, rank())
    if own.is_file():
        set_rng_state(torch.load(own, weights_only=False))
    elif "rng" in client:  # written before the per-rank files: rank 0's state, shared by all ranks
        set_rng_state(client["rng"])
    else:
        raise SlmError(
            f"{latest}: no random-generator state for rank {rank()} ({own.name}); "
            "was it saved with fewer ranks? resume with the same number of ranks"
        )
    return client
