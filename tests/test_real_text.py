"""The real-text corpus (slm.data.real_text) on a small tree of manual pages, documentation and junk sources."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import re
import shutil

import pytest

from slm import cli
from slm.config import RealTextDataConfig
from slm.data import real_text
from slm.errors import SlmError

pytestmark = pytest.mark.skipif(shutil.which("groff") is None, reason="groff renders the manual pages")

WORDS = [
    "the",
    "file",
    "is",
    "read",
    "from",
    "standard",
    "input",
    "and",
    "each",
    "line",
    "is",
    "printed",
    "to",
    "the",
    "output",
    "with",
    "its",
    "number",
]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."


def man_page(name: str, rng: random.Random, paragraphs: int = 12) -> bytes:
    body = "".join(f".PP\n{' '.join(sentence(rng) for _ in range(3))}\n" for _ in range(paragraphs))
    head = f'.TH {name.upper()} 1 "2024" "tests" "User Commands"\n'
    return f"{head}.SH NAME\n{name} \\- a test tool\n.SH DESCRIPTION\n{body}".encode()


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """man/ (English sections, a translation, a redirect, a symlink, one big family), doc/, bin/, lib/, icons/."""
    root = tmp_path_factory.mktemp("machine")
    rng = random.Random(5)
    man1 = root / "man" / "man1"
    man1.mkdir(parents=True)
    for i in range(24):
        (man1 / f"tool{i}.1.gz").write_bytes(gzip.compress(man_page(f"tool{i}", rng)))
    for i in range(6):  # one family: at most max_per_family of them
        (man1 / f"git-sub{i}.1").write_bytes(man_page(f"git-sub{i}", rng))
    (man1 / "redirect.1").write_bytes(b".so man1/tool0.1\n")
    (man1 / "link.1.gz").symlink_to(man1 / "tool1.1.gz")
    (root / "man" / "de" / "man1").mkdir(parents=True)
    (root / "man" / "de" / "man1" / "werkzeug.1").write_bytes(man_page("werkzeug", rng))
    for i in range(8):
        pkg = root / "doc" / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "README").write_text("\n\n".join(sentence(rng) for _ in range(30)) + "\n")
        (pkg / "NEWS.gz").write_bytes(gzip.compress("\n\n".join(sentence(rng) for _ in range(30)).encode()))
        (pkg / "copyright").write_text("not documentation\n" * 50)
        (pkg / "index.html").write_text(
            '<html><head><title>t</title></head><body><div class="nav"><a href="#x">Home</a></div>'
            + "".join(f'<p id="p{j}">{sentence(rng)}</p>' for j in range(40))
            + "</body></html>"
        )
    (root / "doc" / "pkg0" / "README.latin1").write_bytes("caf\xe9 ".encode("latin-1") * 200)  # not UTF-8: skipped
    (root / "bin").mkdir()
    (root / "bin" / "prog").write_bytes(b"\x7fELF" + rng.randbytes(40_000))
    (root / "bin" / "script").write_bytes(b"#!/bin/sh\n" + b"echo hi\n" * 5000)  # not ELF: no hexdump from it
    (root / "lib").mkdir()
    (root / "lib" / "libx.so.1").write_bytes(b"\0".join(f"symbol_name_{i}".encode() for i in range(4000)))
    (root / "icons").mkdir()
    (root / "icons" / "a.png").write_bytes(b"\x89PNG" + rng.randbytes(9000))
    return root


def config(machine, out, **kw) -> RealTextDataConfig:
    values = dict(
        out_dir=str(out),
        seed=3,
        reference_documents=8,
        validation_documents=4,
        train_documents=10,
        junk_share=0.3,
        min_chars=200,
        max_per_family=2,
        man_dirs=[str(machine / "man")],
        doc_dirs=[str(machine / "doc")],
        binary_dirs=[str(machine / "bin")],
        library_dirs=[str(machine / "lib")],
        image_dirs=[str(machine / "icons")],
    )
    return RealTextDataConfig(**{**values, **kw})


def said(capsys) -> str:
    """What the stage printed (rich wraps long lines on stderr), one space between words."""
    out = capsys.readouterr()
    return " ".join((out.out + out.err).split())


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clean_text(path: str, cfg) -> str:
    from pathlib import Path

    p = Path(path)
    text = real_text.render_man(p) if "/man/" in path else real_text.read_doc(p)
    return real_text.cut(text, cfg.max_chars)


def without_spans(row: dict) -> str:
    text, pieces, pos = row["text"], [], 0
    for a, b in row["noise_spans"]:
        pieces.append(text[pos:a])
        pos = b
    pieces.append(text[pos:])
    return re.sub(r"\n{3,}", "\n\n", "".join(pieces)).strip()


def test_corpus_is_deterministic_split_by_file_and_skips_what_is_not_prose(machine, tmp_path):
    cfg = config(machine, tmp_path / "a")
    files = real_text.build_real_text(cfg)
    again = real_text.build_real_text(config(machine, tmp_path / "b"))
    for name in ("reference", "train", "validation", "manifest"):
        assert getattr(files, name).read_bytes() == getattr(again, name).read_bytes(), name
    splits = {name: read_rows(getattr(files, name)) for name in ("reference", "train", "validation")}
    assert [len(splits[n]) for n in ("reference", "validation", "train")] == [8, 4, 10]
    paths = [r["path"] for rows in splits.values() for r in rows]
    assert len(paths) == len(set(paths))  # no file in two splits
    assert not any("/de/" in p or "redirect" in p or "link" in p or "copyright" in p or "latin1" in p for p in paths)
    assert sum("git-sub" in p for p in paths) <= cfg.max_per_family
    assert {r["source"] for rows in splits.values() for r in rows} <= {"man1", "doc"}
    other_seed = real_text.build_real_text(config(machine, tmp_path / "c", seed=4))
    assert [r["path"] for r in read_rows(other_seed.reference)] != [r["path"] for r in splits["reference"]]
    man = next(r for r in splits["reference"] if r["source"] == "man1")
    assert "a test tool" in man["text"] and ".PP" not in man["text"] and "  " not in man["text"]
    assert "noise_spans" not in splits["reference"][0] and "noise_spans" not in splits["validation"][0]


def test_junk_spans_cover_exactly_the_inserted_junk(machine, tmp_path):
    cfg = config(machine, tmp_path / "a")
    files = real_text.build_real_text(cfg)
    rows = read_rows(files.train)
    junk_chars, by_kind = 0, {k: 0 for k in real_text.JUNK_KINDS}
    for row in rows:
        spans, kinds = row["noise_spans"], row["noise_kinds"]
        assert len(spans) == len(kinds) and set(kinds) <= set(real_text.JUNK_KINDS)
        assert all(0 <= a < b <= len(row["text"]) for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # sorted, disjoint
        assert without_spans(row) == clean_text(row["path"], cfg)  # outside the spans: the clean document
        for (a, b), kind in zip(spans, kinds):
            junk = row["text"][a:b]
            by_kind[kind] += b - a
            if kind == "hexdump":
                assert all(re.fullmatch(r"[0-9a-f]{8}: [0-9a-f ]{39}  .{1,16}", line) for line in junk.split("\n"))
            if kind == "base64":
                base64.b64decode(junk.replace("\n", "")[: 4 * ((b - a - junk.count("\n")) // 4)])
        junk_chars += sum(b - a for a, b in spans)
    manifest = json.loads(files.manifest.read_text())["splits"]["train"]
    assert manifest["junk_characters_by_kind"] == by_kind
    assert manifest["junk_share"] == round(junk_chars / sum(len(r["text"]) for r in rows), 4)
    assert 0.1 < manifest["junk_share"] < 0.5  # drawn around junk_share 0.3 (r uniform in [0, 2) per document)
    none = read_rows(real_text.build_real_text(config(machine, tmp_path / "b", junk_share=0.0)).train)
    assert all(r["noise_spans"] == [] for r in none)


def test_errors_name_what_is_missing(machine, tmp_path):
    with pytest.raises(SlmError, match=r"usable documents .*fewer than the 1022 asked for"):
        real_text.build_real_text(config(machine, tmp_path / "a", reference_documents=1000, train_documents=18))
    with pytest.raises(SlmError, match=r"no junk source file under image_dirs"):
        real_text.build_real_text(config(machine, tmp_path / "b", image_dirs=[str(tmp_path / "nothing")]))
    with pytest.raises(SlmError, match=r"no manual page or documentation file under"):
        real_text.build_real_text(
            config(machine, tmp_path / "c", man_dirs=[str(tmp_path / "x")], doc_dirs=[str(tmp_path / "y")])
        )


def test_stage_skips_when_done_and_reruns_when_the_machine_changed(machine, tmp_path, capsys):
    from slm.stages.registry import stage_runner

    out = tmp_path / "data"
    args = [f"{k}={v}" for k, v in config(machine, out).model_dump().items() if k != "out_dir"]
    sets = [x for a in args for x in ("--set", a.replace("'", '"'))]
    code = cli.run_cli(["data", "real-text", "--set", f"out_dir={out}", *sets])
    assert code == 0, capsys.readouterr()
    first = json.loads((out / "stage.json").read_text())
    assert first["status"] == "complete" and first["metrics"]["splits"]["train"]["documents"] == 10
    capsys.readouterr()
    stage_runner("real_text_data")(config(machine, out))
    assert "complete for this config; skipping" in said(capsys)
    page = machine / "man" / "man1" / "tool3.1.gz"
    st = page.stat()
    os.utime(page, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        stage_runner("real_text_data")(config(machine, out))
        assert "an input changed" in said(capsys)
    finally:
        os.utime(page, ns=(st.st_atime_ns, st.st_mtime_ns))
