"""DeepSpeed's CPU op: a build lock left by a killed process is cleared with one line instead of a silent hang,
a holder that dies while we wait frees it too, and the op is built once per environment, in that environment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slm.training.extensions import GUARD, clear_stale_locks, default_extensions_root, extensions_root

OP = "deepspeed_shm_comm"
CHILD_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
CHILD_ENV.pop("MASTER_PORT", None)
CHILD_ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SLM_INIT = "from slm.training.distributed import init_distributed; init_distributed(); print('ready')"
PLAIN_LOAD = "from deepspeed.comm.torch import build_shm_op; build_shm_op(); print('ready')"


@pytest.fixture(scope="module")
def built_op() -> Path:
    """This environment's built op folder (built once, in a child process, if no run built it yet)."""
    root = extensions_root()
    if not (root / OP / f"{OP}.so").is_file():
        code = "from slm.training.extensions import prepare_deepspeed_ops; prepare_deepspeed_ops()"
        subprocess.run([sys.executable, "-c", code], env={**CHILD_ENV, "TORCH_EXTENSIONS_DIR": str(root)}, check=True)
    return root / OP


@pytest.fixture
def ext_root(built_op, tmp_path) -> Path:
    """A private extension folder holding a copy of the built op (mtimes kept: ninja sees it up to date)."""
    root = tmp_path / "ext"
    shutil.copytree(built_op, root / OP, ignore=shutil.ignore_patterns("lock", GUARD))
    return root


def hold_lock(lock: Path) -> subprocess.Popen:
    """A process that takes the build lock as torch's FileBaton does (O_CREAT | O_EXCL, kept open) and sleeps."""
    code = f"import os, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); print('held', flush=True)"
    code += "; time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held" and lock.exists()
    return holder


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_lock_of_a_killed_build_hangs_deepspeed_and_slm_clears_it(ext_root):
    lock = ext_root / OP / "lock"
    kill(hold_lock(lock))  # killed while "building": the lock stays
    assert lock.exists()
    env = {**CHILD_ENV, "TORCH_EXTENSIONS_DIR": str(ext_root)}
    with pytest.raises(subprocess.TimeoutExpired):  # the reproduction: DeepSpeed alone waits with no end
        subprocess.run([sys.executable, "-c", PLAIN_LOAD], env=env, timeout=25, capture_output=True)
    assert lock.exists()

    ninja_log = (ext_root / OP / ".ninja_log").read_text()
    done = subprocess.run([sys.executable, "-c", SLM_INIT], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ready"), done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("slm: ")]
    assert len(said) == 1 and f"removed a stale DeepSpeed build lock {lock}" in said[0]
    assert not lock.exists()
    assert (ext_root / OP / ".ninja_log").read_text() == ninja_log  # loaded, not rebuilt


def test_a_holder_that_dies_while_we_wait_frees_the_lock(ext_root):
    lock = ext_root / OP / "lock"
    holder = hold_lock(lock)
    env = {**CHILD_ENV, "TORCH_EXTENSIONS_DIR": str(ext_root)}
    child = subprocess.Popen(
        [sys.executable, "-c", SLM_INIT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not any(f"waiting for process {holder.pid}" in line for line in lines) and time.time() < deadline:
        assert child.poll() is None, "".join(lines)[-2000:]  # it must wait for a live builder, not take its lock
        time.sleep(0.2)
    assert lock.exists() and child.poll() is None
    kill(holder)  # the builder dies while slm waits for it
    child.wait(timeout=240)  # stderr is the reader's alone (communicate() would read it too)
    reader.join(timeout=10)
    out = child.stdout.read()
    assert child.returncode == 0 and out.strip().endswith("ready"), "".join(lines)[-2000:]
    assert any("removed a stale DeepSpeed build lock" in line for line in lines) and not lock.exists()


def test_a_live_lock_is_left_alone_and_a_dead_one_removed(tmp_path):
    lock = tmp_path / OP / "lock"
    lock.parent.mkdir()
    holder = hold_lock(lock)
    said: list[str] = []
    assert clear_stale_locks(tmp_path, said.append) == [] and lock.exists()
    assert len(said) == 1 and str(holder.pid) in said[0]
    kill(holder)
    assert clear_stale_locks(tmp_path, said.append) == [lock] and not lock.exists()


def test_the_op_builds_in_this_environment_named_by_its_versions(monkeypatch):
    import deepspeed
    import torch

    root = default_extensions_root()
    assert f"torch-{torch.__version__}_deepspeed-{deepspeed.__version__}".replace("+", "-") in root.name
    assert root.is_relative_to(sys.prefix) or "env-" in root.name  # the environment, or its hash in the cache
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert extensions_root() == Path("/somewhere/else")  # the user's choice wins
