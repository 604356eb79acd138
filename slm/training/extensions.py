"""DeepSpeed's JIT-built op on CPU (`deepspeed_shm_comm`): built once per environment, never a silent hang.

DeepSpeed compiles its shared-memory op with torch's `cpp_extension.load` the first time a process group starts
on CPU. Two things went wrong with torch's defaults:

- **Rebuilt per run.** torch builds every extension in `~/.cache/torch_extensions/py311_cpu/<name>`: one folder
  for *all* Python 3.11 CPU environments of the user (each venv, each CI checkout with its own torch). Its
  `build.ninja` names the environment's torch and Python include directories, so ninja recompiles (50-90 s
  here) whenever another environment built there last, and an environment whose torch or DeepSpeed changed
  loads an old binary. A home directory that does not persist (containers, fresh CI machines, nodes with a
  local home) rebuilds on every run as well. slm therefore points `TORCH_EXTENSIONS_DIR`, unless it is set
  already, at a folder inside the environment, named after the torch and DeepSpeed versions
  (`<sys.prefix>/var/slm/torch_extensions/torch-<v>_deepspeed-<v>`; the user's cache with a hash of
  `sys.prefix` when the environment is read-only). The op then builds once per environment and version.
- **Silent hang.** torch serialises builds with a lock file `<root>/<name>/lock`, created with O_EXCL by the
  process that builds and removed when it is done; every other process waits while the file exists, with no
  message and no time limit. A process killed while building leaves the file behind, and every later run
  hangs after `Setting accelerator to CPU.`. `prepare_deepspeed_ops` (called before DeepSpeed starts the
  process group) finds such a lock: the builder keeps the file open, so a lock that no process on this host
  has open was left by a dead one and is removed with a one-line notice (on a network file system, where a
  builder on another host is invisible, only once it is older than `STALE_S`). A lock with a live holder is
  announced in one line and waited for; if that holder dies while we wait, a watchdog removes its lock and
  the op is built here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

STALE_S = 900.0  # on a network file system: a build lock this old is stale (a build takes about a minute)
WATCH_EVERY_S = 1.0
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p")
GUARD = ".slm-lock-check"  # flock held while a lock is judged and removed: two processes never both remove


def notice(message: str) -> None:
    print(f"slm: {message}", file=sys.stderr, flush=True)


def _versions() -> str:
    import deepspeed
    import torch

    return f"torch-{torch.__version__}_deepspeed-{deepspeed.__version__}".replace("+", "-")


def default_extensions_root() -> Path:
    """The build folder of this environment and these torch/DeepSpeed versions (see the module docstring)."""
    inside = Path(sys.prefix) / "var" / "slm" / "torch_extensions"
    try:
        inside.mkdir(parents=True, exist_ok=True)
        if os.access(inside, os.W_OK):
            return inside / _versions()
    except OSError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:12]
    return cache / "slm" / "torch_extensions" / f"env-{env}_{_versions()}"


def extensions_root() -> Path:
    """Where torch builds JIT extensions: `TORCH_EXTENSIONS_DIR`, set to `default_extensions_root()` if unset."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(default_extensions_root())
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def lock_holders(lock: Path) -> list[int]:
    """Processes on this host (that we may inspect) with `lock` open: the builder holds it open until it is done."""
    target = str(lock.resolve()) if lock.exists() else str(lock)
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(proc.name))
                    break
            except OSError:
                continue
    return holders


def on_network_fs(path: Path) -> bool:
    """Whether `path` lies on a network file system (where processes of other hosts may hold its files)."""
    best, kind = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return True  # cannot tell: be careful
    where = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (where == point or where.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind in NETWORK_FS or kind.startswith("fuse")


@contextlib.contextmanager
def _guard(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / GUARD, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_locks(root: Path, say: Callable[[str], None] = notice, announced: set | None = None) -> list[Path]:
    """Remove the build locks under `root` that a dead process left; announce (once) those a live one holds.

    Returns the locks removed. A lock is stale when no process on this host has it open and, on a network file
    system, it is older than `STALE_S`. The check and the removal run under an flock, and the lock is removed only
    if it is still the same file, so a lock that another process has just taken is never removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    announced = set() if announced is None else announced
    for lock in sorted(root.glob("*/lock")):
        with _guard(root):
            try:
                before = lock.stat()
            except FileNotFoundError:
                continue
            holders = lock_holders(lock)
            age = time.time() - before.st_mtime
            if holders:
                if lock not in announced:
                    announced.add(lock)
                    say(
                        f"waiting for process {', '.join(map(str, holders))}, which is building DeepSpeed's "
                        f"{lock.parent.name} op (lock {lock})"
                    )
                continue
            if on_network_fs(lock) and age < STALE_S:
                if lock not in announced:
                    announced.add(lock)
                    say(
                        f"waiting for {lock}: a DeepSpeed op build lock no process on this host holds, {age:.0f} s "
                        f"old; it may be another host's build (taken as stale after {STALE_S:.0f} s; delete it if "
                        f"no build runs)"
                    )
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == before.st_ino:
                    os.unlink(lock)
                    removed.append(lock)
                    say(
                        f"removed a stale DeepSpeed build lock {lock} ({age:.0f} s old, held by no running process: "
                        f"a build was killed); the {lock.parent.name} op is built again"
                    )
    return removed


@contextlib.contextmanager
def watching(root: Path, say: Callable[[str], None] = notice) -> Iterator[list[Path]]:
    """While the body runs, clear stale locks under `root` every `WATCH_EVERY_S`: a builder that dies while this
    process waits for it (torch waits for as long as the file exists) frees it. Yields the locks it removed."""
    removed: list[Path] = []
    announced: set = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(WATCH_EVERY_S):
            removed.extend(clear_stale_locks(root, say, announced))

    thread = threading.Thread(target=watch, name="slm-extension-locks", daemon=True)
    removed.extend(clear_stale_locks(root, say, announced))
    thread.start()
    try:
        yield removed
    finally:
        stop.set()
        thread.join()


def prepare_deepspeed_ops(say: Callable[[str], None] = notice) -> None:
    """Build or load DeepSpeed's CPU shared-memory op before DeepSpeed starts the process group, in this
    environment's folder, without hanging on a dead build's lock (see the module docstring).

    DeepSpeed caches the loaded op, so the `TorchBackend` it creates later reuses it. A no-op where DeepSpeed has no
    such op (GPUs) or it is not compatible."""
    root = extensions_root()
    from deepspeed.comm.torch import build_shm_op

    with watching(root, say) as removed:
        try:
            build_shm_op()
        except (ImportError, OSError, RuntimeError):
            if not removed:  # not a build this process waited for and whose lock a dead holder left
                raise
            build_shm_op()  # the dead holder left no whole binary: build it here
