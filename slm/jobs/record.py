"""`OUT/jobs.json`: what `slm jobs submit` handed to Slurm (the stages, and every submission's job ids), read by
`submit` for a resubmit and by `status`; neither imports the other."""

from __future__ import annotations

from pathlib import Path

from slm.utils.io import read_json

JOBS_FILE = "jobs.json"


def load_jobs_file(out_dir: str | Path) -> dict:
    path = Path(out_dir) / JOBS_FILE
    return read_json(path) if path.is_file() else {}


def latest_jobs(record: dict) -> dict[str, dict]:
    """stage -> its most recent submission entry (job_id, array, depends_on, at)."""
    latest: dict[str, dict] = {}
    for sub in record.get("submissions", []):
        for stage, entry in sub.get("jobs", {}).items():
            latest[stage] = {**entry, "at": sub.get("at")}
    return latest
