"""`slm jobs submit`: render the pipeline and hand what is unfinished to sbatch, chained with
`--dependency=afterok:...`; job ids go to `OUT/jobs.json`.

A resubmit (same command after a failure, a cancel or a time limit) submits only the work left:
- a stage whose stage.json records a finished run of this config is skipped, unless a stage it reads was rebuilt
  since or is submitted (or still queued) now: then its stale output is cleared here, under the stage's lock, and
  it is submitted to run again after that stage (make's rule, as `slm run` applies it: `slm.stages.reads`; clearing
  at submit time, not in the script, keeps a requeued job resuming its own checkpoints);
- a stage whose job from an earlier submit is still pending or running is not submitted again;
  later stages wait for that job;
- a scoring array submits only the tasks whose shards are not all whole (`--array=1,3%C`); when
  every shard is whole but the stage was never closed, task 0 alone closes it (it skips the whole
  shards, merges the manifest and writes stage.json);
- dependencies point only at jobs that were submitted (now or still queued from before).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from slm.errors import SlmError
from slm.jobs.progress import finished_run, unfinished_parts
from slm.jobs.record import JOBS_FILE, latest_jobs, load_jobs_file
from slm.jobs.render import RenderedJob, plan_jobs, write_frozen, write_job
from slm.jobs.status import query_jobs
from slm.locks import clear_directory, locked_dir
from slm.utils.io import atomic_write_json

ACTIVE = ("PENDING", "RUNNING")


def sbatch_submit(script: Path, dependencies: list[str], sbatch: str = "sbatch") -> str:
    """Submit one script; return its job id (`sbatch --parsable` prints `id` or `id;cluster`)."""
    cmd = [sbatch, "--parsable"]
    if dependencies:
        cmd += [f"--dependency=afterok:{':'.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    cmd.append(str(script))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlmError(f"{sbatch}: command not found; is Slurm installed and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise SlmError(f"{' '.join(cmd)}: no answer from sbatch in 120 s") from None
    if proc.returncode != 0:
        raise SlmError(
            f"sbatch {script.name} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlmError(f"sbatch {script.name}: expected a job id, got {proc.stdout.strip()!r}")
    return job_id


def _todo(job: RenderedJob, previous: dict | None, states: dict[str, dict], rebuilding: set[str]) -> tuple[str, object]:
    """('skip', reason) | ('redo', why) | ('reuse', job_id) | ('submit', array tasks or None).
    `rebuilding`: the earlier stages that are submitted or still queued in this submission."""
    run = finished_run(job.stage, job.kind, job.cfg, job.out_dir)
    if run is not None:
        stage, done = run
        why = [f"{d} was rebuilt" for d in stage.rebuilt_inputs(done, job.chdir)]
        why += [f"{d} runs again" for d in job.reads if d in rebuilding]
        return ("redo", "; ".join(why)) if why else ("skip", "complete")
    if (
        previous
        and states.get(previous["job_id"], {}).get("state") in ACTIVE
        and not states[previous["job_id"]].get("stuck")
    ):
        return "reuse", previous["job_id"]
    if job.kind == "score":
        return "submit", unfinished_parts(job.out_dir, job.parts) or [0]
    return "submit", None


def _clear_stale(job: RenderedJob) -> None:
    """Clear a finished stage's output before it is submitted again, as its own --force would (under its lock)."""
    with locked_dir(job.out_dir, what="slm jobs submit (clearing a stale output)"):
        clear_directory(job.out_dir)


def submit_pipeline(
    pipeline_path: str | Path | None,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    sbatch: str = "sbatch",
    squeue: str = "squeue",
    sacct: str = "sacct",
) -> dict:
    """Render and submit the unfinished stages; returns {'submitted', 'reused', 'skipped', 'redone', 'jobs_file'}
    ('redone': the finished stages cleared and submitted again, with why)."""
    out_dir = Path(out_dir).resolve()
    frozen, source, jobs = plan_jobs(pipeline_path, out_dir, overrides)
    record = load_jobs_file(out_dir)
    previous = latest_jobs(record)
    states = query_jobs([p["job_id"] for p in previous.values()], squeue=squeue, sacct=sacct) if previous else {}
    plan: dict[str, tuple[str, object]] = {}
    for job in jobs:  # in pipeline order: a stage is redone when what it reads runs again
        rebuilding = {name for name, (action, _) in plan.items() if action != "skip"}
        plan[job.stage] = _todo(job, previous.get(job.stage), states, rebuilding)

    write_frozen(frozen, source, out_dir)
    record.update(
        pipeline=source,
        out_dir=str(out_dir),
        chdir=str(jobs[0].chdir) if jobs else None,
        stages=[
            {
                "name": j.stage,
                "kind": j.kind,
                "out_dir": str(j.out_dir),
                "script": str(j.script),
                "config": str(j.config),
                "parts": j.parts,
                "depends_on": j.depends_on,
            }
            for j in jobs
        ],
    )
    submission = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": {}, "reused": {}, "skipped": {}, "redone": {}}
    record.setdefault("submissions", []).append(submission)
    ids: dict[str, str] = {}
    for job in jobs:
        action, value = plan[job.stage]
        if action == "skip":
            submission["skipped"][job.stage] = value
            continue
        if action == "reuse":
            ids[job.stage] = submission["reused"][job.stage] = value
            continue
        if action == "redo":
            _clear_stale(job)
            submission["redone"][job.stage] = value
            value = list(range(job.parts)) if job.kind == "score" else None
        write_job(job, source, tasks=value)
        deps = [ids[d] for d in job.depends_on if d in ids]
        job_id = sbatch_submit(job.script, deps, sbatch)
        ids[job.stage] = job_id
        submission["jobs"][job.stage] = {
            "job_id": job_id,
            "array": job.array,
            "tasks": job.tasks,
            "depends_on": {d: ids[d] for d in job.depends_on if d in ids},
        }
        atomic_write_json(out_dir / JOBS_FILE, record)  # after every sbatch: a failure later keeps what was submitted
    atomic_write_json(out_dir / JOBS_FILE, record)
    return {
        "submitted": submission["jobs"],
        "reused": submission["reused"],
        "skipped": submission["skipped"],
        "redone": submission["redone"],
        "jobs_file": str(out_dir / JOBS_FILE),
    }
