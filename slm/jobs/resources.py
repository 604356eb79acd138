"""The Slurm resources of one stage: the pipeline's top-level `slurm:` mapping merged with the
stage's own `slurm:` (the stage wins), validated like every other config (unknown keys are errors).

    slurm:                       # pipeline defaults
      partition: gpu
      account: my-project
      time: "12:00:00"
      env_setup: ["module load cuda/12.4", "source ~/venvs/slm/bin/activate"]
    stages:
      - name: score
        slurm: {array_parts: 16, array_concurrency: 4, gpus_per_node: 1}
      - name: pretrain
        slurm: {nodes: 4, gpus_per_node: 8, cpus_per_task: 64, launcher: deepspeed}
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from slm.config import StrictModel, format_validation_error
from slm.errors import SlmError

TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$")  # Slurm's MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
MEM_RE = re.compile(r"^\d+[KMGT]?$")


class SlurmResources(StrictModel):
    """What one stage asks of Slurm. Training stages (reference, pretrain) use `nodes` and a
    launcher; scoring runs as a job array of `array_parts` tasks; every other stage is one task."""

    partition: str | None = Field(None, description="sbatch --partition.")
    account: str | None = Field(None, description="sbatch --account.")
    time: str | None = Field(None, description="Wall-clock limit: MM, HH:MM:SS or D-HH:MM:SS.")
    nodes: int = Field(1, ge=1, description="Nodes of a training stage (reference, pretrain); other stages use one.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (per array task for scoring); 0: CPU only.")
    cpu_ranks_per_node: int = Field(1, ge=1, description="Data-parallel ranks per node when gpus_per_node is 0.")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per node of a training stage, per task otherwise.")
    mem: str | None = Field(None, description="Memory per node, e.g. 64G (sbatch --mem).")
    array_parts: int = Field(
        1, ge=1, description="Scoring only: the corpus is split into this many array tasks (--part/--parts)."
    )
    array_concurrency: int | None = Field(
        None, ge=1, description="Scoring only: at most this many array tasks at once (--array=...%C)."
    )
    launcher: Literal["deepspeed", "torchrun"] = Field(
        "deepspeed", description="Launcher of the training ranks on each node."
    )
    master_port: int | None = Field(
        None, ge=1024, le=65535, description="Rendezvous port; default: 20000 + job id mod 20000."
    )
    signal_seconds: int | None = Field(
        300,
        ge=10,
        le=65535,
        description="Training and scoring: Slurm signals the job this many seconds before its time limit "
        "(--signal=B:USR1@SECONDS); the stage stops at a safe point (a whole checkpoint, whole shards) and the job "
        "requeues itself. null: no early signal.",
    )
    requeue: bool = Field(
        True,
        description="--requeue: a signalled, preempted or node-failed job goes back to the queue and continues from "
        "its checkpoint or whole shards (logs append). false: --no-requeue; resubmit with `slm jobs submit`.",
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="More sbatch options, e.g. ['--qos=high', '--exclusive']."
    )
    env_setup: list[str] | None = Field(
        None,
        description="Shell lines run before the stage (module load, venv activate). "
        "Default: put this Python's bin dir on PATH.",
    )

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        if v is not None and not TIME_RE.match(str(v)):
            raise ValueError("expected MM, HH:MM:SS or D-HH:MM:SS")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v):
        if v is not None and not MEM_RE.match(str(v)):
            raise ValueError("expected a size like 4000, 64G or 512M")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, v: list[str]):
        out = []
        for line in v:
            line = line.strip().removeprefix("#SBATCH").strip()
            if not line.startswith("-") or "\n" in line:
                raise ValueError(f"{line!r}: expected one sbatch option such as --qos=high")
            out.append(line)
        return out

    def setup_lines(self) -> list[str]:
        if self.env_setup is not None:
            return list(self.env_setup)
        return [f'export PATH="{Path(sys.executable).parent}:$PATH"']

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_ranks_per_node


def stage_resources(slurm: dict, stage: str, source: str) -> SlurmResources:
    """Validate a stage's merged `slurm:` mapping; a typo becomes one line naming file, stage and key."""
    try:
        return SlurmResources.model_validate(slurm or {})
    except ValidationError as e:
        raise SlmError(format_validation_error(e, f"{source}: stage {stage!r} slurm")) from None
