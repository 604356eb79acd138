"""What only the `infini` backbone has (Infini-attention, Munkhdalai et al. 2024): the compressive memory
and its gate. The properties every backbone shares are in test_backbone_properties.py."""

import pytest
import torch
from backbone_cases import CASES
from helpers import change_token, set_infini_beta, tokens

CASE = CASES["infini"]
VOCAB = CASE.vocab
make_model = CASE.make


@pytest.mark.parametrize("update", ["delta", "linear"])
@torch.no_grad()
def test_memory_carries_information_across_segments(update):
    """Segments only see each other through the memory: with the gate shut, changing token 0 leaves
    every later segment untouched; with the gate open it changes them (the memory is read)."""
    model = make_model(memory_update=update)
    ids = tokens(VOCAB, 1, 32)
    ids2 = change_token(ids, 0, VOCAB)
    set_infini_beta(model, -1e4)
    assert torch.equal(model(ids).logits[:, 8:], model(ids2).logits[:, 8:])
    set_infini_beta(model, 0.0)
    a, b = model(ids).logits, model(ids2).logits
    for seg in range(1, 4):
        assert (a[:, 8 * seg : 8 * seg + 8] - b[:, 8 * seg : 8 * seg + 8]).abs().max().item() > 1e-6, seg


@torch.no_grad()
def test_bf16_keeps_memory_in_fp32():
    ids = tokens(VOCAB, 2, 20)
    model = make_model(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.cache.layers[0].M.dtype == torch.float32 and torch.isfinite(out.logits).all()
    out = model.to(torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.cache.layers[1].M.dtype == torch.float32 and out.cache.layers[1].z.dtype == torch.float32
