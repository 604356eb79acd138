"""Shard inspection: row views (console, HTML), streamed statistics, the reference-loss histogram."""

from __future__ import annotations

import io
import json
import random
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from slm.errors import SlmError
from slm.shards import stats as stats_mod
from slm.shards.format import FORMAT_VERSION, ShardMetadata
from slm.shards.inspect import print_row, render_row, visible, write_html
from slm.shards.manifest import merge_manifest
from slm.shards.reader import ShardSet
from slm.shards.stats import QUANTILES, plot_histogram, print_stats, quantile_key, shard_stats
from slm.shards.writer import ShardWriter

SEQ_LEN = 32
WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "ran", "to", "red", "big", "house", "and", "café", "naïve"]


def _meta(seq_len: int, vocab: int = 300) -> ShardMetadata:
    return ShardMetadata(
        format_version=FORMAT_VERSION,
        tokenizer_name="tiny-bpe",
        tokenizer_sha256="0" * 64,
        vocab_size=vocab,
        seq_len=seq_len,
        reference_model="ref",
        reference_sha256="1" * 64,
        corpus_fingerprint="2" * 64,
        slm_version="test",
        documents_per_shard=10,
    )


def _write(directory, shards: list[dict], seq_len: int, vocab: int = 300, with_noise: bool = True) -> ShardSet:
    """shards: per shard a dict of [rows, seq_len] arrays input_ids, ref_loss, loss_mask (noise)."""
    meta = _meta(seq_len, vocab)
    writer = ShardWriter(directory, meta, with_noise=with_noise)
    for k, s in enumerate(shards):
        n = len(s["input_ids"])
        batch = {**s, "sequence_id": np.arange(n) + (k << 32), "doc_starts": [[0]] * n}
        half = max(1, n // 2)  # two record batches per shard, to exercise batch boundaries
        parts = [{c: v[:half] for c, v in batch.items()}, {c: v[half:] for c, v in batch.items()}]
        writer.write(k, [p for p in parts if len(p["input_ids"])], extra={"documents": n})
    merge_manifest(directory, meta, len(shards))
    return ShardSet(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from slm.data.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(300)]
    texts += ["zq#x!! 0x3f9a <div>", "BUY NOW!!! \t click\nhere"] * 20
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """Three shards (9, 6, 4 rows) of packed sentences and noise snippets; noise scores higher."""
    from slm.data.packing import pack_documents

    rng = random.Random(1)
    docs = []
    for i in range(120):
        if i % 4 == 3:
            text, noisy = "".join(rng.choice("zqx#!<>/0123456789abcdef") for _ in range(rng.randint(5, 20))), 1
        else:
            text, noisy = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + ".", 0
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        docs.append((ids, [noisy] * len(ids)))
    rows = list(pack_documents(docs, SEQ_LEN, tokenizer.eos_token_id, tokenizer.pad_token_id))
    rows = rows[:19]
    assert len(rows) == 19
    if all(r.loss_mask[-1] for r in rows):  # make sure the last row has padding
        rows[-1].loss_mask[-5:] = [0] * 5
        rows[-1].input_ids[-5:] = [tokenizer.pad_token_id] * 5
        rows[-1].noise[-5:] = [0] * 5
    ids = np.array([r.input_ids for r in rows], np.int32)
    mask = np.array([r.loss_mask for r in rows], np.int8)
    noise = np.array([r.noise for r in rows], np.int8)
    gen = np.random.default_rng(2)
    ref = np.where(noise == 1, gen.normal(4.5, 1.0, ids.shape), gen.normal(2.0, 0.7, ids.shape))
    ref = np.round(np.abs(ref), 2).astype(np.float32)  # rounding makes ties, which the AUC must count as 1/2
    ref[:, 0] = np.nan
    ref[mask == 0] = np.nan
    ref[2, 5] = ref[11, 7] = np.nan  # NaNs "the model made"
    bounds = [0, 9, 15, 19]
    shards = [
        {"input_ids": ids[a:b], "ref_loss": ref[a:b], "loss_mask": mask[a:b], "noise": noise[a:b]}
        for a, b in zip(bounds, bounds[1:])
    ]
    directory = tmp_path_factory.mktemp("shards")
    return {
        "shards": _write(directory, shards, SEQ_LEN, len(tokenizer)),
        "ids": ids,
        "ref": ref,
        "mask": mask.astype(bool),
        "noise": noise.astype(bool),
        "bounds": bounds,
    }


@pytest.fixture(scope="module")
def model(tokenizer):
    from slm.config import ModelConfig
    from slm.models import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tokenizer))
    return m.eval()


