"""Left-padded batches in every streaming backbone: pad tokens never enter a carried state, each row's logits equal
the row run alone, batched generate equals per-row greedy decoding; right padding is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from slm.config import ModelConfig
from slm.models import build_model

STREAMING = {
    "infini": {"segment_len": 8},
    "megalodon": {"chunk_len": 8},
    "fam": {"block_len": 8},
    "beacon": {"window_len": 8, "condensing_ratio": 2},
}
VOCAB = 50


def make(backbone, vocab=VOCAB):
    cfg = ModelConfig(
        backbone=backbone, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, options=STREAMING[backbone]
    )
    return build_model(cfg, vocab_size=vocab, seed=0).double().eval()


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("backbone", list(STREAMING))
def test_right_padding_is_refused_and_all_ones_equals_no_mask(backbone):
    model = make(backbone)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, attention_mask=torch.ones_like(ids)).logits)
        padded = torch.ones_like(ids)
        padded[1, -3:] = 0
        with pytest.raises(ValueError, match=rf"^{backbone}: attention_mask pads on the right or inside a row"):
            model(ids, attention_mask=padded)


@pytest.mark.parametrize("backbone", list(STREAMING))
@torch.no_grad()
def test_each_left_padded_row_equals_the_row_alone(backbone):
    model = make(backbone)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (21, 18, 12, 3)]  # pads 0, 3, 9 (> a segment), 18
    ids, mask = left_pad(rows)
    batched = model(ids, attention_mask=mask)
    pieces, state = [], None  # the same batch streamed in two chunks with the state carried
    for sl in (slice(0, 10), slice(10, None)):
        out = model(ids[:, sl], attention_mask=mask[:, : sl.stop or ids.shape[1]], past_key_values=state)
        pieces.append(out.logits)
        state = out.cache
    streamed = torch.cat(pieces, 1)
    for i, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        assert (batched.logits[i, -len(r) :] - alone).abs().max() < 1e-10, (backbone, i)
        assert (streamed[i, -len(r) :] - alone).abs().max() < 1e-10, (backbone, i)
        assert not batched.logits[i, : ids.shape[1] - len(r)].any()  # pad positions: zero logits


@pytest.mark.parametrize("backbone", list(STREAMING))
@torch.no_grad()
def test_batched_generate_with_left_padding_equals_per_row_greedy(backbone):
    model = make(backbone)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (13, 6, 9)]
    ids, mask = left_pad(rows)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(r) :]), (backbone, i)


def test_text_generation_pipeline_batches(tiny_demo):
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo.tokenizer, padding_side="left")
    model = make("infini", vocab=len(tokenizer)).float()
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The pass key is 123. What is the pass key?", "Problem: 2 + 3"]
    kwargs = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    together = generate(prompts, batch_size=2, **kwargs)
    alone = [generate(p, **kwargs)[0] for p in prompts]
    assert [t[0]["generated_text"] for t in together] == [a["generated_text"] for a in alone]
