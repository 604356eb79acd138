"""Helpers shared by the benchmarks in scripts/bench/ (not part of the `slm` package).

Each measurement runs in a fresh child process (`run_worker`), so that the peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, a high-water mark that never goes down) belongs to that
measurement alone. Children are forked from a fork server that has the libraries imported (no torch op
run), so starting one costs a fraction of a second; the parent watches the child's RSS (psutil) and kills
it past a memory budget or a time limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MACHINE_NOTE = (
    "CPU-only machine with 2 cores shared with other engineers' jobs: wall-clock numbers are noisy "
    "and pessimistic (the load average before/after each run is recorded); CPU seconds are given beside wall seconds."
)


# ----------------------------------------------------------------------------- memory


def maxrss_mb() -> float:
    """High-water resident set size of this process so far, in MiB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def malloc_trim() -> None:
    """Hand the freed heap back to the OS (glibc), so that RSS shows what is still live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(obj) -> dict:
    """Bytes held by the tensors reachable from `obj` (dataclasses, lists, dicts, plain objects such as a
    transformers Cache): `logical` = sum of numel * itemsize over distinct tensors, `storage` = sum of the
    sizes of the distinct storages behind them (a small view of a large tensor keeps the large one alive)."""
    import torch

    seen_obj: set[int] = set()
    tensors: dict[tuple, int] = {}
    storages: dict[int, int] = {}

    def walk(x, depth=0):
        if depth > 12 or id(x) in seen_obj:
            return
        seen_obj.add(id(x))
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            tensors[(st.data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))] = (
                x.numel() * x.element_size()
            )
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(x, (list, tuple, set)):
            for y in x:
                walk(y, depth + 1)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y, depth + 1)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name), depth + 1)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            for y in vars(x).values():
                walk(y, depth + 1)

    walk(obj)
    return {"logical": sum(tensors.values()), "storage": sum(storages.values())}


# ----------------------------------------------------------------------------- machine


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    import torch

    import slm

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "slm": slm.__version__,
        "load_average_at_start": load_average(),
        "machine_note": MACHINE_NOTE,
    }


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------- child processes

_CTX = None


def start_workers(threads: int, preload: list[str], env_extra: dict | None = None):
    """Start the fork server that every measurement process is forked from.

    The server imports `preload` (torch, transformers, slm, ...) once and runs no torch op, so each
    measurement is a fresh process that starts in a fraction of a second, with its own address space and
    its own RSS high-water mark (starting at the RSS of the imported libraries, which is reported as the
    baseline). Environment (thread counts, no progress bars) is set here, before the server starts."""
    import multiprocessing as mp

    global _CTX
    os.environ.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        TRANSFORMERS_VERBOSITY="error",
        **(env_extra or {}),
    )
    _CTX = mp.get_context("forkserver")
    _CTX.set_forkserver_preload(["psutil", "_util", *preload])
    return _CTX


def _child(target, spec: dict, threads: int, conn, log_path: str) -> None:
    import traceback
    import warnings

    warnings.simplefilter("ignore")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        set_threads(threads)
        result = target(spec)
        result.setdefault("status", "ok")
    except BaseException as e:  # report, never hang the parent
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(result)
    conn.close()


def run_worker(target, spec: dict, threads: int, timeout_s: float, mem_budget_mb: float | None = None) -> dict:
    """Run `target(spec)` in a fresh process forked from the server; return its result dict, or
    {"status": "skipped", "reason": ...} when it ran past `timeout_s` or past `mem_budget_mb` of RSS
    (it is then killed), or {"status": "failed", ...} when it raised or died."""
    import tempfile

    import psutil

    assert _CTX is not None, "call start_workers first"
    recv, send = _CTX.Pipe(duplex=False)
    fd, log_path = tempfile.mkstemp(prefix="slm-bench-", suffix=".log")
    os.close(fd)
    started = time.perf_counter()
    proc = _CTX.Process(target=_child, args=(target, spec, threads, send, log_path), daemon=True)
    proc.start()
    send.close()
    ps = psutil.Process(proc.pid)
    killed, result, rss_seen = None, None, 0.0
    while True:
        if recv.poll(0.1):
            try:
                result = recv.recv()
            except EOFError:
                result = None
            break
        if not proc.is_alive():
            break
        elapsed = time.perf_counter() - started
        try:
            rss = ps.memory_info().rss / 2**20
            rss_seen = max(rss_seen, rss)
        except psutil.Error:
            rss = 0.0
        if elapsed > timeout_s:
            killed = f"ran past the time budget of {timeout_s:.0f} s (killed after {elapsed:.0f} s)"
        elif mem_budget_mb is not None and rss > mem_budget_mb:
            killed = f"resident memory reached {rss:.0f} MiB, past the budget of {mem_budget_mb:.0f} MiB (killed)"
        if killed:
            proc.kill()  # the process we started, by its own handle
            break
    proc.join(timeout=30)
    wall = time.perf_counter() - started
    log_tail = ""
    try:
        log_tail = "\n".join(Path(log_path).read_text(errors="replace").strip().splitlines()[-8:])
        Path(log_path).unlink()
    except OSError:
        pass
    if killed:
        return {
            "status": "skipped",
            "reason": killed,
            "process_seconds": round(wall, 1),
            "rss_seen_mb": round(rss_seen, 1),
        }
    if result is None:
        return {
            "status": "failed",
            "reason": f"process died (exit code {proc.exitcode}); log: {log_tail}",
            "process_seconds": round(wall, 1),
        }
    result["process_seconds"] = round(wall, 1)
    return result


# ----------------------------------------------------------------------------- output


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*(str(c) for c in r))
    Console().print(table)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)