def _scored(c, rows=None):
    ref, mask, noise = (x[:rows] for x in (c["ref"], c["mask"], c["noise"]))
    scored = mask & np.isfinite(ref)
    return ref[scored].astype(np.float64), noise[scored]


# --------------------------------------------------------------------------- stats


def test_stats_counts_and_quantiles_match_numpy(corpus):
    s = shard_stats(corpus["shards"])
    ref, mask = corpus["ref"], corpus["mask"]
    values, noise = _scored(corpus)
    assert (s["shards"], s["rows"], s["tokens"]) == (3, 19, int(mask.sum()))
    assert s["scored_tokens"] == len(values) == int((mask & np.isfinite(ref)).sum())
    assert s["nan_tokens"] == 2 == corpus["shards"].manifest.totals()["nan_tokens"]
    assert s["padding_tokens"] == int((~mask).sum()) > 0
    assert s["ref_loss"]["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert (s["ref_loss"]["min"], s["ref_loss"]["max"]) == (values.min(), values.max())
    expected = np.quantile(values, QUANTILES)
    assert (
        list(s["ref_loss"]["quantiles"])
        == [quantile_key(q) for q in QUANTILES]
        == ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
    )
    assert list(s["ref_loss"]["quantiles"].values()) == list(expected)  # exactly numpy's "linear" quantiles
    for shard, a, b in zip(s["per_shard"], corpus["bounds"], corpus["bounds"][1:]):
        sub = ref[a:b][mask[a:b] & np.isfinite(ref[a:b])].astype(np.float64)
        assert (shard["rows"], shard["tokens"], shard["scored_tokens"]) == (b - a, int(mask[a:b].sum()), len(sub))
        assert shard["mean_ref_loss"] == pytest.approx(sub.mean(), rel=1e-12)
    assert s["noise"]["noise_tokens"] == int(noise.sum()) and s["noise"]["clean_tokens"] == int((~noise).sum())
    assert s["noise"]["mean_ref_loss_noise"] > s["noise"]["mean_ref_loss_clean"]
    assert s["selection"] is None
    json.dumps(shard_stats(corpus["shards"], ratio=0.5), allow_nan=False)  # plain JSON for `--json`


def test_auc_equals_brute_force_pairs_and_is_budget_independent(corpus, monkeypatch):
    values, noise = _scored(corpus)
    pos, neg = values[noise], values[~noise]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert (pos[:, None] == neg[None, :]).any()  # ties are exercised
    s = shard_stats(corpus["shards"], ratio=0.7)
    assert s["noise"]["auc"] == pytest.approx(brute, abs=1e-12)
    assert s["noise"]["auc"] > 0.8
    # a tiny budget forces many gathering passes over the shards; the figures must not change
    monkeypatch.setattr(stats_mod, "COLLECT_BUDGET", 7)
    small = shard_stats(corpus["shards"], ratio=0.7)
    assert small["noise"]["auc"] == pytest.approx(brute, abs=1e-12)
    assert small["ref_loss"] == s["ref_loss"] and small["selection"] == s["selection"]


def test_reference_only_selection_matches_numpy(corpus):
    values, noise = _scored(corpus)
    ratio = 0.6
    k = int(np.round(ratio * len(values)))
    cut = np.sort(values)[k - 1]
    kept = values <= cut
    sel = shard_stats(corpus["shards"], ratio=ratio)["selection"]
    assert sel["cut"] == cut and sel["kept_tokens"] == int(kept.sum()) >= k
    assert sel["noise_dropped_share"] == pytest.approx((noise & ~kept).sum() / noise.sum())
    assert sel["kept_clean_share"] == pytest.approx((~noise & kept).sum() / kept.sum())
    assert sel["noise_share_dropped"] > sel["noise_share_kept"]


def test_max_rows_reads_only_the_first_rows(corpus):
    s = shard_stats(corpus["shards"], max_rows=11)  # all of shard 0 and 2 rows of shard 1
    values, _ = _scored(corpus, 11)
    assert (s["rows"], s["scored_tokens"], s["shards"]) == (11, len(values), 2)
    assert s["per_shard"][1]["rows"] == 2
    assert list(s["ref_loss"]["quantiles"].values()) == list(np.quantile(values, QUANTILES))


def test_precision_recall_auc_hand_case(tmp_path):
    # one row: NaN at position 0, then losses 1..10; tokens scoring 3, 8 and 9 are noise
    ref = np.array([[np.nan] + list(range(1, 11))], np.float32)
    noise = np.isin(ref, [3, 8, 9]).astype(np.int8)
    shards = _write(
        tmp_path,
        [
            {
                "input_ids": np.arange(11, dtype=np.int32)[None],
                "ref_loss": ref,
                "loss_mask": np.ones((1, 11), np.int8),
                "noise": noise,
            }
        ],
        11,
    )
    s = shard_stats(shards, ratio=0.5)
    sel = s["selection"]
    # keep the 5 lowest (1..5): one noise token kept (3), two dropped (8, 9)
    assert (sel["cut"], sel["kept_tokens"], sel["kept_fraction"]) == (5.0, 5, 0.5)
    assert sel["kept_clean_share"] == pytest.approx(4 / 5)  # precision
    assert sel["noise_dropped_share"] == pytest.approx(2 / 3)  # recall of the drop
    assert sel["noise_share_kept"] == pytest.approx(1 / 5) and sel["noise_share_dropped"] == pytest.approx(2 / 5)
    assert s["noise"]["noise_share"] == pytest.approx(3 / 10)
    assert s["noise"]["auc"] == pytest.approx(14 / 21)  # 3 beats {1,2}; 8 and 9 beat 6 clean each
    assert s["ref_loss"]["quantiles"]["p50"] == 5.5


def test_stats_without_noise_column_and_print(tmp_path):
    ref = np.array([[np.nan, 2.0, -0.0, 0.0, 1.0]], np.float32)
    shards = _write(
        tmp_path,
        [{"input_ids": np.zeros((1, 5), np.int32), "ref_loss": ref, "loss_mask": np.ones((1, 5), np.int8)}],
        5,
        with_noise=False,
    )
    s = shard_stats(shards, ratio=0.5)
    assert s["noise"] is None and s["scored_tokens"] == 4
    assert s["selection"]["cut"] == 0.0 and s["selection"]["kept_tokens"] == 2  # -0.0 and 0.0 tie at the cut
    assert list(s["ref_loss"]["quantiles"].values()) == list(np.quantile([2.0, -0.0, 0.0, 1.0], QUANTILES))
    with pytest.raises(SlmError, match="ratio"):
        shard_stats(shards, ratio=1.5)


def test_print_stats(corpus):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, record=True)
    print_stats(shard_stats(corpus["shards"], ratio=0.6), console)
    out = console.export_text()
    for needle in ("scored tokens", "p50", "shard-00002.arrow", "ROC AUC", "recall", "precision"):
        assert needle in out


