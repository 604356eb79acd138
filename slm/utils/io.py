"""Atomic file writes and fingerprints (sha256) of files, directories, configs and checkpoints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from slm.errors import SlmError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFull(SlmError):
    """No space left on the device while writing `path` (exit 2): `written` bytes had gone to its temp file."""

    def __init__(self, path: Path, written: int):
        self.path, self.written = Path(path), written
        self.free = shutil.disk_usage(self.path.parent).free
        super().__init__(
            f"{path}: no space left on the device: it needs more than {written} bytes, {self.free} bytes are free; "
            f"free some space or write elsewhere, then rerun (nothing partial was kept)"
        )


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only whole: temp file in the same directory, fsync,
    rename on success; removed on any error, so a crash never leaves a partial `path`.
    A full disk (ENOSPC, EDQUOT) becomes `DiskFull`, a one-line error naming the path and the bytes needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, written) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SlmError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One digest over several files: their names (relative to `root`) and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_dir(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    path = Path(path)
    files = {p for pat in patterns for p in path.rglob(pat) if p.is_file() and not p.name.startswith(".")}
    return sha256_files(sorted(files), root=path)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a checkpoint's weight files (safetensors or bin)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return sha256_files(files) if files else ""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def checkpoint_identity(model_dir: str | Path) -> dict:
    """Cheap identity of a checkpoint directory, no weights hashed: config.json's sha256 (None without one) and
    each weight file's name, size and mtime. Rewritten weights change it; a copy that keeps the times does not."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    config = model_dir / "config.json"
    return {
        "config_sha256": sha256_file(config) if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
