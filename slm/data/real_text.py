"""A real-text corpus from the human-written documentation that ships on every Debian machine, mixed with junk.

Clean text (sources, in a fixed order so that the same machine always gives the same corpus):
  man   English manual pages (`MAN_DIR/man[1-9]/*`, symlinks and `.so` redirects skipped), rendered to plain text
        by groff (`groff -man -Tutf8 -P-cbou -rHY=0 -dAD=l`: no hyphenation, ragged right, one line per paragraph);
  doc   package documentation in `DOC_DIR/*/` (README*, NEWS*, *.txt, *.md, *.markdown; gzip read), UTF-8 only.
  Every line is stripped and its runs of spaces collapsed; a document is cut to `max_chars` at a paragraph end;
  one shorter than `min_chars` is skipped. `source` is `man1`..`man9` or `doc`. At most `max_per_family`
  documents come from one family (a command's pages: `git-*`, `gcloud_*`, `EVP_*`; a package's documentation
  directory), the way web corpora cap documents per domain: one family's generated pages (16,631 of this
  machine's 19,778 English manual pages are gcloud's) must not be the corpus.

Splits: every candidate file is ranked by sha256(f"{seed}:{path}") (a shuffle that is stable when files are added
or removed); rendering in that order, the first `reference_documents` usable documents are the reference corpus
(the clean, high-quality text the reference model learns), the next `validation_documents` the held-out corpus and
the next `train_documents` the training corpus. No file is in two splits.

Junk (training corpus only), cut from the machine's own non-prose bytes and inserted at paragraph boundaries of
the training documents, the way boilerplate and binary debris sit inside crawled pages:
  hexdump   an `xxd`-style dump of bytes of an executable (offset, 16 bytes in hex, their printable characters)
  base64    a base64 block of an image or binary file (as in e-mail attachments and data URIs)
  symbols   runs of >= 6 printable bytes of a shared library, space-separated (`strings`; symbol names)
  markup    the tags of an HTML page of DOC_DIR with their text removed (navigation and layout markup)
  shuffled  the words of another training document in random order (word salad, spam)
The kinds are equally likely; a span is 200-1500 characters. Each document's junk is drawn to make up a share
r x junk_share / (1 - junk_share) of its clean characters, r uniform in [0, 2) per document, so the training
corpus is about `junk_share` junk by characters, unevenly spread. Every span is recorded as [start, end) character
offsets (`noise_spans`) with its kind (`noise_kinds`), columns used only to *measure* the selection, never to
select. The mix is fixed by this docstring and the config, never tuned to a result.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from slm.errors import SlmError

JUNK_KINDS = ("hexdump", "base64", "symbols", "markup", "shuffled")
SPAN_CHARS = (200, 1500)
DOC_NAME = re.compile(r"^(README|NEWS).*|.*\.(txt|md|markdown)(\.gz)?$", re.IGNORECASE)
GROFF = ("groff", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-dAD=l", "-rLL=10000n")
_SPACES = re.compile(r"[ \t]+")
_TAG = re.compile(r"<[^<>]{1,300}>")
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{6,}")


@dataclass(frozen=True)
class Candidate:
    path: Path
    source: str  # man1..man9 or doc
    family: str  # the command or package a document belongs to (at most max_per_family documents of one)


_FAMILY_END = re.compile(r"[._:-]")


def man_family(path: Path) -> str:
    """`git-commit.1.gz` -> git, `gcloud_alpha_....1.gz` -> gcloud, `EVP_DigestInit.3ssl.gz` -> evp."""
    return _FAMILY_END.split(path.name, maxsplit=1)[0].lower()


def _rank(seed: int, path: Path) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def man_candidates(man_dir: Path) -> list[Candidate]:
    """Regular files of the English sections man1..man9 (translations live in other subdirectories)."""
    out = []
    for section in sorted(man_dir.glob("man[1-9]")):
        out += [
            Candidate(p, section.name, man_family(p))
            for p in sorted(section.iterdir())
            if p.is_file() and not p.is_symlink()
        ]
    return out


def doc_candidates(doc_dir: Path) -> list[Candidate]:
    return [
        Candidate(p, "doc", p.relative_to(doc_dir).parts[0])  # the package's directory
        for p in sorted(doc_dir.rglob("*"))
        if p.is_file() and not p.is_symlink() and DOC_NAME.match(p.name)
    ]


def all_candidates(cfg) -> list[Candidate]:
    """Every manual page and documentation file of the config's trees, ranked by sha256(f"{seed}:{path}")."""
    candidates = []
    for d in cfg.man_dirs:
        candidates += man_candidates(Path(d))
    for d in cfg.doc_dirs:
        candidates += doc_candidates(Path(d))
    return sorted(candidates, key=lambda c: _rank(cfg.seed, c.path))


