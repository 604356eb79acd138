"""Held-out figures a user can trust: a fixed sample spread across documents during training, the final figure on
the whole validation file, each figure with the rows and tokens it covers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from slm.config import EvalConfig
from slm.data.packed import sample_rows
from slm.stages import evaluate, reference
from slm.training.metrics import read_metrics


def test_sample_spreads_evenly_across_documents_and_is_fixed_by_its_seed():
    documents = np.array([0] * 60 + list(range(1, 41)))  # one long document, then 40 one-row documents
    picked = sample_rows(documents, 20, seed=0)
    assert len(picked) == 20 and list(picked) == sorted(set(picked))
    assert len(set(documents[picked])) == 20  # one row from each of 20 documents, not 20 rows of the long one
    assert np.array_equal(picked, sample_rows(documents, 20, seed=0))
    assert not np.array_equal(picked, sample_rows(documents, 20, seed=1))
    # more rows than documents: every document gives one before any gives a second
    counts = np.bincount(documents[sample_rows(documents, 45, seed=3)], minlength=41)
    assert counts.min() == 1 and counts[0] == 5 and counts.sum() == 45
    assert np.array_equal(sample_rows(documents, 500, seed=0), np.arange(100))


def test_packed_rows_record_the_document_of_their_first_token(tiny_demo, tmp_path):
    from slm.config import CorpusConfig
    from slm.data.packed import packed_corpus
    from slm.data.tokenizer import load_tokenizer

    docs = [{"text": "word " * n} for n in (3, 200, 5, 5, 90)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok = load_tokenizer(tiny_demo.tokenizer)
    rows = packed_corpus(CorpusConfig(path=str(path)), tok, str(tiny_demo.tokenizer), 32, tmp_path / "cache")
    lengths = [len(tok(d["text"], add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # + EOS
    starts = np.cumsum([0] + lengths[:-1])
    expected = [int(np.searchsorted(starts, r * 32, side="right") - 1) for r in range(len(rows))]
    assert rows.documents().tolist() == expected and expected[-1] == 4


@pytest.fixture
def skewed_validation(tiny_demo, tmp_path):
    """A validation file whose first rows are unlike the rest: one long document of rare symbols, then the demo's."""
    rng = random.Random(7)
    hashes = "".join(rng.choice("QZXJKVW#@!~^%&{}[]|<>") for _ in range(3000))
    path = tmp_path / "skewed.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": hashes}) + "\n")
        f.write(tiny_demo.validation.read_text())
    return path


def test_final_figure_is_the_whole_file_loss_that_slm_eval_gives(tiny_reference_cfg, skewed_validation, tmp_path):
    from slm.training.loop import heldout_loss

    cfg = tiny_reference_cfg("skewed", max_steps=12, eval_every=6, optim=dict(lr=1e-2, warmup_steps=2))
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"path": str(skewed_validation)})})
    record = reference.run(cfg)
    m = record["metrics"]
    ev = evaluate.run(
        EvalConfig(
            out_dir=str(tmp_path / "eval"),
            model=record["outputs"]["model"],
            validation={"path": str(skewed_validation)},
            seq_len=cfg.train.seq_len,
            batch_size=5,
        )
    )["metrics"]
    assert m["final_heldout_loss"] == pytest.approx(ev["heldout_loss"], abs=1e-5)
    assert m["final_heldout_rows"] == ev["heldout_rows"] == m["validation_rows"] > 8
    assert m["final_heldout_tokens"] == ev["heldout_tokens"]

    # the slice the figure used to be: the first eval_batches x micro_batch_size rows, all of the symbol document
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(record["outputs"]["model"]).eval()
    first_rows = heldout_loss(
        model, _rows(cfg), cfg.train.micro_batch_size, cfg.train.eval_batches, torch.device("cpu")
    )
    assert abs(first_rows - m["final_heldout_loss"]) > 0.3

    # eval points: a fixed 8-row sample from 8 documents, named in every line and in stage.json
    assert m["eval_sample_rows"] == 8 and m["eval_sample_documents"] == 8 and m["validation_documents"] == 21
    lines = [x for x in read_metrics(f"{cfg.out_dir}/metrics.jsonl") if "heldout_loss" in x]
    assert [x["step"] for x in lines] == [6, 12]
    assert {(x["heldout_rows"], x["heldout_tokens"]) for x in lines} == {(8, m["eval_sample_tokens"])}
    stage = json.loads((tmp_path / "skewed" / "stage.json").read_text())
    assert stage["metrics"]["final_heldout_rows"] == m["final_heldout_rows"]


def _rows(cfg):
    from slm.data.packed import packed_corpus
    from slm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    return packed_corpus(cfg.validation, tok, cfg.tokenizer, cfg.train.seq_len, f"{cfg.out_dir}/data")


def test_final_eval_sample_keeps_the_last_eval_points_figure(tiny_reference_cfg):
    record = reference.run(tiny_reference_cfg("sampled", max_steps=4, eval_every=2, final_eval="sample"))
    m = record["metrics"]
    last = [x for x in read_metrics(record["outputs"]["metrics"]) if "heldout_loss" in x][-1]
    assert m["final_heldout_loss"] == last["heldout_loss"]
    assert m["final_heldout_rows"] == m["eval_sample_rows"] == last["heldout_rows"] == 8