def test_histogram_png(corpus, tmp_path):
    path = plot_histogram(corpus["shards"], tmp_path / "plots" / "hist.png", bins=30)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not [p for p in path.parent.iterdir() if p.name != "hist.png"]  # no temp file left
    assert plot_histogram(corpus["shards"].directory, tmp_path / "h2.png", max_rows=3).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- row views


def test_render_row_without_model(corpus, tokenizer):
    view = render_row(corpus["shards"], 18, tokenizer)
    assert view.shard == "shard-00002.arrow" and view.sequence_id == (2 << 32) + 3
    assert list(view.token_ids) == list(corpus["ids"][18])
    np.testing.assert_array_equal(view.ref_loss, corpus["ref"][18])
    assert view.pieces == [tokenizer.decode([int(i)]) for i in corpus["ids"][18]]
    assert not view.valid[0] and view.kept is None and view.excess is None
    assert list(view.noise) == list(corpus["noise"][18])
    s = view.summary()
    assert s["padding"] == int((~corpus["mask"][18]).sum()) > 0
    assert s["mean_ref_loss"] == pytest.approx(np.nanmean(corpus["ref"][18]))
    with pytest.raises(SlmError, match="out of range"):
        render_row(corpus["shards"], 19, tokenizer)
    with pytest.raises(SlmError, match="model"):
        render_row(corpus["shards"], 0, tokenizer, ratio=0.5)


