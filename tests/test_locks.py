"""Run locks (slm.locks): one writer per stage output directory; a holder named in the refusal; stale locks of
dead processes, reused pids, stopped hosts and requeued Slurm jobs taken over; two real `slm` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slm import locks
from slm.locks import LOCK_PREFIX, DirectoryLocked, DirLock, clear_directory

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def plant(directory: Path, name: str = LOCK_PREFIX, age_s: float = 0.0, **holder) -> Path:
    """A lock file as another process would have left it (`age_s`: seconds since its last heartbeat)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": 4242,
        "host": "node-elsewhere",
        "pid_start": None,
        "pid_namespace": None,
        "started": "2026-01-01T00:00:00+0000",
        "command": "slm pretrain --config p.yaml",
        "slurm_job_id": None,
        "slurm_restart_count": 0,
        "token": "theirs",
        **holder,
    }
    path = directory / name
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_held_while_running_gone_after_and_a_second_holder_refused(tmp_path):
    with DirLock(tmp_path / "out") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(DirectoryLocked) as err:
            DirLock(tmp_path / "out", what="pretrain run").acquire()
        message = str(err.value)
        assert f"in use by another pretrain run: pid {os.getpid()} on {socket.gethostname()}" in message
        assert "\n" not in message and lock.held()
    assert not (tmp_path / "out" / LOCK_PREFIX).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    code = f"from slm.locks import DirLock; import os; DirLock({str(out)!r}).acquire(); os.kill(os.getpid(), 9)"
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    dead = json.loads((out / LOCK_PREFIX).read_text())["pid"]
    with DirLock(out) as lock:
        assert lock.took_over.startswith(f"pid {dead} on {socket.gethostname()}")
        assert lock.took_over.endswith(f"pid {dead} no longer runs")


def test_reused_pid_is_not_the_holder(tmp_path):
    """Our own pid with another start time: the pid was reused by an unrelated process after the holder died."""
    me = locks._holder_record("")
    plant(tmp_path, pid=os.getpid(), host=me["host"], pid_namespace=me["pid_namespace"], pid_start="1")
    with DirLock(tmp_path) as lock:
        assert "no longer runs" in lock.took_over
    plant(tmp_path, pid=os.getpid(), host=me["host"], pid_namespace=me["pid_namespace"], pid_start=me["pid_start"])
    with pytest.raises(DirectoryLocked):
        DirLock(tmp_path).acquire()


def test_other_host_is_refused_until_its_heartbeat_stops(tmp_path):
    plant(tmp_path, age_s=60)
    holder = "pid 4242 on node-elsewhere since 2026-01-01.*slm pretrain --config p.yaml"
    with pytest.raises(DirectoryLocked, match=holder):
        DirLock(tmp_path).acquire()
    plant(tmp_path, age_s=locks.STALE_S + 5)
    with DirLock(tmp_path) as lock:
        assert lock.took_over.endswith(f"no heartbeat for {locks.STALE_S + 5:.0f} s")


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    plant(tmp_path, slurm_job_id="123", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same run of the job (another step, a second command)
    with pytest.raises(DirectoryLocked, match="node-elsewhere, Slurm job 123"):
        DirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # another job's restart
    with pytest.raises(DirectoryLocked):
        DirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with DirLock(tmp_path) as lock:
        assert lock.took_over.endswith("Slurm job 123 was requeued")


def test_parts_share_a_directory_but_not_with_a_whole_run(tmp_path):
    with DirLock(tmp_path, "part-0-of-2"), DirLock(tmp_path, "part-1-of-2"):
        with pytest.raises(DirectoryLocked, match=r"lock \.slm-lock\.part-0-of-2"):
            DirLock(tmp_path).acquire()
        with pytest.raises(DirectoryLocked):
            DirLock(tmp_path, "part-0-of-2").acquire()
    with DirLock(tmp_path), pytest.raises(DirectoryLocked, match=r"lock \.slm-lock:"):
        DirLock(tmp_path, "part-1-of-2").acquire()


def test_heartbeat_refreshes_the_lock_and_force_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "stage.json").write_text("{}")
    with DirLock(tmp_path) as lock:
        os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 10
        while time.time() - lock.path.stat().st_mtime > 100:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
        clear_directory(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_PREFIX, locks.GUARD] and lock.held()


# ----------------------------------------------------------------------------- two real processes


def slm_process(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slm.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_stage_and_slm_run_on_a_busy_directory_refuse(tiny_reference_cfg, tmp_path):
    """A: `slm reference` training (far more steps than it gets). B: the same command, the same with --force, and
    `slm run` of a pipeline with that stage: each exits 2 in one line naming A's pid and host, and leaves A's lock
    alone. A is then killed with SIGKILL; C (--force, 2 steps) takes the dead process's lock over and finishes."""
    cfg = tiny_reference_cfg("busy", max_steps=100000, checkpoint_every=100000, eval_every=100000)
    config = tmp_path / "busy.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        json.dumps(
            {
                "name": "busy",
                "work_dir": str(tmp_path),
                "stages": [{"name": "ref", "kind": "reference", "config": cfg.model_dump(mode="json")}],
            }
        )
    )
    lock_file = Path(cfg.out_dir) / LOCK_PREFIX
    a = slm_process("reference", "--config", str(config), cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (lock_file.is_file() and json.loads(lock_file.read_text())["pid"] == a.pid):
            assert a.poll() is None, f"A ended early: {a.communicate()}"
            assert time.time() < deadline, "A took no lock"
            time.sleep(0.2)
        held = lock_file.read_text()
        bs = {
            "same": slm_process("reference", "--config", str(config), cwd=tmp_path),
            "force": slm_process("reference", "--config", str(config), "--force", cwd=tmp_path),
            "run": slm_process("run", str(pipeline), cwd=tmp_path),
        }
        for name, b in bs.items():
            out, err = b.communicate(timeout=180)
            last = err.strip().splitlines()[-1]
            assert b.returncode == 2, f"{name}: exit {b.returncode}\n{err}"
            assert last.startswith(f"error: {cfg.out_dir}: in use by another reference run: pid {a.pid} on "), last
            assert f"{socket.gethostname()} since " in last and "reference --config" in last
        assert a.poll() is None and lock_file.read_text() == held  # A runs on, its lock untouched
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
    assert json.loads(lock_file.read_text())["pid"] == a.pid  # a SIGKILL leaves the lock behind

    c = slm_process("reference", "--config", str(config), "--force", "--set", "train.max_steps=2", cwd=tmp_path)
    out, err = c.communicate(timeout=300)
    assert c.returncode == 0, err
    assert f"took over the lock of pid {a.pid} on {socket.gethostname()}" in " ".join(err.split())
    assert json.loads((Path(cfg.out_dir) / "stage.json").read_text())["status"] == "complete"
    assert not lock_file.exists()
