"""How many threads torch uses in a stage: what the job was given, shared by the ranks on this host.

torch's default is one thread per core of the machine, whatever the job was given. On a shared machine (another
training process, other users, a Slurm allocation of a few CPUs on a large node) that oversubscribes the cores and
every step waits on the slowest thread: on the 2-core development machine, with another torch process running,
a small reference run took 3.5-8.5 s per step with torch's default (2 threads) and 1.4 s with one (README, Threads).

The number, in order of precedence:
1. the stage's setting (`train.threads` for reference, finetune and pretrain; `threads` for score and eval);
2. `OMP_NUM_THREADS` when it is set (a user's or a job script's explicit choice; `slm jobs` sets it);
3. what the job was given, `SLURM_CPUS_PER_TASK` (at most the CPUs the process may run on) or else the process's
   CPU affinity (`os.sched_getaffinity`: taskset, cgroup cpusets, Slurm's task binding), divided by the ranks
   that a launcher started on this host (`LOCAL_WORLD_SIZE` from torchrun, `LOCAL_SIZE` from deepspeed).

`apply_threads` sets it with `torch.set_num_threads` at the start of the stage, before the stage builds a model
or tokenises, and returns what goes into `stage.json` (`threads`, `threads_from`). It is a runtime setting: it is
left out of the config fingerprint, so changing it neither redoes a finished stage nor refuses a checkpoint.
"""

from __future__ import annotations

import os

from slm.errors import SlmError


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SlmError(f"environment variable {name}={raw!r}: expected a whole number of threads >= 1")
    return value


def local_ranks() -> int:
    """Processes a launcher started on this host for this job (1 without a launcher)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return _positive_int(name, os.environ[name])
    return 1


def job_cpus() -> tuple[int, str]:
    """The CPUs this process was given, and where that number comes from."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        given = _positive_int("SLURM_CPUS_PER_TASK", os.environ["SLURM_CPUS_PER_TASK"])
        return min(given, affinity), f"SLURM_CPUS_PER_TASK={given}"
    return affinity, f"CPU affinity ({affinity} CPUs)"


def resolve_threads(configured: int | None, key: str) -> tuple[int, str]:
    """(threads, where the number comes from) for a stage whose setting `key` holds `configured`."""
    if configured is not None:
        return configured, f"{key}={configured}"
    if os.environ.get("OMP_NUM_THREADS"):
        return _positive_int("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus, source = job_cpus()
    ranks = local_ranks()
    if ranks == 1:
        return cpus, source
    return max(1, cpus // ranks), f"{source} / {ranks} local ranks"


def apply_threads(configured: int | None, key: str) -> dict:
    """Set torch's thread count for this stage (see the module docstring); the record for stage.json."""
    import torch

    threads, source = resolve_threads(configured, key)
    torch.set_num_threads(threads)
    return {"threads": threads, "threads_from": source}
