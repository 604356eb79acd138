"""Corpora through `datasets`: local jsonl/json, parquet, plain text and Arrow files, or hub names.

Local files are converted once to Arrow by `datasets` and then memory-mapped, so memory does
not grow with corpus size; order is the sorted file order, then the row order in each file.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from slm.config import CorpusConfig
from slm.errors import SlmError, describe

_BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".arrow": "arrow"}
_BUILDER_BY_FORMAT = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text", "arrow": "arrow"}


def resolve_files(path: str | list[str]) -> list[str] | None:
    """Local files matching `path` (file, glob, directory or list), sorted; None if none exist (hub name)."""
    patterns = [path] if isinstance(path, str) else list(path)
    files: list[str] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDER_BY_SUFFIX)
        elif any(ch in pattern for ch in "*?["):
            files += sorted(glob.glob(pattern, recursive=True))
        elif p.exists():
            files.append(str(p))
        elif os.sep in pattern or p.suffix in _BUILDER_BY_SUFFIX:
            raise SlmError(f"corpus.path {pattern!r}: file not found")
        else:
            return None
    if not files:
        raise SlmError(f"corpus.path {path!r}: matches no files")
    return files


def _builder(cfg: CorpusConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return _BUILDER_BY_FORMAT[cfg.format]
    suffixes = {Path(f).suffix for f in files}
    builders = {_BUILDER_BY_SUFFIX.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise SlmError(
            f"corpus.path {cfg.path!r}: cannot infer one format from suffixes {sorted(suffixes)}; "
            f"set corpus.format to one of jsonl, parquet, text, arrow"
        )
    return builders.pop()


def load_corpus(cfg: CorpusConfig):
    """The corpus as a memory-mapped `datasets.Dataset` with at least the text column."""
    import datasets

    datasets.disable_progress_bars()
    files = resolve_files(cfg.path)
    if files is not None and all(Path(f).stat().st_size == 0 for f in files):
        raise SlmError(f"corpus.path {cfg.path!r}: the corpus is empty (0 documents)")
    try:
        if files is None:  # a hub dataset name (needs a network)
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        else:
            builder = _builder(cfg, files)
            if builder == "arrow" and len(files) == 1:
                ds = datasets.Dataset.from_file(files[0])
            else:
                ds = datasets.load_dataset(builder, data_files=files, split="train")
    except SlmError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        raise SlmError(f"corpus.path {cfg.path!r}: could not be read ({describe(e)})") from None
    if cfg.text_field not in ds.column_names:
        raise SlmError(f"corpus.path {cfg.path!r}: no text field {cfg.text_field!r}; columns are {ds.column_names} (set corpus.text_field)")
    if cfg.noise_field and cfg.noise_field not in ds.column_names:
        raise SlmError(f"corpus.path {cfg.path!r}: no noise field {cfg.noise_field!r}; columns are {ds.column_names}")
    if cfg.max_documents is not None and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    if len(ds) == 0:
        raise SlmError(f"corpus.path {cfg.path!r}: the corpus is empty (0 documents)")
    return ds


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 over the corpus files' contents and the fields read (hub datasets: their fingerprint)."""
    from slm.io import sha256_files, sha256_json

    files = resolve_files(cfg.path)
    fields = {"text_field": cfg.text_field, "max_documents": cfg.max_documents, "noise_field": cfg.noise_field}
    if cfg.packing != "concat":  # (only when set, so that fingerprints of earlier runs stay valid)
        fields["packing"] = cfg.packing
    if files is None:
        return sha256_json({"hub": cfg.path, "split": cfg.split, **fields})
    return sha256_json({"files": sha256_files([Path(f) for f in files]), **fields})