def sources_fingerprint(cfg) -> str:
    """sha256 of the candidate files' paths, sizes and modification times: a rebuild when the machine's changed."""
    h = hashlib.sha256()
    for c in all_candidates(cfg):
        st = c.path.stat()
        h.update(f"{c.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def normalise(text: str) -> str:
    """Lines stripped, runs of spaces collapsed, at most one blank line in a row."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def render_man(path: Path) -> str | None:
    """Plain text of a manual page (header and footer lines dropped); None for a `.so` redirect or a failure."""
    try:
        source = _read_bytes(path)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if source.lstrip().startswith(b".so "):
        return None
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "10000"}
    done = subprocess.run(GROFF, input=source, capture_output=True, env=env, timeout=60, check=False)
    if done.returncode != 0:
        return None
    lines = done.stdout.decode("utf-8", errors="replace").strip("\n").split("\n")
    return normalise("\n".join(lines[1:-1]))  # the first and last lines are the running header and footer


def read_doc(path: Path) -> str | None:
    try:
        return normalise(_read_bytes(path).decode("utf-8"))
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
        return None


def cut(text: str, max_chars: int) -> str:
    """The text up to the last paragraph end within max_chars (or max_chars if its first paragraph is longer)."""
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n\n", 0, max_chars)
    return text[: end if end > 0 else max_chars].rstrip()


def documents(candidates: list[Candidate], cfg, wanted: int) -> Iterator[tuple[Candidate, str]]:
    """Usable documents in the candidates' order (at most cfg.max_per_family of a family), rendered `cfg.threads`
    at a time, until `wanted` are found."""

    def load(c: Candidate) -> str | None:
        text = render_man(c.path) if c.source.startswith("man") else read_doc(c.path)
        return cut(text, cfg.max_chars) if text and len(text) >= cfg.min_chars else None

    per_family: dict[str, int] = {}
    found, chunk = 0, 8 * cfg.threads
    with ThreadPoolExecutor(cfg.threads) as pool:
        for start in range(0, len(candidates), chunk):
            batch = [c for c in candidates[start : start + chunk] if per_family.get(c.family, 0) < cfg.max_per_family]
            for c, text in zip(batch, pool.map(load, batch)):
                if text is not None and found < wanted and per_family.get(c.family, 0) < cfg.max_per_family:
                    per_family[c.family] = per_family.get(c.family, 0) + 1
                    found += 1
                    yield c, text
            if found >= wanted:
                return


# ----------------------------------------------------------------------------- junk


class JunkSource:
    """Spans of each junk kind cut from the machine's files, drawn with one seeded generator."""

    def __init__(self, cfg, rng: random.Random, train_texts: list[str]):
        self.rng, self.train_texts = rng, train_texts
        self.binaries = _files(cfg.binary_dirs, lambda p: p.stat().st_size > 20_000 and _is_elf(p))
        self.libraries = _files(cfg.library_dirs, lambda p: ".so" in p.name and p.stat().st_size > 20_000)
        self.images = _files(cfg.image_dirs, lambda p: p.suffix in (".png", ".gif", ".jpg") and p.stat().st_size > 2000)
        self.pages = _files(cfg.doc_dirs, lambda p: p.suffix == ".html")
        for key, files in (
            ("binary_dirs", self.binaries),
            ("library_dirs", self.libraries),
            ("image_dirs", self.images),
            ("doc_dirs", self.pages),
        ):
            if not files:
                raise SlmError(f"real-text corpus: no junk source file under {key} = {getattr(cfg, key)}")

    def span(self, kind: str, chars: int) -> str:
        text = getattr(self, f"_{kind}")(chars)
        if len(text) > chars:
            text = text[:chars]
            if "\n" in text:  # line-based junk (a dump, a base64 block) ends with a whole line
                text = text[: text.rfind("\n")]
        return text.strip("\n") or "\u2400"  # never empty (an empty span would tag nothing)

    def _chunk(self, files: list[Path], size: int) -> bytes:
        path = self.rng.choice(files)
        length = path.stat().st_size
        start = self.rng.randrange(max(1, length - size))
        with path.open("rb") as f:
            f.seek(start)
            return f.read(size)

    def _hexdump(self, chars: int) -> str:
        data, lines = self._chunk(self.binaries, chars // 3 + 16), []
        base = self.rng.randrange(0, 1 << 24) & ~0xF
        for i in range(0, len(data), 16):
            row = data[i : i + 16]
            groups = " ".join(row[j : j + 2].hex() for j in range(0, len(row), 2))
            shown = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
            lines.append(f"{base + i:08x}: {groups:<39}  {shown}")
        return "\n".join(lines)

    def _base64(self, chars: int) -> str:
        encoded = base64.b64encode(self._chunk(self.images, chars)).decode()
        return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))

    def _symbols(self, chars: int) -> str:
        runs = _PRINTABLE_RUN.findall(self._chunk(self.libraries, 16 * chars))
        return " ".join(r.decode("ascii") for r in runs) or self._hexdump(chars)

    def _markup(self, chars: int) -> str:
        page = self.rng.choice(self.pages).read_text(encoding="utf-8", errors="replace")
        tags = _TAG.findall(page)
        start = self.rng.randrange(max(1, len(tags) - 40))
        return "".join(tags[start:]) or self._symbols(chars)

    def _shuffled(self, chars: int) -> str:
        words = self.rng.choice(self.train_texts).split()
        self.rng.shuffle(words)
        return " ".join(words)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _files(dirs: list[str], keep) -> list[Path]:
    """Regular files under dirs (recursively, sorted; a missing dir is skipped) that `keep` accepts."""
    out = []
    for d in dirs:
        for p in sorted(Path(d).rglob("*")) if Path(d).is_dir() else []:
            try:
                if p.is_file() and not p.is_symlink() and keep(p):
                    out.append(p)
            except OSError:
                continue
    return out


