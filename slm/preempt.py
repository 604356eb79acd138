"""Preemption: a long stage asked to stop finishes its safe unit of work, keeps it, and exits 3.

Asked means: the process got SIGTERM or SIGUSR1 (Slurm sends SIGTERM on preemption and at the time limit, and
with `--signal` a signal ahead of the limit), or the file named by `$SLM_STOP_FILE` exists. The rendered sbatch
scripts touch that file when their batch shell is signalled (`--signal=B:USR1@SECONDS`): the launchers between
the script and the ranks (torchrun, the DeepSpeed launcher) do not pass SIGUSR1 on, and a file reaches every
rank on every node alike.

The safe points: training stops after the optimizer step in progress, all ranks at the same step, and writes a
whole checkpoint of it (slm.training.loop); scoring abandons the shard it is writing (its temp file is removed,
the manifest never lists it) and keeps every whole one (slm.stages.score). Either way the stage raises
`Interrupted` (exit 3), and rerunning the same command, or Slurm requeueing the job, continues from there.
"""

from __future__ import annotations

import os
import signal
import threading

from slm.errors import EXIT_INTERRUPTED, SlmError

STOP_FILE_ENV = "SLM_STOP_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(SlmError):
    """A stage stopped on request at a safe point, its work kept (exit 3): rerun to continue."""

    exit_code = EXIT_INTERRUPTED


class StopRequest:
    """While entered, SIGTERM and SIGUSR1 only set a flag (in the main thread; elsewhere only the stop file
    counts); `reason()` says whether a stop was asked, and how. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def reason(self) -> str | None:
        """'SIGUSR1', 'SIGTERM', 'stop file PATH', or None when nobody asked."""
        if self.signal:
            return self.signal
        path = os.environ.get(STOP_FILE_ENV)
        if path and os.path.exists(path):
            return f"stop file {path}"
        return None
