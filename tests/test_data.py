"""Corpora through datasets, tokenisation, packing, and the embedded demo corpus."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slm.config import CorpusConfig, DemoDataConfig
from slm.data.corpus import corpus_fingerprint, load_corpus
from slm.data.demo import generate_demo
from slm.data.packing import noise_tags_from_spans, pack_documents
from slm.data.tokenizer import load_tokenizer
from slm.errors import SlmError

DOCS = [f"document number {i} says hello" for i in range(7)]


@pytest.fixture
def corpus_files(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "c.txt").write_text("\n".join(DOCS) + "\n")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet")
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as f, pa.ipc.new_stream(f, pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": DOCS}))
    return tmp_path


@pytest.mark.parametrize(
    "name,field", [("c.jsonl", "body"), ("c.parquet", "body"), ("c.arrow", "body"), ("c.txt", "text")]
)
def test_every_local_format_reads_the_same_documents_in_order(corpus_files, name, field):
    ds = load_corpus(CorpusConfig(path=str(corpus_files / name), text_field=field))
    assert ds[field] == DOCS


def test_glob_and_max_documents(corpus_files):
    ds = load_corpus(CorpusConfig(path=str(corpus_files / "c.j*"), text_field="body", max_documents=3))
    assert ds["body"] == DOCS[:3]


def test_missing_text_field_names_columns(corpus_files):
    with pytest.raises(SlmError, match=r"no text field 'text'; columns are \['body', 'id'\]"):
        load_corpus(CorpusConfig(path=str(corpus_files / "c.jsonl")))


def test_empty_corpus_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SlmError, match="empty"):
        load_corpus(CorpusConfig(path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(SlmError, match=r"missing.jsonl'?: file not found"):
        load_corpus(CorpusConfig(path=str(tmp_path / "missing.jsonl")))


def test_corpus_fingerprint_changes_with_content(corpus_files):
    cfg = CorpusConfig(path=str(corpus_files / "c.txt"))
    before = corpus_fingerprint(cfg)
    (corpus_files / "c.txt").write_text("other\n")
    assert corpus_fingerprint(cfg) != before


def test_packing_puts_eos_between_documents_and_records_starts():
    docs = [([1, 2, 3], None), ([4, 5], None), ([6, 7, 8, 9], None)]
    rows = list(pack_documents(docs, seq_len=4, eos_id=0, pad_id=99))
    flat = [t for r in rows for t, m in zip(r.input_ids, r.loss_mask) if m]
    assert flat == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    assert all(len(r.input_ids) == 4 for r in rows)
    assert [r.doc_starts for r in rows] == [[0], [0, 3], []]
    padded = list(pack_documents(docs + [([5], None)], seq_len=4, eos_id=0, pad_id=99))
    assert (
        padded[-1].input_ids == [5, 0, 99, 99] and padded[-1].loss_mask == [1, 1, 0, 0] and padded[-1].doc_starts == [0]
    )


def test_whole_packing_never_splits_a_document_that_fits():
    docs = [([1, 2], [0, 1]), ([3, 4, 5], [1, 1, 0]), ([6], [0]), ([7, 8, 9, 10, 11, 12], [0] * 6)]
    rows = list(pack_documents(docs, seq_len=5, eos_id=0, pad_id=99, packing="whole"))
    assert [r.input_ids for r in rows] == [
        [1, 2, 0, 99, 99],
        [3, 4, 5, 0, 99],
        [6, 0, 99, 99, 99],
        [7, 8, 9, 10, 11],
        [12, 0, 99, 99, 99],
    ]  # the last is longer than a row: split
    assert rows[0].loss_mask == [1, 1, 1, 0, 0] and [r.doc_starts for r in rows] == [[0], [0], [0], [0], []]
    assert rows[1].noise == [1, 1, 0, 0, 0]
    flat = [t for r in rows for t, m in zip(r.input_ids, r.loss_mask) if m]
    assert flat == [1, 2, 0, 3, 4, 5, 0, 6, 0, 7, 8, 9, 10, 11, 12, 0]  # nothing lost, order kept


def test_single_packing_gives_each_document_its_own_rows():
    docs = [([1], None), ([2, 3], None), ([4, 5, 6, 7, 8, 9], None), ([10], None)]
    rows = list(pack_documents(docs, seq_len=5, eos_id=0, pad_id=99, packing="single"))
    assert [r.input_ids for r in rows] == [
        [1, 0, 99, 99, 99],  # whole packing would have put [2, 3, 0] here too
        [2, 3, 0, 99, 99],
        [4, 5, 6, 7, 8],
        [9, 0, 99, 99, 99],  # longer than a row: split, and the rest stays alone
        [10, 0, 99, 99, 99],
    ]
    assert [r.doc_starts for r in rows] == [[0], [0], [0], [], [0]]
    with pytest.raises(ValueError, match="packing 'rows'"):
        list(pack_documents(docs, seq_len=5, eos_id=0, pad_id=99, packing="rows"))


def test_noise_tags_follow_character_spans():
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert noise_tags_from_spans(offsets, [[3, 9]]) == [0, 1, 1, 0]
    assert noise_tags_from_spans(offsets, []) == [0, 0, 0, 0]


def test_demo_is_deterministic_and_noise_share_is_web_like(tmp_path):
    cfg = dict(hq_documents=60, train_documents=120, validation_documents=5, questions=5, vocab_size=350)
    a = generate_demo(DemoDataConfig(out_dir=str(tmp_path / "a"), **cfg))
    b = generate_demo(DemoDataConfig(out_dir=str(tmp_path / "b"), **cfg))
    c = generate_demo(DemoDataConfig(out_dir=str(tmp_path / "c"), seed=7, **cfg))
    for name in ("hq", "train", "validation", "questions"):
        assert getattr(a, name).read_text() == getattr(b, name).read_text()
    assert a.train.read_text() != c.train.read_text()
    assert (a.tokenizer / "tokenizer.json").read_text() == (b.tokenizer / "tokenizer.json").read_text()
    # noise share in tokens, measured through the tokenizer the pipeline uses
    tok = load_tokenizer(a.tokenizer)
    from slm.data.packing import tokenize_documents

    rows = [json.loads(line) for line in a.train.read_text().splitlines()]
    tagged = tokenize_documents(tok, [r["text"] for r in rows], [r["noise_spans"] for r in rows])
    noise = sum(sum(t) for _, t in tagged) / sum(len(t) for _, t in tagged)
    assert 0.3 <= noise <= 0.5, noise


def test_demo_noise_spans_cover_only_the_noisy_characters():
    """Boilerplate segments are tagged whole; a wrong-answer problem only at its wrong number (twice)."""
    import random
    import re

    from slm.data.demo import NOISE_KINDS, RetrievalMix, web_document

    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        text, spans, kinds = web_document(rng, 0.4, RetrievalMix(0.15, 400))
        assert len(spans) == len(kinds) and set(kinds) <= set(NOISE_KINDS)
        assert all(0 <= a < b <= len(text) for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # ordered, disjoint
        for (a, b), kind in zip(spans, kinds):
            seen.add(kind)
            if kind == "wrong_answer":
                line_start = text.rindex("Question:", 0, a)
                x, op, y, stated = re.match(
                    r"Question: What is (\d+) ([-+*]) (\d+)\?\nAnswer: \S+ \S \S+ = (-?\d+)\.", text[line_start:]
                ).groups()
                assert text[a:b] == stated != str(eval(f"{x}{op}{y}"))  # noqa: S307 - digits and one operator
            else:
                assert text[a - 2 : a] in ("", "\n\n") and text[b : b + 2] in ("", "\n\n")  # a whole segment
    assert seen == set(NOISE_KINDS)


def test_demo_questions_have_exact_answers(tiny_demo):
    import re

    for line in tiny_demo.questions.read_text().splitlines():
        q = json.loads(line)
        a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", q["question"]).groups()
        assert str(eval(f"{a}{op}{b}")) == q["answer"]  # noqa: S307 - digits and one operator


def test_tokenizer_directory_loads_with_autotokenizer(tiny_demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo.tokenizer))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    assert tok.decode(tok("What is 12 + 3?")["input_ids"]) == "What is 12 + 3?"
    digits = [tok.decode([t]) for t in tok("12345", add_special_tokens=False)["input_ids"]]
    assert digits == list("12345")  # numbers tokenise digit by digit


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(SlmError, match="directory not found"):
        load_tokenizer(tmp_path / "none")


def test_retrieval_mix_kinds_and_short_share():
    """The long-context demo's retrieval options: one kind only, and a share of short documents."""
    from slm.data.demo import KV_QUESTION, PASSKEY_QUESTION, SHORT_RETRIEVAL_CHARS, RetrievalMix

    rng = random.Random(0)
    passkey_only = RetrievalMix(1.0, 320, short_share=0.5, kinds=("passkey",))
    docs = [passkey_only.document(rng) for _ in range(400)]
    assert all(PASSKEY_QUESTION in d for d in docs)
    short = [d for d in docs if len(d) < 320]
    assert 0.4 < len(short) / len(docs) < 0.6
    # a short one: at most one filler sentence each side of the needle
    assert all(len(d) < SHORT_RETRIEVAL_CHARS + 250 for d in short)
    both = [RetrievalMix(1.0, 320).document(rng) for _ in range(400)]
    kv = sum(KV_QUESTION.split("{")[0] in d for d in both)
    assert 0.4 < kv / len(both) < 0.6 and all(len(d) >= 320 for d in both)
