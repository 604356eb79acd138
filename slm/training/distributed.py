"""Process-group set-up for DeepSpeed: one process without a launcher, or under deepspeed/torchrun."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    Without a launcher, the env:// rendezvous variables are set for a world of one; otherwise
    DeepSpeed would try MPI discovery and fail on a missing mpi4py. DeepSpeed's CPU op is built first, in this
    environment's extension folder (`slm.training.extensions`).
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    from slm.training.extensions import prepare_deepspeed_ops

    prepare_deepspeed_ops()  # the CPU op built once per environment; a dead build's lock cleared, not waited on
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(value: int | float) -> float:
    """Sum of a Python number over all ranks (the number itself in a world of one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(value)], dtype=torch.float64, device=device())
        dist.all_reduce(t)
        return float(t.item())
    return value


def all_reduce_tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks, left on its device (no host sync; the tensor itself in a world of one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t
