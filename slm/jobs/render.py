"""`slm jobs render`: one sbatch script per stage of a pipeline, written into an output folder.

The folder holds a frozen copy of the resolved pipeline (`pipeline.yaml`: overrides applied,
`${work_dir}` substituted), one config file per stage (`configs/STAGE.yaml`, what the stage's
own command reads) and one script per stage (`STAGE.sbatch`). A script runs its stage through the
CLI exactly as a user would (`slm reference --config configs/reference.yaml`; the command, and how
the cluster runs each kind, come from the stage registry, `slm.stages.registry`), so later edits to
the user's YAML never change a rendered job.

- an `array` stage (scoring) is a job array: task i runs `slm score --part i --parts N` (N = `array_parts`);
- a `training` stage (reference, finetune, pretrain) is one `srun` task per node, each running the
  DeepSpeed launcher in no-ssh mode (or torchrun with a c10d rendezvous) for the ranks of its node;
  the first host of the allocation is the rendezvous host;
- every other stage is a single task; `stoppable` ones (training, scoring) are asked to stop at a
  safe point ahead of the time limit and requeued.

A stage depends on the earlier stages whose output directories its config names (eval of
pretrain_slm waits for pretrain_slm, not for pretrain_clm); a stage that names none waits for the
stage before it. `slm jobs submit` turns these into `--dependency=afterok:...`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel

from slm.config import dump_config
from slm.errors import SlmError
from slm.jobs.resources import SlurmResources, stage_resources
from slm.pipeline import load_pipeline
from slm.stages.reads import absolute, stage_reads
from slm.stages.registry import get_stage

FROZEN_PIPELINE = "pipeline.yaml"


@dataclass
class RenderedJob:
    stage: str
    kind: str
    cfg: BaseModel  # the stage config exactly as the job reads it
    resources: SlurmResources
    out_dir: Path  # the stage's output directory (absolute)
    script: Path
    config: Path
    log_dir: Path
    job_name: str
    chdir: Path  # relative paths in the pipeline are resolved from here, as `slm run` would
    depends_on: list[str] = field(default_factory=list)  # what it reads, else the stage before it
    reads: list[str] = field(default_factory=list)  # the earlier stages whose output it reads
    parts: int | None = None  # scoring: array tasks in all
    tasks: list[int] | None = None  # scoring: the array tasks this script runs

    @property
    def array(self) -> str | None:
        return array_spec(self.tasks, self.resources.array_concurrency) if self.tasks is not None else None


def array_spec(tasks: list[int], concurrency: int | None = None) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (with '%C' when concurrency is set)."""
    if not tasks:
        raise SlmError("a job array needs at least one task")
    runs, start, prev = [], None, None
    for t in sorted(set(tasks)):
        if start is None:
            start = prev = t
        elif t == prev + 1:
            prev = t
        else:
            runs.append((start, prev))
            start = prev = t
    runs.append((start, prev))
    spec = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return spec + (f"%{concurrency}" if concurrency else "")


def data_dependencies(reads: dict[str, list[str]]) -> dict[str, list[str]]:
    """stage -> the earlier stages it reads from (`stage_reads`); one that reads none waits for the stage before it."""
    names = list(reads)
    return {name: reads[name] or ([names[i - 1]] if i else []) for i, name in enumerate(names)}


def plan_jobs(
    pipeline_path: str | Path | None, out_dir: str | Path, overrides: list[str] | None = None
) -> tuple[dict, str, list[RenderedJob]]:
    """Load and validate the pipeline and every stage's resources; write nothing.
    Returns the resolved pipeline (a valid pipeline YAML mapping), its source file and the jobs."""
    pipeline, stages, path = load_pipeline(pipeline_path, overrides)
    out_dir, cwd = Path(out_dir).resolve(), Path.cwd().resolve()
    dumps = [(s.name, dump_config(s.cfg), s.cfg.out_dir) for s in stages]
    reads = stage_reads(dumps, cwd)
    deps = data_dependencies(reads)
    jobs = []
    for s in stages:
        res = stage_resources(s.slurm, s.name, str(path))
        cfg = s.cfg
        parts = None
        if get_stage(s.kind).array:  # scoring: task i of the array scores part i
            parts = res.array_parts
            cfg = cfg.model_copy(update={"part": 0, "parts": parts})
        jobs.append(
            RenderedJob(
                stage=s.name,
                kind=s.kind,
                cfg=cfg,
                resources=res,
                out_dir=Path(absolute(s.cfg.out_dir, cwd)),
                script=out_dir / f"{s.name}.sbatch",
                config=out_dir / "configs" / f"{s.name}.yaml",
                log_dir=out_dir / "logs",
                job_name=f"slm-{pipeline.name}-{s.name}",
                chdir=cwd,
                depends_on=deps[s.name],
                reads=reads[s.name],
                parts=parts,
                tasks=list(range(parts)) if parts else None,
            )
        )
    return pipeline.model_dump(mode="json"), str(Path(path).resolve()), jobs


