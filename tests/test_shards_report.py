"""`slm shards report` (issue 13, item 3): the selection report on shards without any ground-truth column, scored
from a corpus that is not the demo (two files, one of clean sentences, one of web junk), checked in Chromium."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from slm import cli
from slm.config import CorpusConfig, ReferenceConfig, ScoreConfig, ShardsReportConfig
from slm.data.tokenizer import load_tokenizer, train_corpus_tokenizer
from slm.errors import SlmError
from slm.shards.report import build_report, sample_rows
from tests.conftest import TINY_MODEL, TINY_TRAIN
from tests.test_own_corpus import JUNK, clean_document, write_jsonl

EVIL = "<i>forum</i> & co"  # a source name that HTML must escape
SCRIPT = '<script>alert("x")</script>'


def junk(rng: random.Random) -> str:
    """Navigation, spam and a hash: web junk."""
    nav = " | ".join(rng.sample(JUNK[:6], 4))
    spam = " ".join(rng.choice(JUNK[6:]) for _ in range(rng.randint(3, 8)))
    return f"{nav} {spam} {''.join(rng.choice('0123456789abcdef') for _ in range(rng.randint(20, 40)))} "


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory):
    """news.jsonl (clean) and forum.jsonl (junk, one document holding a <script> tag), a tokenizer trained on
    both, a tiny reference on clean text, and the two files scored into shards (no noise column)."""
    from slm.stages import reference, score

    root = tmp_path_factory.mktemp("report")
    rng = random.Random(3)
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    news = [{"text": clean_document(rng), "source": "news"} for _ in range(120)]
    forum = [{"text": junk(rng) + (SCRIPT if i == 0 else ""), "source": EVIL} for i in range(80)]
    for name, rows in (("news.jsonl", news), ("forum.jsonl", forum)):
        (corpus_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl(root / "hq.jsonl", [clean_document(rng) for _ in range(200)])
    corpus = CorpusConfig(path=str(corpus_dir))
    train_corpus_tokenizer([corpus, CorpusConfig(path=str(root / "hq.jsonl"))], 400, root / "tok")
    ref = reference.run(
        ReferenceConfig.model_validate(
            dict(
                out_dir=str(root / "ref"),
                tokenizer=str(root / "tok"),
                corpus={"path": str(root / "hq.jsonl")},
                model=TINY_MODEL,
                train={**TINY_TRAIN, "max_steps": 40, "checkpoint_every": 40, "eval_every": 40},
            )
        )
    )
    cfg = ScoreConfig(
        out_dir=str(root / "shards"),
        reference=ref["outputs"]["model"],
        corpus=corpus,
        seq_len=64,
        documents_per_shard=60,
    )
    score.run(cfg)
    assert "noise" not in json.dumps(json.loads((root / "shards" / "manifest.json").read_text())["shards"])
    return {"root": root, "shards": cfg.out_dir, "corpus": corpus, "reference": ref["outputs"]["model"]}


class Page(HTMLParser):
    """The tags of a page and the text a browser shows (entities decoded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_data(self, data):
        self.text += data


def report_cfg(own_shards, tmp_path, **kw) -> ShardsReportConfig:
    return ShardsReportConfig(out_dir=str(tmp_path / "r"), shards=own_shards["shards"], **kw)


def test_sample_rows_spread_evenly():
    assert sample_rows(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_rows(3, 100).tolist() == [0, 1, 2]
    with pytest.raises(SlmError, match="no rows"):
        sample_rows(0, 4)


def test_report_without_a_model_keeps_clean_sources_and_escapes_text(own_shards, tmp_path, capsys):
    out = tmp_path / "r"
    code = cli.run_cli(
        [
            "shards",
            "report",
            own_shards["shards"],
            "--ratio",
            "0.5",
            "--corpus",
            str(own_shards["corpus"].path),
            "--out",
            str(out),
            "--set",
            "examples=400",
            "--set",
            "min_tokens=1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["score"] == "proxy" and report["unit"] == "document" and report["model"] is None
    assert abs(report["kept_fraction"] - 0.5) < 1e-3 and report["sampled_rows"] == report["rows"]  # all rows (< 512)
    shares = {r["source"]: r["kept_share"] for r in report["per_source"]}
    assert set(shares) == {"news", EVIL}
    assert shares["news"] > shares[EVIL] + 0.2  # the reference (trained on clean text) finds the junk hard
    assert report["mean_ref_loss_kept"] < report["mean_ref_loss_dropped"]
    assert sum(r["tokens"] for r in report["per_shard"]) == report["valid_tokens"]
    # the ranking: the most kept document keeps at least the share of the least kept
    assert report["most_kept"][0]["kept_share"] >= report["least_kept"][0]["kept_share"]
    assert all(d["source"] == "news" for d in report["most_kept"][:3])
    dropped = [r["piece"] for r in report["token_strings"]["most_dropped"]]
    assert any(p.strip() in {"|", "!!!", "BUY", "FREE"} or p.strip().isdigit() for p in dropped[:5]), dropped

    page = (out / "report.html").read_text()
    parsed = Page()
    parsed.feed(page)
    assert {"script", "i"}.isdisjoint(parsed.tags)  # no markup from the data, while the browser shows it as text:
    assert SCRIPT in parsed.text and EVIL in parsed.text  # every document is shown (examples=400), its tags as text
    assert page.count('src="data:image/png;base64,') == 1  # the histograms; no curves without runs
    assert "noise" not in page.lower()


def test_report_with_a_model_and_file_sources(own_shards, tmp_path):
    from slm.config import ModelConfig
    from slm.models import build_model

    tokenizer = load_tokenizer(own_shards["root"] / "tok")
    model = build_model(ModelConfig(backbone="llama", **TINY_MODEL), vocab_size=len(tokenizer), seed=0).eval()
    cfg = report_cfg(own_shards, tmp_path, ratio=0.6, corpus=own_shards["corpus"], source_field="no_such", max_rows=20)
    report = build_report(cfg, tokenizer, model)
    assert report["score"] == "excess" and "model loss - reference loss" in report["rule"]
    assert report["sampled_rows"] == 20 and abs(report["kept_fraction"] - 0.6) < 1e-2
    assert {r["source"] for r in report["per_source"]} == {"news.jsonl", "forum.jsonl"}  # by file, no such column
    assert set(report["histograms"]) == {"ref_loss", "score"}
    h = report["histograms"]["score"]
    assert sum(h["kept"]) == report["kept_tokens"] and sum(h["kept"]) + sum(h["dropped"]) == report["valid_tokens"]
    # every kept token scores at least the cut, every dropped one at most
    assert report["cut"] is not None and min(e for e, c in zip(h["edges"], h["kept"]) if c) <= report["cut"]


def test_report_refuses_another_corpus(own_shards, tmp_path):
    tokenizer = load_tokenizer(own_shards["root"] / "tok")
    other = CorpusConfig(path=str(own_shards["root"] / "hq.jsonl"))
    with pytest.raises(SlmError, match=r"shard-00000.arrow: its tokens differ from corpus.path .*hq.jsonl"):
        build_report(report_cfg(own_shards, tmp_path, corpus=other), tokenizer)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_report_page_renders_in_headless_chromium(own_shards, tmp_path):
    """A real browser draws the page: a screenshot of it is not blank and is as tall as its content."""
    from matplotlib.image import imread

    from slm.stages import shards_report

    shards_report.run(report_cfg(own_shards, tmp_path, corpus=own_shards["corpus"]))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            (tmp_path / "r" / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = imread(shot)
    assert image.shape[:2] == (3000, 1200)
    assert image[..., :3].std() > 0.05  # text, tables and plots, not a blank page
    rows_with_ink = (image[..., :3].min(axis=2) < 0.5).any(axis=1)
    assert rows_with_ink[:300].any() and rows_with_ink[1500:].any()  # the title and, further down, the examples
    assert np.unique(image[..., :3].reshape(-1, 3), axis=0).shape[0] > 50  # coloured tokens and plots
