"""`slm jobs status`: each stage's Slurm state (squeue for queued and recent jobs, sacct for older
ones) beside what its output says (stage.json complete; for scoring, shards whole / total).

Without accounting storage `sacct` answers nothing; a job that squeue no longer lists then takes
its state from the stage's output: COMPLETED when stage.json says so, else UNKNOWN.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slm.errors import SlmError
from slm.jobs.progress import num_shards, stage_file_complete
from slm.jobs.record import JOBS_FILE, latest_jobs
from slm.shards.layout import whole_shards
from slm.utils.io import read_json

STATES = {
    "RUNNING": ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"),
    "PENDING": ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"),
    "COMPLETED": ("COMPLETED",),
    "CANCELLED": ("CANCELLED", "REVOKED"),
    "FAILED": ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"),
}
_NORMAL = {raw: norm for norm, raws in STATES.items() for raw in raws}
STUCK_REASONS = ("DependencyNeverSatisfied",)


def normalize_state(raw: str) -> str:
    """'CANCELLED by 0' -> CANCELLED, 'TIMEOUT' -> FAILED, 'COMPLETING' -> RUNNING."""
    word = raw.strip().split(" ")[0].rstrip("+").upper()
    return _NORMAL.get(word, "UNKNOWN")


def _task_count(job_field: str) -> int:
    """'12' or '12_3' -> 1; '12_[0-3,7%2]' -> 5 (pending array tasks folded into one line)."""
    m = re.search(r"_\[([^\]]*)\]", job_field)
    if not m:
        return 1
    count = 0
    for part in m.group(1).split("%")[0].split(","):
        a, _, b = part.partition("-")
        count += int(b) - int(a) + 1 if b else 1
    return count


def overall_state(tasks: dict[str, int]) -> str:
    for state in ("RUNNING", "PENDING", "FAILED", "CANCELLED"):
        if tasks.get(state):
            return state
    return "COMPLETED" if tasks and set(tasks) == {"COMPLETED"} else "UNKNOWN"


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


def _collect(lines: list[tuple[str, str, str, str]], source: str) -> dict[str, dict]:
    """(job id, job or task field, raw state, reason) lines -> job id -> state summary."""
    out: dict[str, dict] = {}
    for base, field, raw, reason in lines:
        entry = out.setdefault(base, {"tasks": {}, "source": source, "stuck": False})
        state = normalize_state(raw)
        entry["tasks"][state] = entry["tasks"].get(state, 0) + _task_count(field)
        entry["stuck"] |= state == "PENDING" and reason in STUCK_REASONS
    for entry in out.values():
        entry["state"] = overall_state(entry["tasks"])
    return out


def squeue_states(job_ids: list[str], squeue: str = "squeue") -> dict[str, dict] | None:
    """States of the jobs the controller still holds (queued, running, recently finished);
    None when squeue cannot be asked at all."""
    proc = _run([squeue, "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%F|%i|%T|%r"])
    if proc is None:
        return None
    if proc.returncode != 0:
        return {} if "Invalid job id" in proc.stderr else None
    lines = [tuple(line.split("|", 3)) for line in proc.stdout.splitlines() if line.count("|") == 3]
    return _collect([(base, field, state, reason) for base, field, state, reason in lines], "squeue")


def sacct_states(job_ids: list[str], sacct: str = "sacct") -> dict[str, dict] | None:
    """States from accounting; None when sacct is missing or has no accounting storage."""
    proc = _run([sacct, "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"])
    if proc is None or proc.returncode != 0:
        return None
    lines = []
    for line in proc.stdout.splitlines():
        if "|" in line:
            field, raw = line.split("|", 1)
            lines.append((field.split("_")[0].split(".")[0], field, raw, ""))
    return _collect(lines, "sacct")


def query_jobs(job_ids: list[str], squeue: str = "squeue", sacct: str = "sacct") -> dict[str, dict]:
    """job id -> {'state', 'tasks': {state: count}, 'source', 'stuck'} for the jobs Slurm knows."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    found = squeue_states(ids, squeue) or {}
    missing = [j for j in ids if j not in found]
    if missing:
        found.update(sacct_states(missing, sacct) or {})
    return found


def pipeline_status(out_dir: str | Path, squeue: str = "squeue", sacct: str = "sacct") -> list[dict]:
    """One row per stage of the pipeline submitted into `out_dir`."""
    path = Path(out_dir) / JOBS_FILE
    if not path.is_file():
        raise SlmError(f"{path}: not found; submit a pipeline first with `slm jobs submit PIPELINE --out {out_dir}`")
    record = read_json(path)
    latest = latest_jobs(record)
    states = query_jobs([e["job_id"] for e in latest.values()], squeue, sacct)
    rows = []
    for info in record.get("stages", []):
        stage, out = info["name"], Path(info["out_dir"])
        complete = stage_file_complete(out)
        job = latest.get(stage)
        row = {
            "stage": stage,
            "kind": info["kind"],
            "job_id": job["job_id"] if job else None,
            "array": job.get("array") if job else None,
            "complete": complete,
            "out_dir": str(out),
            "tasks": {},
            "source": None,
        }
        known = states.get(job["job_id"]) if job else None
        if known:
            row.update(state=known["state"], tasks=known["tasks"], source=known["source"])
        elif complete:
            row.update(state="COMPLETED", source="stage.json")
        else:
            row.update(state="UNKNOWN" if job else "NOT SUBMITTED")
        if info["kind"] == "score":
            row["shards_whole"], row["num_shards"] = len(whole_shards(out)), num_shards(out)
            row["output"] = (
                "complete"
                if complete
                else f"{row['shards_whole']}/{row['num_shards'] if row['num_shards'] is not None else '?'} shards whole"
            )
        else:
            row["output"] = "complete" if complete else ("started" if out.exists() else "-")
        rows.append(row)
    return rows


def print_status(rows: list[dict], console: Console | None = None) -> None:
    table = Table(title="slm jobs: status")
    for col in ("stage", "kind", "job", "state", "tasks", "output"):
        table.add_column(col, no_wrap=col in ("stage", "state"))
    table.add_column("out_dir", overflow="fold")
    colour = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "CANCELLED": "red"}
    for r in rows:
        job = (r["job_id"] or "-") + (f" [{r['array']}]" if r.get("array") else "")
        tasks = (
            ", ".join(f"{n} {s.lower()}" for s, n in sorted(r["tasks"].items())) if sum(r["tasks"].values()) > 1 else ""
        )
        state = f"[{colour[r['state']]}]{r['state']}[/]" if r["state"] in colour else r["state"]
        table.add_row(r["stage"], r["kind"], job, state, tasks, r["output"], r["out_dir"])
    (console or Console()).print(table)
