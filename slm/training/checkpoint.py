"""Checkpoints through DeepSpeed with client state, marked whole only once fully written.

Layout: `<out>/checkpoints/step-00000100/` (DeepSpeed's files), one `rng-rankNNNNN.pt` per rank
(each rank's torch, CUDA, numpy and Python generator states: DeepSpeed's client state is written
by rank 0 only), and `slm-complete.json` written atomically by rank 0 after every rank has saved.
`--resume auto` takes the newest directory with that marker; a crash mid-save leaves a directory
without it, which is ignored.

Untrusted files: every `.pt` file of a checkpoint is read with `torch.load(weights_only=True)`
(`safe_torch_load`; DeepSpeed's own reads are routed through it by `guard_checkpoint_reads`), so a
checkpoint folder is data, never code: a pickle that names any callable outside tensors, plain
containers and the few DeepSpeed state classes in `TRUSTED_GLOBALS` is refused with one line and
never run. The RNG files hold tensors and plain numbers only (`rng_state`).

Reading a checkpoint's weights without DeepSpeed (token dynamics over a run's checkpoints, the SLM-vs-CLM
bench): `load_deepspeed_weights` copies a ZeRO 0-2 checkpoint's module state into a model of the same
architecture; ZeRO-3 (partitioned weights) is refused with the way to consolidate it.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError, describe
from slm.training.distributed import barrier, rank
from slm.utils.io import atomic_open, atomic_write_json, read_json

MARKER = "slm-complete.json"


# Classes in DeepSpeed's own checkpoint files (ZeRO 1-3 optimizer states: loss scaler, the fp32
# fragment map, the ZeRO stage enum) that the weights-only unpickler may rebuild: plain data holders
# and an enum, restored by setting attributes, never by calling code named in the file.
TRUSTED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


class UntrustedCheckpoint(SlmError):
    """A checkpoint file that is not tensors and plain data (a foreign or altered pickle): refused, never run."""


def _trusted_globals() -> list:
    found = []
    for name in TRUSTED_GLOBALS:
        module, _, attr = name.rpartition(".")
        # another DeepSpeed version: a class it lacks, it cannot have written
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    return found


def safe_torch_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)`: tensors, containers, numbers and strings (and `TRUSTED_GLOBALS`).

    A pickle that would import or call anything else raises `UntrustedCheckpoint` naming the file and the
    global it asked for; nothing in it runs. A damaged or non-torch file is an SlmError too."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_trusted_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SlmError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it asks to run {found.group(1)}" if found else "it holds pickle content other than tensors and data"
        raise UntrustedCheckpoint(
            f"{path}: refused to load: {what}; slm reads checkpoints with torch.load(weights_only=True) and never "
            f"runs code from them; this file was not written by slm (or was altered): delete it, or rerun with --force "
            f"to start over"
        ) from None
    except Exception as e:  # noqa: BLE001 -- truncated, not a torch file, ...
        raise SlmError(f"{path}: could not be read as a torch checkpoint ({describe(e)}); rerun with --force") from None


def guard_checkpoint_reads(engine) -> None:
    """Route every file DeepSpeed's `load_checkpoint` reads through `safe_torch_load` (it uses weights_only=False)."""

    def load(path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    engine.checkpoint_engine.load = load


def rng_state() -> dict:
    """This process's torch, CUDA, numpy and Python generator states as tensors and plain numbers only
    (what `torch.load(weights_only=True)` reads back); `set_rng_state` restores them."""
    np_state = np.random.get_state(legacy=False)  # the global RandomState: MT19937 key, position, cached gaussian
    version, words, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: Path | None = None) -> None:
    try:
        n, py = state["numpy"], state["python"]
        numpy_state = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        python_state = (py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"])
        torch_state = state["torch"]
    except (KeyError, TypeError, AttributeError) as e:
        raise SlmError(
            f"{where}: not a random-generator state written by this slm ({describe(e)}); rerun with --force"
        ) from None
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
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
    guard_checkpoint_reads(engine)
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=latest.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise SlmError(f"{latest}: DeepSpeed could not load this checkpoint")
    own = rng_file(latest, rank())
    if not own.is_file():
        raise SlmError(
            f"{latest}: no random-generator state for rank {rank()} ({own.name}); "
            "was it saved with fewer ranks? resume with the same number of ranks"
        )
    set_rng_state(safe_torch_load(own), own)
    return client


# --------------------------------------------------------------------------- a checkpoint's weights, without DeepSpeed

DS_MODEL_STATES = "mp_rank_00_model_states.pt"


def deepspeed_model_file(tag_dir: str | Path) -> Path:
    """`<tag>/mp_rank_00_model_states.pt` of a ZeRO 0-2 checkpoint; a clear error for ZeRO-3."""
    tag_dir = Path(tag_dir)
    path = tag_dir / DS_MODEL_STATES
    if path.is_file():
        return path
    if any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        raise SlmError(_zero3_message(tag_dir))
    raise SlmError(f"{tag_dir}: no DeepSpeed model states ({DS_MODEL_STATES}); not a DeepSpeed checkpoint directory")


def _zero3_message(tag_dir: Path) -> str:
    return (
        f"{tag_dir}: a ZeRO-3 checkpoint (weights partitioned across ranks) is not supported; "
        "consolidate it with DeepSpeed's zero_to_fp32.py (saved beside the checkpoints), "
        "add the run's model/config.json, and pass those directories as checkpoints"
    )


def load_module_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> torch.nn.Module:
    """Copy a full module state dict into `model` (dtype cast as needed); every key must match.

    A key the state lacks is accepted only when it is tied to one it has (DeepSpeed saves
    `module.state_dict()` with both names of a tied embedding; HF exports drop one)."""
    own = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k in own if k not in state and not any(o in state for o in by_storage[own[k].data_ptr()])]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SlmError(
            f"{where}: weights do not fit the architecture: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; "
            "is the architecture the run's own model?"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            if v.numel() == 0:
                raise SlmError(_zero3_message(Path(where).parent))
            raise SlmError(f"{where}: {k} has shape {list(v.shape)}, the architecture expects {list(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model


def load_deepspeed_weights(model: torch.nn.Module, tag_dir: str | Path) -> torch.nn.Module:
    """Load a DeepSpeed ZeRO 0-2 checkpoint's module weights (`<tag>/mp_rank_00_model_states.pt`,
    key `module`) into `model`, an instance of the same architecture. Returns `model`.

    The file is read with torch.load(weights_only=True) (`safe_torch_load`): a pickle that would run code
    is refused. With bf16 training the module weights are the bf16 copies (the fp32 masters live in the
    optimizer states)."""
    path = deepspeed_model_file(tag_dir)
    state = safe_torch_load(path, map_location="cpu", mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise SlmError(f"{path}: no 'module' state dict in this DeepSpeed checkpoint")
    zero = ((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    if zero == 3:
        raise SlmError(_zero3_message(Path(tag_dir)))
    if int(state.get("mp_world_size", 1) or 1) > 1:
        raise SlmError(f"{path}: model-parallel checkpoints (mp_world_size={state['mp_world_size']}) are not supported")
    return load_module_weights(model, state["module"], path)
