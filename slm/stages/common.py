"""What every stage shares: `stage.json`, skip-after-success, `--force`, fingerprints, console."""

from __future__ import annotations

import functools
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

import slm
from slm.config import dump_config, fingerprint_view
from slm.errors import SlmError
from slm.locks import clear_directory, locked_dir
from slm.stages.reads import STAGE_FILE, rebuilt_upstream, upstream_stages
from slm.training.distributed import rank
from slm.utils.io import atomic_write_json, read_json, sha256_json

__all__ = ["STAGE_FILE", "StageRun", "config_fingerprint", "console", "locked_stage", "say", "timed"]
console = Console(stderr=True)


def say(message: str) -> None:
    if rank() == 0:
        console.print(message)


def config_fingerprint(cfg: BaseModel) -> str:
    """sha256 of the config without its runtime keys (`fingerprint_view`): what the output depends on."""
    return sha256_json(fingerprint_view(cfg))


@dataclass
class StageRun:
    kind: str
    cfg: BaseModel
    out_dir: Path
    upstream: dict[str, str] | None = field(default=None, repr=False)  # what it read (`slm.stages.reads`)

    @property
    def stage_file(self) -> Path:
        return self.out_dir / STAGE_FILE

    def finished(self) -> dict | None:
        """stage.json of a successful run of this exact config, or None; refuses another config's output."""
        if not self.stage_file.is_file():
            return None
        record = read_json(self.stage_file)
        if record.get("status") != "complete":
            return None
        if record.get("config_fingerprint") != config_fingerprint(self.cfg):

            def flat(d: dict, prefix: str = "") -> dict:  # {"train": {"lr": 1}} -> {"train.lr": 1}
                out = {}
                for k, v in d.items():
                    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
                return out

            def show(v) -> str:
                text = "unset" if v is absent else repr(v)
                return text if len(text) <= 80 else text[:77] + "..."

            absent = object()
            theirs, mine = flat(record.get("config") or {}), flat(dump_config(self.cfg))
            keys = [k for k in sorted(theirs.keys() | mine.keys()) if theirs.get(k, absent) != mine.get(k, absent)]
            said = "; ".join(
                f"{k} was {show(theirs.get(k, absent))}, now {show(mine.get(k, absent))}" for k in keys[:5]
            )
            more = f"; and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise SlmError(
                f"{self.out_dir}: holds a finished {self.kind} run with another config; "
                f"use --force to redo it or choose another out_dir (differs: {said or 'the config hash'}{more})"
            )
        return record

    def read_stages(self, cwd: Path | None = None) -> dict[str, str]:
        """{stage dir: sha256 of its stage.json} of the finished stages whose output the config names."""
        return upstream_stages(dump_config(self.cfg), self.out_dir, cwd or Path.cwd())

    def rebuilt_inputs(self, done: dict, cwd: Path | None = None) -> list[str]:
        """The stages this finished run (`done`, its stage.json) read that were rebuilt since."""
        return rebuilt_upstream(done, self.stage_file, self.read_stages(cwd))

    def prepare(self, force: bool, inputs: str | None = None) -> dict | None:
        """Clear the output on --force; return the finished record to skip, else None.

        A finished run of this config is redone as with --force when a stage it read was rebuilt since
        (`slm.stages.reads`), or when `inputs` differs: a fingerprint of what the stage reads besides its config and
        other stages' records (a model's files, other runs' records), kept in stage.json as `fingerprints.inputs`
        (pass it to `complete`). Either way its output no longer describes what its config names."""
        self.upstream = self.read_stages()
        done = None if force else self.finished()
        if done is not None and (rebuilt := rebuilt_upstream(done, self.stage_file, self.upstream)):
            say(f"{self.kind}: {', '.join(rebuilt)} finished again since {self.out_dir} was written; running it again")
            force, done = True, None
        if done is not None and inputs is not None and done.get("fingerprints", {}).get("inputs") != inputs:
            say(f"{self.kind}: an input changed since {self.out_dir} was written; running it again")
            force, done = True, None
        if force and self.out_dir.exists() and rank() == 0:
            clear_directory(self.out_dir)  # all but the run lock, which this stage holds (`locked_stage`)
        if force:
            from slm.training.distributed import barrier

            barrier()
        if done is None and rank() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        return done

    def complete(
        self, fingerprints: dict, metrics: dict, started: float, outputs: dict, inputs: str | None = None
    ) -> dict:
        """Write stage.json: the run is finished (`inputs`: the fingerprint `prepare` compares on a rerun; the
        stages it read, as `prepare` found them, go in as `fingerprints.upstream`)."""
        fingerprints = {**fingerprints, "upstream": self.upstream if self.upstream is not None else self.read_stages()}
        if inputs is not None:
            fingerprints["inputs"] = inputs
        record = {
            "kind": self.kind,
            "status": "complete",
            "run_id": uuid.uuid4().hex,  # every finished run differs: a rebuild changes the stage.json hash
            "slm_version": slm.__version__,
            "config": dump_config(self.cfg),
            "config_fingerprint": config_fingerprint(self.cfg),
            "fingerprints": fingerprints,
            "metrics": metrics,
            "outputs": outputs,
            "seconds": round(time.time() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if rank() == 0:
            atomic_write_json(self.stage_file, record)
        return record


def locked_stage(kind: str):
    """Decorator of a stage's `run(cfg, ...)`: it holds the lock of `cfg.out_dir` (slm.locks) from before `--force`
    clears the directory until it returns, so a second stage or `slm run` on that directory refuses in one line
    naming the holder. Scoring part i of n (n > 1) holds that part's lock: the parts share the directory."""

    def decorate(run):
        @functools.wraps(run)
        def locked_run(cfg, *args, **kwargs):
            parts = getattr(cfg, "parts", 1) or 1
            part = f"part-{cfg.part}-of-{parts}" if parts > 1 else None
            with locked_dir(cfg.out_dir, part, what=f"{kind} run") as lock:
                if lock is not None and lock.took_over:
                    say(f"[yellow]{kind}[/]: {cfg.out_dir}: took over the lock of {lock.took_over}")
                return run(cfg, *args, **kwargs)

        return locked_run

    return decorate


@contextmanager
def timed():
    t = time.time()
    yield lambda: time.time() - t
