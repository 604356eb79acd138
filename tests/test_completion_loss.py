"""Prompt/completion corpora (corpus.completion_field) and train.prompt_loss_weight."""

from __future__ import annotations

import json

import pytest
import torch

from slm.config import CorpusConfig, ModelConfig
from slm.data.packed import packed_corpus
from slm.data.tokenizer import load_tokenizer
from slm.errors import SlmError
from slm.models import build_model
from slm.models.token_loss import token_losses
from slm.training.loop import causal_lm_step

PAIRS = [
    ("What is the pass key? The pass key is", " 12345."),
    ("Problem: 2 + 3\nAnswer:", " 2 + 3 = 5."),
    ("The value of key 123 is", " 4567."),
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return path


def _rows(pairs_file, tiny_demo, tmp_path, packing="single"):
    tok = load_tokenizer(str(tiny_demo.tokenizer))
    cfg = CorpusConfig(path=str(pairs_file), text_field="prompt", completion_field="completion", packing=packing)
    return tok, packed_corpus(cfg, tok, str(tiny_demo.tokenizer), 32, tmp_path / "cache")


def test_completion_tokens_are_marked_2(pairs_file, tiny_demo, tmp_path):
    tok, rows = _rows(pairs_file, tiny_demo, tmp_path)
    batch = rows.rows(range(len(rows)))
    assert len(rows) == len(PAIRS)  # single packing: one pair per row
    for (prompt, completion), ids, mask in zip(PAIRS, batch["input_ids"], batch["loss_mask"]):
        assert set(mask.tolist()) <= {0, 1, 2}
        assert tok.decode(ids[mask == 2].tolist()) == completion
        # prompt and EOS are 1, padding 0; the row reads prompt + completion
        n = int((mask > 0).sum())
        assert tok.decode(ids[:n].tolist(), skip_special_tokens=True) == prompt + completion
        assert ids[n - 1] == tok.eos_token_id and mask[n - 1] == 1


def test_prompt_loss_weight_is_the_weighted_mean(pairs_file, tiny_demo, tmp_path):
    tok, rows = _rows(pairs_file, tiny_demo, tmp_path)
    batch = {k: torch.from_numpy(v).long() for k, v in rows.rows(range(len(rows))).items()}
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), seed=0)
    model.eval()
    with torch.no_grad():
        ce = token_losses(model, batch["input_ids"])
        mask = batch["loss_mask"]
        completion, prompt = (mask == 2)[:, 1:], (mask == 1)[:, 1:]  # position 0 has no loss
        ce = ce[:, 1:]
        for w in (0.0, 0.2, 1.0):
            loss, extra = causal_lm_step(model, batch, prompt_loss_weight=w, completion_loss=True)
            expected = (ce[completion].sum() + w * ce[prompt].sum()) / (completion.sum() + w * prompt.sum())
            assert torch.allclose(loss, expected, atol=1e-6), w
            assert float(extra["completion_loss"]) == pytest.approx(float(ce[completion].mean()), abs=1e-6)
        plain, extras = causal_lm_step(model, batch)
        assert extras == {}  # completion_loss only when asked for (a prompt/completion corpus)
        valid = mask[:, 1:].bool()
        assert torch.allclose(plain, ce[valid].mean(), atol=1e-6)


def test_missing_completion_field_is_a_one_line_error(pairs_file, tiny_demo, tmp_path):
    tok = load_tokenizer(str(tiny_demo.tokenizer))
    cfg = CorpusConfig(path=str(pairs_file), text_field="prompt", completion_field="answer")
    with pytest.raises(SlmError, match=r"no completion_field 'answer'; columns are \['prompt', 'completion'\]"):
        packed_corpus(cfg, tok, str(tiny_demo.tokenizer), 32, tmp_path / "cache")