def with_junk(text: str, junk: JunkSource, share: float, rng: random.Random) -> tuple[str, list, list]:
    """(text with junk spans inserted at paragraph ends, their [start, end) offsets, their kinds)."""
    budget = len(text) * rng.uniform(0, 2) * share / (1 - share)
    paragraphs, pieces, spans, kinds = text.split("\n\n"), [], [], []
    n_spans = []
    while budget >= SPAN_CHARS[0]:
        n = min(int(budget), rng.randint(*SPAN_CHARS))
        n_spans.append(n)
        budget -= n
    slots = sorted(rng.randrange(len(paragraphs) + 1) for _ in n_spans)
    pos, k = 0, 0
    for i in range(len(paragraphs) + 1):
        while k < len(slots) and slots[k] == i:
            kind = rng.choice(JUNK_KINDS)
            span = junk.span(kind, n_spans[k])
            if pieces:
                pieces.append("\n\n")
                pos += 2
            spans.append([pos, pos + len(span)])
            kinds.append(kind)
            pieces.append(span)
            pos += len(span)
            k += 1
        if i < len(paragraphs):
            if pieces:
                pieces.append("\n\n")
                pos += 2
            pieces.append(paragraphs[i])
            pos += len(paragraphs[i])
    return "".join(pieces), spans, kinds


# ----------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class RealTextFiles:
    reference: Path
    train: Path
    validation: Path
    manifest: Path


def build_real_text(cfg) -> RealTextFiles:
    """Write reference.jsonl, train.jsonl, validation.jsonl and manifest.json under cfg.out_dir (atomically)."""
    from slm.utils.io import atomic_write_text

    if shutil.which("groff") is None:
        raise SlmError(
            "real-text corpus: groff is not installed (it renders the manual pages): apt-get install groff-base"
        )
    candidates = all_candidates(cfg)
    if not candidates:
        raise SlmError(f"real-text corpus: no manual page or documentation file under {cfg.man_dirs + cfg.doc_dirs}")
    sizes = {
        "reference": cfg.reference_documents,
        "validation": cfg.validation_documents,
        "train": cfg.train_documents,
    }
    docs = list(documents(candidates, cfg, sum(sizes.values())))
    if len(docs) < sum(sizes.values()):
        raise SlmError(
            f"real-text corpus: {len(docs)} usable documents under {cfg.man_dirs + cfg.doc_dirs} "
            f"(>= {cfg.min_chars} characters), fewer than the {sum(sizes.values())} asked for ({sizes})"
        )
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name] = docs[start : start + n]
        start += n

    rng = random.Random(cfg.seed)
    train_texts = [text for _, text in splits["train"]]
    junk = JunkSource(cfg, rng, train_texts)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    for name, part in splits.items():
        rows[name] = []
        for c, text in part:
            row = {"text": text, "source": c.source, "path": str(c.path)}
            if name == "train":
                row["text"], row["noise_spans"], row["noise_kinds"] = with_junk(text, junk, cfg.junk_share, rng)
            rows[name].append(row)
    files = RealTextFiles(*(out / f"{n}.jsonl" for n in ("reference", "train", "validation")), out / "manifest.json")
    for name in ("reference", "train", "validation"):
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name])
        atomic_write_text(getattr(files, name), body)
    atomic_write_text(files.manifest, json.dumps(manifest(rows, len(candidates)), indent=2) + "\n")
    return files


def manifest(rows: dict[str, list[dict]], candidates: int) -> dict:
    """What each split holds: documents and characters by source, junk characters by kind, the file list's hash."""
    out = {"candidates": candidates, "splits": {}}
    for name, part in rows.items():
        by_source: dict[str, int] = {}
        for r in part:
            by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        chars = sum(len(r["text"]) for r in part)
        entry = {
            "documents": len(part),
            "characters": chars,
            "documents_by_source": dict(sorted(by_source.items())),
            "paths_sha256": hashlib.sha256("\n".join(r["path"] for r in part).encode()).hexdigest(),
        }
        if name == "train":
            junk_by_kind = {k: 0 for k in JUNK_KINDS}
            for r in part:
                for (a, b), k in zip(r["noise_spans"], r["noise_kinds"]):
                    junk_by_kind[k] += b - a
            entry["junk_characters_by_kind"] = junk_by_kind
            entry["junk_share"] = round(sum(junk_by_kind.values()) / max(chars, 1), 4)
        out["splits"][name] = entry
    return out
