"""Thread control: a stage's `threads`, else OMP_NUM_THREADS, else what the job was given divided by the local
ranks; set before the stage's torch work, recorded in stage.json, never part of the config fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slm.errors import SlmError
from slm.stages import reference
from slm.threads import resolve_threads

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_precedence_setting_then_omp_then_slurm_then_affinity(no_thread_env):
    env = no_thread_env
    assert resolve_threads(None, "threads") == (AFFINITY, f"CPU affinity ({AFFINITY} CPUs)")
    env.setenv("SLURM_CPUS_PER_TASK", "1")
    assert resolve_threads(None, "threads") == (1, "SLURM_CPUS_PER_TASK=1")
    env.setenv("SLURM_CPUS_PER_TASK", "512")  # never more than the CPUs the process may run on
    assert resolve_threads(None, "threads") == (AFFINITY, "SLURM_CPUS_PER_TASK=512")
    env.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None, "threads") == (3, "OMP_NUM_THREADS")
    assert resolve_threads(5, "train.threads") == (5, "train.threads=5")


def test_the_cpus_are_shared_by_the_local_ranks(no_thread_env):
    env = no_thread_env
    env.setenv("SLURM_CPUS_PER_TASK", "8")
    env.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    cpus = min(8, AFFINITY)
    assert resolve_threads(None, "t") == (max(1, cpus // 2), "SLURM_CPUS_PER_TASK=8 / 2 local ranks")
    env.delenv("LOCAL_WORLD_SIZE")
    env.setenv("LOCAL_SIZE", str(4 * AFFINITY))  # the deepspeed launcher; more ranks than CPUs: one each
    assert resolve_threads(None, "t")[0] == 1


def test_bad_environment_values_are_one_line_errors(no_thread_env):
    no_thread_env.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(SlmError, match=r"environment variable OMP_NUM_THREADS='two': expected a whole number"):
        resolve_threads(None, "threads")
    no_thread_env.setenv("OMP_NUM_THREADS", "")
    no_thread_env.setenv("SLURM_CPUS_PER_TASK", "0")
    with pytest.raises(SlmError, match=r"SLURM_CPUS_PER_TASK='0'"):
        resolve_threads(None, "threads")


def test_cpu_affinity_of_a_real_process_is_what_it_was_given():
    code = "import os; os.sched_setaffinity(0, {0}); from slm.threads import resolve_threads as r; print(r(None, 'x'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1, 'CPU affinity (1 CPUs)')"


def test_a_stage_trains_with_its_threads_and_records_them_outside_the_fingerprint(tiny_reference_cfg, monkeypatch):
    import slm.stages.reference as stage

    seen, plain_step = [], stage.causal_lm_step

    def counting_step(model, batch):
        seen.append(torch.get_num_threads())
        return plain_step(model, batch)

    monkeypatch.setattr(stage, "causal_lm_step", counting_step)
    try:
        cfg = tiny_reference_cfg("threads", max_steps=2, threads=2)
        record = reference.run(cfg)
    finally:
        torch.set_num_threads(1)
    assert seen and set(seen) == {2}
    saved = json.loads((Path(cfg.out_dir) / "stage.json").read_text())
    assert saved["metrics"]["threads"] == 2 and saved["metrics"]["threads_from"] == "train.threads=2"
    assert saved["config"]["train"]["threads"] == 2
    # another thread count is the same run: skipped, not refused as another config
    again = reference.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": 1})}))
    assert again == record
