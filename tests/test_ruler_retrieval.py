"""The RULER evaluator measures retrieval: through `slm eval ruler`, a hand-built copying model
(tests/induction_model.py) scores high on pass-key and multi-key NIAH at every length, and the same
model with its rule off scores 0."""

from __future__ import annotations

import json

import yaml
from transformers import AutoTokenizer

from slm.cli import run_cli
from tests.induction_model import InductionConfig, InductionForCausalLM

LENGTHS = [128, 512, 2048]


def evaluate(tmp_path, tiny_demo, name, copy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo.tokenizer)
    model_dir = tmp_path / name
    InductionForCausalLM(InductionConfig(vocab_size=len(tokenizer), copy=copy)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = {
        "model": str(model_dir),
        "out_dir": str(tmp_path / f"ruler_{name}"),
        "tasks": ["passkey", "niah_multikey"],
        "lengths": LENGTHS,
        "samples_per_length": 5,
        "template_set": "compact",
        "chunk_len": 256,
        "device": "cpu",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli(["eval", "ruler", "--config", str(path)]) == 0
    return json.loads((tmp_path / f"ruler_{name}" / "results.json").read_text())["scores"]


def test_a_model_that_copies_scores_high_and_one_that_does_not_scores_zero(tmp_path, tiny_demo):
    copying = evaluate(tmp_path, tiny_demo, "copying", copy=True)
    for length in LENGTHS:
        assert copying["passkey"][str(length)]["score"] >= 80, copying["passkey"]
        assert copying["niah_multikey"][str(length)]["score"] >= 40, copying["niah_multikey"]
    blind = evaluate(tmp_path, tiny_demo, "blind", copy=False)
    assert all(blind[task][str(length)]["score"] == 0 for task in blind for length in LENGTHS)