def _sbatch_header(job: RenderedJob) -> list[str]:
    r = job.resources
    training = get_stage(job.kind).training
    log = job.log_dir / (f"{job.stage}-%A_%a.out" if job.tasks is not None else f"{job.stage}-%j.out")
    opts = [
        f"--job-name={job.job_name}",
        f"--chdir={job.chdir}",
        f"--output={log}",
        f"--nodes={r.nodes if training else 1}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={r.cpus_per_task}",
    ]
    if r.gpus_per_node:
        opts.append(f"--gpus-per-node={r.gpus_per_node}")
    for key, opt in (("mem", "--mem"), ("time", "--time"), ("partition", "--partition"), ("account", "--account")):
        if getattr(r, key) is not None:
            opts.append(f"{opt}={getattr(r, key)}")
    if job.tasks is not None:
        opts.append(f"--array={job.array}")
    opts += ["--requeue", "--open-mode=append"] if r.requeue else ["--no-requeue"]
    if get_stage(job.kind).stoppable and r.signal_seconds:
        opts.append(f"--signal=B:USR1@{r.signal_seconds}")
    opts += r.extra_sbatch
    return [f"#SBATCH {o}" for o in opts]


def _stage_command(job: RenderedJob) -> str:
    cmd = f"{get_stage(job.kind).command} --config {shlex.quote(str(job.config))}"
    if get_stage(job.kind).array:
        cmd += f' --part "$SLURM_ARRAY_TASK_ID" --parts {job.parts}'
    return cmd


def launcher_command(job: RenderedJob) -> str:
    """The per-node launcher line of a training stage (run once per node by srun)."""
    r, stage_cmd = job.resources, _stage_command(job)
    if r.launcher == "torchrun":
        return (
            f"torchrun --nnodes={r.nodes} --nproc_per_node={r.ranks_per_node} --rdzv_id=$SLURM_JOB_ID "
            f"--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --no-python {stage_cmd}"
        )
    return (
        f"deepspeed --hostfile=$SLM_HOSTFILE --no_ssh --node_rank=$SLURM_NODEID --master_addr=$MASTER_ADDR "
        f"--master_port=$MASTER_PORT --num_nodes={r.nodes} --num_gpus={r.ranks_per_node} "
        f"--no_python --no_local_rank {stage_cmd}"
    )


