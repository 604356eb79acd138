"""Preemption (slm.preempt): SIGTERM / SIGUSR1 or the stop file stop training after the step in progress with a
whole checkpoint, and scoring with only whole shards kept; both exit 3; a rerun ends where an uninterrupted run
ends. The stages run as real `slm` processes, signalled with os.kill as Slurm would signal them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slm.errors import EXIT_INTERRUPTED
from slm.preempt import STOP_FILE_ENV, StopRequest
from slm.shards.layout import DONE_DIR
from slm.shards.manifest import load_manifest
from slm.shards.reader import leftover_temp_files, verify_shards
from slm.training.checkpoint import whole_checkpoints

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def slm_process(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slm.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return path


def signal_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 180) -> None:
    """Send `sig` to `proc` as soon as `ready()` holds (polling); fail if the process ends first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before it was signalled: {proc.communicate()}")
        assert time.time() < deadline, "never ready to be signalled"
        time.sleep(0.02)
    proc.send_signal(sig)


def test_stop_request_takes_signals_and_the_stop_file(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "stop"))
    with StopRequest() as stop:
        assert stop.reason() is None
        (tmp_path / "stop").touch()
        assert stop.reason() == f"stop file {tmp_path / 'stop'}"
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert stop.reason() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_signalled_training_resumes_to_the_uninterrupted_weights(tiny_reference_cfg, tmp_path):
    """B gets SIGUSR1 mid-run: it finishes that optimizer step, writes a whole checkpoint of it and exits 3; its
    rerun ends with the weights of A, which ran uninterrupted (1e-6), every step logged once."""
    from slm.stages import reference
    from slm.training.metrics import read_metrics

    # log_every=1: metrics.jsonl grows a line per step (lines are read off the device once per log_every steps)
    train = dict(max_steps=300, checkpoint_every=1000, eval_every=1000, log_every=1)
    whole_cfg, cfg = tiny_reference_cfg("whole", **train), tiny_reference_cfg("signalled", **train)
    a = slm_process("reference", "--config", str(write_config(whole_cfg, tmp_path / "a.yaml")), cwd=tmp_path)
    b = slm_process("reference", "--config", str(write_config(cfg, tmp_path / "b.yaml")), cwd=tmp_path)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    signal_when(b, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, signal.SIGUSR1)
    _, err = b.communicate(timeout=300)
    assert b.returncode == EXIT_INTERRUPTED, err
    (checkpoint,) = whole_checkpoints(Path(cfg.out_dir) / "checkpoints")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < 300
    last = err.strip().splitlines()[-1]
    assert last == (
        f"error: {cfg.out_dir}: stopped by SIGUSR1 after step {stopped_at} of 300; whole checkpoint "
        f"{checkpoint.name} written; rerun the same command (or let Slurm requeue the job) to continue from it"
    )
    assert not (Path(cfg.out_dir) / "stage.json").exists()

    resumed = reference.run(cfg)
    assert resumed["metrics"]["resumed_from"] == stopped_at
    _, err_a = a.communicate(timeout=600)
    assert a.returncode == 0, err_a
    wa, wb = (
        load_file(f"{whole_cfg.out_dir}/model/model.safetensors"),
        load_file(f"{cfg.out_dir}/model/model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, 301))


def test_signalled_scoring_keeps_whole_shards_only_and_a_rerun_completes(scored, tmp_path):
    """SIGTERM while `slm score` writes shards of 5 documents: exit 3, the manifest lists only whole shards (each as
    verified), no partial file is left, and the rerun gives the shards an uninterrupted scoring gives (sha256)."""
    from slm.stages import score

    base = scored["score_cfg"]
    whole_cfg = base.model_copy(update={"out_dir": str(tmp_path / "whole"), "documents_per_shard": 5})
    cfg = base.model_copy(update={"out_dir": str(tmp_path / "signalled"), "documents_per_shard": 5})
    out = Path(cfg.out_dir)
    proc = slm_process("score", "--config", str(write_config(cfg, tmp_path / "score.yaml")), cwd=tmp_path)
    signal_when(proc, lambda: len(list((out / DONE_DIR).glob("*.json"))) >= 2, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}: stopped by SIGTERM ") and "whole shard(s) are kept" in last, last
    manifest = load_manifest(out)
    assert 2 <= len(manifest.shards) < manifest.num_shards
    assert sorted(p.name for p in out.glob("shard-*.arrow")) == sorted(manifest.shards)
    assert verify_shards(out) == [f"{out}: {len(manifest.shards)} of {manifest.num_shards} shards whole"]
    assert leftover_temp_files(out) == []
    # what a SIGKILL mid-write leaves (no handler runs): the rerun, holding the lock, removes its shards' temp files
    (out / ".shard-00003.arrow.k1ll3d00.tmp").write_bytes(b"partial")
    (out / DONE_DIR / ".shard-00003.arrow.json.k1ll3d00.tmp").write_text("{")
    (out / ".notes.txt.k1ll3d00.tmp").write_text("not a shard's")

    assert score.run(cfg)["status"] == "complete"
    assert leftover_temp_files(out) == [out / ".notes.txt.k1ll3d00.tmp"]
    score.run(whole_cfg)
    sha = {n: e["sha256"] for n, e in load_manifest(out).shards.items()}
    assert sha == {n: e["sha256"] for n, e in load_manifest(tmp_path / "whole").shards.items()}
    assert verify_shards(out) == []
