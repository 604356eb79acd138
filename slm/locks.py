"""Run locks: one writer per stage output directory.

A stage holds `<out_dir>/.slm-lock` while it runs (scoring parts, which share one directory by design, hold
`.slm-lock.part-I-of-N` each). The file is created with O_EXCL and names its holder: pid, host, the pid's start
time and pid namespace, the command, the Slurm job id and restart count, and a random token. While it is held, a
daemon thread touches it every `HEARTBEAT_S` seconds. A process that finds a lock:

- refuses (`DirectoryLocked`, exit 2, one line naming the holder) while the holder may be alive;
- takes it over when the holder is provably gone: on this host (and pid namespace) its pid no longer runs, or runs
  another program (its start time differs); or it is the same Slurm job restarted (`SLURM_RESTART_COUNT` grew:
  Slurm ends every step of a job before it requeues it); or its heartbeat is older than `STALE_S` (a holder on
  another host that stopped, e.g. a node that died).

A whole-directory lock conflicts with every part lock and each part lock with the whole-directory lock. The check
and the take-over run under an flock on `.slm-lock.guard`, so two newcomers never both take a stale lock. Only
global rank 0 of a distributed run locks (`RANK`, set by the launcher before the process group exists): when it
refuses, the launcher stops the other ranks.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slm.errors import SlmError
from slm.utils.io import atomic_write_json

LOCK_PREFIX = ".slm-lock"
GUARD = LOCK_PREFIX + ".guard"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a heartbeat this old means the holder stopped (20 missed beats)


class DirectoryLocked(SlmError):
    """Another live process holds the output directory's lock (exit 2)."""


def _proc_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether `pid` (of this host and pid namespace) still runs the program that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _holder_record(token: str) -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "pid_start": _proc_start(pid),
        "pid_namespace": _pid_namespace(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "token": token,
    }


def describe_holder(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}{job} since {holder.get('started')} "
        f"({holder.get('command') or 'unknown command'})"
    )


def stale_reason(holder: dict | None, age_s: float) -> str | None:
    """Why the lock's holder is gone (it may be taken over), or None while it may be alive."""
    if holder is None:
        return "unreadable lock file"
    me = _holder_record("")
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]:
        return f"Slurm job {job} was requeued"
    if holder.get("host") == me["host"] and holder.get("pid_namespace") == me["pid_namespace"]:
        if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
            return f"pid {holder.get('pid')} no longer runs"
        return None
    if age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def _read(path: Path) -> tuple[dict | None, float] | None:
    """(holder record or None when unreadable, heartbeat age in seconds); None when there is no lock."""
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()), age
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None, 0.0


class DirLock:
    """The lock of one output directory (or one part of it): `with DirLock(dir): ...`."""

    def __init__(self, directory: str | Path, part: str | None = None, what: str = "stage"):
        self.directory = Path(directory)
        self.path = self.directory / (f"{LOCK_PREFIX}.{part}" if part else LOCK_PREFIX)
        self.what = what
        self.token = secrets.token_hex(8)
        self.took_over: str | None = None  # why an earlier holder's lock was taken, if it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _conflicting(self) -> list[Path]:
        if self.path.name == LOCK_PREFIX:  # the whole directory: every part lock too
            return sorted(p for p in self.directory.glob(LOCK_PREFIX + "*") if p.name != GUARD and ".tmp" not in p.name)
        return [self.path, self.directory / LOCK_PREFIX]

    def acquire(self) -> DirLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / GUARD, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                for path in self._conflicting():
                    found = _read(path)
                    if found is None:
                        continue
                    holder, age = found
                    reason = stale_reason(holder, age)
                    if reason is None:
                        raise DirectoryLocked(
                            f"{self.directory}: in use by another {self.what}: {describe_holder(holder)}; wait for it "
                            f"to end or stop it (lock {path.name}: a lock whose process is gone is taken over)"
                        )
                    path.unlink(missing_ok=True)
                    self.took_over = f"{describe_holder(holder or {})}: {reason}"
                atomic_write_json(self.path, _holder_record(self.token))
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        self._thread = threading.Thread(target=self._beat, name=f"slm-lock {self.directory}", daemon=True)
        self._thread.start()
        return self

    def held(self) -> bool:
        found = _read(self.path)
        return bool(found and found[0] and found[0].get("token") == self.token)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.held():
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def locked_dir(directory: str | Path, part: str | None = None, what: str = "stage") -> Iterator[DirLock | None]:
    """Hold `directory`'s lock on global rank 0 (other ranks: nothing to hold; see the module docstring)."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield None
        return
    with DirLock(directory, part, what) as lock:
        yield lock


def clear_directory(directory: str | Path) -> None:
    """Remove everything in `directory` but its run locks (what `--force` does while holding the lock)."""
    for entry in Path(directory).iterdir():
        if entry.name.startswith(LOCK_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
