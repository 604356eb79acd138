"""Metrics to JSONL (always) and TensorBoard (when installed), from rank 0 only.

`metrics.jsonl` always describes one run: a run that starts without a checkpoint starts the file
afresh (an earlier file, e.g. of a run killed before its first checkpoint, is kept as
`metrics.jsonl.prev`), and a run that resumes keeps exactly the lines up to its checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from slm.utils.io import atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = None

    @property
    def prev_path(self) -> Path:
        return self.path.with_name(self.path.name + ".prev")

    def start(self, resumed_step: int | None) -> None:
        """Make the file match the run that starts now: steps 1..resumed_step kept on resume, else a fresh file.

        On a fresh start an existing file (a run killed before its first checkpoint, or resume turned off) becomes
        `metrics.jsonl.prev`, replacing an older one, so its lines are neither lost nor mixed with the new run's.
        """
        if not (self.enabled and self.path.is_file()):
            return
        if resumed_step is None:
            os.replace(self.path, self.prev_path)
        else:
            self.truncate_after(resumed_step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches an uninterrupted run.

        A line cut short by a kill (not valid JSON) can only be the last one written, after the checkpoint: dropped."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
