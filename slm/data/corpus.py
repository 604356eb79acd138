"""Corpora through `datasets`: local jsonl/json, parquet, plain text and Arrow files, or hub names.

Local files are converted once to Arrow by `datasets` and then memory-mapped, so memory does
not grow with corpus size; order is the sorted file order, then the row order in each file.
"""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

from slm.config import CorpusConfig
from slm.errors import SlmError, describe

_BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}
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


def _read(cfg: CorpusConfig, files: list[str] | None):
    import datasets

    if files is None:  # a hub dataset name (needs a network)
        return datasets.load_dataset(cfg.path, split=cfg.split)
    builder = _builder(cfg, files)
    if builder == "arrow" and len(files) == 1:
        return datasets.Dataset.from_file(files[0])
    return datasets.load_dataset(builder, data_files=files, split="train")


def first_bad_utf8(path: str | Path) -> tuple[int, int] | None:
    """(byte offset, line number) of the first byte of `path` that is not UTF-8, or None when all of it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before the current chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = e.start - pending  # in this chunk; < 0 when the bad character began in the previous one
                return offset + at, lines + chunk[: max(at, 0)].count(b"\n") + 1
            if not chunk:
                return None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def utf8_copy(path: str | Path) -> str:
    """A copy of `path` with every byte that is not UTF-8 read as U+FFFD, cached by its content's sha256."""
    import datasets

    from slm.utils.io import atomic_open, sha256_file

    path = Path(path)
    out = Path(datasets.config.HF_DATASETS_CACHE) / "slm-utf8-replaced" / f"{sha256_file(path)[:16]}-{path.name}"
    if not out.is_file():
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(path, "rb") as src, atomic_open(out) as dst:
            while chunk := src.read(1 << 20):
                dst.write(decoder.decode(chunk).encode())
            dst.write(decoder.decode(b"", final=True).encode())
    return str(out)


def _is_decode_error(e: BaseException | None) -> bool:
    while e is not None and not isinstance(e, UnicodeDecodeError):
        e = e.__cause__ or e.__context__
    return e is not None


def _text_is_utf8(ds, text_field: str) -> bool:
    """Arrow takes a json or text file's bytes as they are; a byte that is not UTF-8 fails only when the
    text is read."""
    import pyarrow as pa

    try:
        ds.data.column(text_field).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def load_corpus(cfg: CorpusConfig):
    """The corpus as a memory-mapped `datasets.Dataset` with at least the text column.

    Bytes that are not UTF-8 in the text are an error naming the file, byte offset and line (`errors: strict`), or
    are read as U+FFFD from a repaired copy of each such file (`errors: replace`).
    """
    import datasets

    datasets.disable_progress_bars()
    files = resolve_files(cfg.path)
    if files is not None and all(Path(f).stat().st_size == 0 for f in files):
        raise SlmError(f"corpus.path {cfg.path!r}: the corpus is empty (0 documents)")
    try:
        try:
            ds = _read(cfg, files)
            utf8 = cfg.text_field not in ds.column_names or _text_is_utf8(ds, cfg.text_field)
        except Exception as e:  # the text builder decodes while reading
            if not _is_decode_error(e):
                raise
            utf8 = False
        if not utf8:
            bad = {f: at for f in files or [] if (at := first_bad_utf8(f))}
            if not bad:
                raise SlmError(f"corpus.path {cfg.path!r}: field {cfg.text_field!r} holds bytes that are not UTF-8")
            if cfg.errors == "strict":
                f, (offset, line) = next(iter(bad.items()))
                raise SlmError(
                    f"{f}: byte {offset} (line {line}) is not UTF-8 ({len(bad)} file(s) have such bytes); "
                    f"fix the file, or set corpus.errors=replace to read them as U+FFFD"
                )
            ds = _read(cfg, [utf8_copy(f) if f in bad else f for f in files])
    except SlmError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        raise SlmError(f"corpus.path {cfg.path!r}: could not be read ({describe(e)})") from None
    if cfg.text_field not in ds.column_names:
        raise SlmError(
            f"corpus.path {cfg.path!r}: no text field {cfg.text_field!r}; "
            f"columns are {ds.column_names} (set corpus.text_field)"
        )
    for key in ("noise_field", "completion_field"):
        if (name := getattr(cfg, key)) and name not in ds.column_names:
            raise SlmError(f"corpus.path {cfg.path!r}: no {key} {name!r}; columns are {ds.column_names}")
    if cfg.max_documents is not None and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    if len(ds) == 0:
        raise SlmError(f"corpus.path {cfg.path!r}: the corpus is empty (0 documents)")
    return ds


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 over the corpus files' contents and the fields read (hub datasets: their fingerprint)."""
    from slm.utils.io import sha256_files, sha256_json

    files = resolve_files(cfg.path)
    fields = {"text_field": cfg.text_field, "max_documents": cfg.max_documents, "noise_field": cfg.noise_field}
    if cfg.packing != "concat":  # (only when set, so that fingerprints of earlier runs stay valid)
        fields["packing"] = cfg.packing
    if cfg.errors != "strict":
        fields["errors"] = cfg.errors
    if cfg.completion_field is not None:
        fields["completion_field"] = cfg.completion_field
    if files is None:
        return sha256_json({"hub": cfg.path, "split": cfg.split, **fields})
    return sha256_json({"files": sha256_files([Path(f) for f in files]), **fields})