def script_text(job: RenderedJob, pipeline_source: str) -> str:
    r, stage = job.resources, get_stage(job.kind)
    threads = max(1, r.cpus_per_task // r.ranks_per_node) if stage.training else r.cpus_per_task
    lines = [
        "#!/bin/bash",
        f"# Rendered by `slm jobs` from {pipeline_source}: stage {job.stage!r} ({job.kind}).",
        f"# It runs the stage's command on the frozen config {job.config}.",
        *_sbatch_header(job),
        "",
        "set -euo pipefail",
        "# sbatch exports the submitter's environment: never inherit its process-group rendezvous",
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT",
        f"export OMP_NUM_THREADS={threads}",
        *r.setup_lines(),
        f'echo "slm jobs: stage {job.stage} on $(hostname), job ${{SLURM_JOB_ID}} started $(date -Is)"',
        "",
    ]
    if stage.training:
        port = str(r.master_port) if r.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
        lines += [
            "# rendezvous on the first host of the allocation; one launcher per node",
            'NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
            'export MASTER_ADDR=$(echo "$NODES" | head -n 1)',
            f"export MASTER_PORT={port}",
        ]
        if r.launcher == "deepspeed":  # its no-ssh mode reads the nodes and their slots from a hostfile
            lines += [
                f'export SLM_HOSTFILE="{job.log_dir}/hostfile-{job.stage}-$SLURM_JOB_ID"',
                f'echo "$NODES" | sed "s/$/ slots={r.ranks_per_node}/" > "$SLM_HOSTFILE"',
            ]
        run = [
            f'srun --nodes={r.nodes} --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" '
            "--kill-on-bad-exit=1 \\",
            f"    bash -c {shlex.quote('exec ' + launcher_command(job))}",
        ]
    else:
        run = [_stage_command(job)]
    lines += preemption_lines(job, run) if stage.stoppable else run
    return "\n".join(lines) + "\n"


def preemption_lines(job: RenderedJob, run: list[str]) -> list[str]:
    """`run` (the stage's command lines) supervised for preemption: SIGUSR1 (sent `signal_seconds` ahead of the
    time limit) or SIGTERM (preemption) to this batch shell touches `$SLM_STOP_FILE`; every rank stops at its next
    safe point and exits 3 (slm.preempt; the launchers do not pass SIGUSR1 on, a file reaches every node); then the
    job requeues itself after SIGUSR1 (`scontrol requeue`, with `requeue: true`) and its next run continues from
    there. After SIGTERM it does not: that is a preemption, which Slurm requeues itself (PreemptMode=REQUEUE), a
    scancel, or the time limit itself, and a cancel must stay a cancel."""
    stop = f"{job.log_dir}/stop-{job.stage}-$SLURM_JOB_ID"
    lines = [
        "# preemption (slm.preempt): Slurm signals this shell ahead of the time limit (SIGUSR1) and on preemption",
        "# (SIGTERM); the trap asks the stage to stop at its next safe point (a whole checkpoint, whole shards)",
        f'export SLM_STOP_FILE="{stop}"',
        'rm -f "$SLM_STOP_FILE"  # a requeued job keeps its id: a new run starts with no stop request',
        "slm_stop() {",
        '    echo "slm jobs: $1 at $(date -Is): asking the stage to stop at its next safe point"',
        '    touch "$SLM_STOP_FILE"',
        "}",
        "slm_requeue=0",
        "trap 'slm_stop SIGUSR1; slm_requeue=1' USR1",
        "trap 'slm_stop SIGTERM' TERM",
        "set +e",
        *run[:-1],
        run[-1] + " &",
        "child=$!",
        "# wait returns early (status > 128) when a trapped signal arrives: wait again until the stage has ended",
        'while wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null; do :; done',
        'wait "$child" 2>/dev/null; last=$?; [ "$last" != 127 ] && rc=$last  # it ended while the trap ran',
        "set -e",
        'if [ "$slm_requeue" = 1 ] && [ "$rc" != 0 ]; then  # stopped ahead of the time limit',
    ]
    if job.resources.requeue:
        lines += [
            f'    echo "slm jobs: stage {job.stage} stopped at a safe point (exit $rc); '
            'requeueing job $SLURM_JOB_ID to continue"',
            '    rm -f "$SLM_STOP_FILE"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
        ]
    else:
        lines.append(
            f'    echo "slm jobs: stage {job.stage} stopped at a safe point (exit $rc); '
            'run slm jobs submit again to continue"'
        )
    return [*lines, "fi", 'exit "$rc"']


def write_job(job: RenderedJob, pipeline_source: str, tasks: list[int] | None = None) -> RenderedJob:
    """Write the job's config and script; for scoring, `tasks` narrows the array (resubmits)."""
    if tasks is not None:
        if job.tasks is None:
            raise SlmError(f"stage {job.stage!r} is not a job array")
        job.tasks = sorted(tasks)
    job.config.parent.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.config.write_text(
        f"# frozen by `slm jobs` for stage {job.stage!r}\n" + yaml.safe_dump(dump_config(job.cfg), sort_keys=False)
    )
    job.script.write_text(script_text(job, pipeline_source))
    job.script.chmod(0o755)
    return job


def render_pipeline(
    pipeline_path: str | Path | None, out_dir: str | Path, overrides: list[str] | None = None
) -> list[RenderedJob]:
    """Write the frozen pipeline, one config and one sbatch script per stage into `out_dir`."""
    frozen, source, jobs = plan_jobs(pipeline_path, out_dir, overrides)
    write_frozen(frozen, source, out_dir)
    for job in jobs:
        write_job(job, source)
    return jobs


def write_frozen(frozen: dict, source: str, out_dir: str | Path) -> Path:
    """The resolved pipeline, loadable as it is (`slm run DIR/pipeline.yaml` runs the same stages)."""
    path = Path(out_dir).resolve() / FROZEN_PIPELINE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# frozen by `slm jobs` from {source}\n" + yaml.safe_dump(frozen, sort_keys=False))
    return path