def test_render_row_refuses_another_tokenizer(tokenizer, tmp_path):
    one = {
        "input_ids": np.zeros((1, 4), np.int32),
        "ref_loss": np.full((1, 4), 1.0, np.float32),
        "loss_mask": np.ones((1, 4), np.int8),
    }
    shards = _write(tmp_path, [one], 4, vocab=len(tokenizer) + 1, with_noise=False)
    with pytest.raises(SlmError, match=f"{len(tokenizer)} tokens.*{len(tokenizer) + 1} tokens"):
        render_row(shards, 0, tokenizer)


def test_render_row_ratio_keeps_top_excess(corpus, tokenizer, model):
    from slm.models.token_loss import token_losses

    ratio = 0.6
    view = render_row(corpus["shards"], 4, tokenizer, model=model, ratio=ratio)
    with torch.no_grad():
        expected = token_losses(model, torch.from_numpy(corpus["ids"][4]).long()[None])[0].numpy()
    np.testing.assert_allclose(view.model_loss[1:], expected[1:], rtol=1e-5)
    v = view.valid
    assert v.sum() == (corpus["mask"][4] & np.isfinite(corpus["ref"][4])).sum()
    np.testing.assert_allclose(view.excess[v], (view.model_loss - view.ref_loss)[v], rtol=1e-6)
    assert abs(int(view.kept.sum()) - ratio * v.sum()) <= 1
    assert not (view.kept & ~v).any()
    assert view.excess[view.kept].min() >= view.excess[v & ~view.kept].max()  # the kept are the highest excess
    assert view.summary()["kept_fraction"] == pytest.approx(ratio, abs=1 / v.sum())
    with pytest.raises(SlmError, match="not both"):
        render_row(corpus["shards"], 4, tokenizer, model=model, ratio=0.5, threshold=0.0)


def test_render_row_threshold_keeps_excess_at_or_above(corpus, tokenizer, model):
    probe = render_row(corpus["shards"], 2, tokenizer, model=model)
    threshold = float(np.median(probe.excess[probe.valid]))  # an actual value: the >= boundary is hit
    view = render_row(corpus["shards"], 2, tokenizer, model=model, threshold=threshold)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(view.kept, view.valid & (view.excess >= threshold))
    assert view.kept.any() and (view.valid & ~view.kept).any()
    assert not view.valid[5]  # the NaN reference loss at row 2, position 5 is never kept


class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.seen = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html_holds_every_piece(corpus, tokenizer, model, tmp_path):
    import html

    view = render_row(corpus["shards"], 18, tokenizer, model=model, ratio=0.5)
    path = write_html(view, tmp_path / "out" / "row.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert (
        not checker.errors and not checker.stack and {"html", "head", "body", "title", "style", "span"} <= checker.seen
    )
    for piece in view.pieces:
        assert html.escape(visible(piece)) in page
    assert (
        page.count('class="t') == sum(1 for i in range(len(view)) if view.loss_mask[i]) + 1
    )  # one span per real token, one for the padding run
    assert "excess" in page and "kept" in page and "dropped" in page and "background:#" in page
    assert [p.name for p in path.parent.iterdir()] == ["row.html"]


def test_print_row(corpus, tokenizer, model):
    from rich.console import Console

    for kwargs in ({}, {"model": model, "ratio": 0.6}, {"model": model}):
        console = Console(file=io.StringIO(), width=100, record=True, color_system="truecolor")
        print_row(render_row(corpus["shards"], 18, tokenizer, **kwargs), console)
        text = console.export_text(clear=False)
        assert "row 18 (shard-00002.arrow" in text and "mean ref loss" in text and "colour:" in text
        assert "noise share" in text
        if "ratio" in kwargs:
            assert "kept" in text and "bold = kept" in text
        styled = console.export_text(styles=True)
        assert "\x1b[" in styled  # coloured


def test_visible_whitespace():
    assert visible(" ") == "·" and visible("  ") == "··"
    assert visible(" the") == " the" and visible("\n") == "↵\n" and visible("\t") == "→" and visible("") == "∅"
    assert visible("a\x01") == "a\\x01"


def test_pieces_of_a_split_character_show_bytes(tokenizer):
    from slm.shards.inspect import decode_pieces

    halves = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # the two byte-level tokens of "é"
    assert decode_pieces(tokenizer, halves) == ["\\xc3", "\\xa9"]
    assert decode_pieces(tokenizer, tokenizer(" café", add_special_tokens=False)["input_ids"])[-1].endswith("é")
