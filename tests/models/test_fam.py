"""What only the `fam` backbone has (TransformerFAM, Hwang et al. 2024): the feedback memory reaching past
the attention window, and its dtype. The properties every backbone shares are in
test_backbone_properties.py."""

import pytest
import torch
from backbone_cases import CASES
from helpers import change_token, tokens

CASE = CASES["fam"]
VOCAB = CASE.vocab
make_model = CASE.make


@pytest.mark.parametrize("fam_init", ["prompt", "prefix"])
@torch.no_grad()
def test_fam_carries_information_beyond_the_window(fam_init):
    """2 layers, 1 memory block of 5: without FAM token 0 reaches at most block 2 (receptive field
    depth x window); with FAM it reaches every later block."""
    ids = tokens(VOCAB, 1, 35)
    ids2 = change_token(ids, 0, VOCAB)
    bswa = make_model(fam_len=0, fam_init=fam_init)
    a, b = bswa(ids).logits, bswa(ids2).logits
    assert (a[:, 5:15] - b[:, 5:15]).abs().max().item() > 1e-6  # the memory block is read
    assert torch.equal(a[:, 15:], b[:, 15:])
    model = make_model(fam_init=fam_init)
    a, b = model(ids).logits, model(ids2).logits
    for blk in range(3, 7):
        assert (a[:, 5 * blk : 5 * blk + 5] - b[:, 5 * blk : 5 * blk + 5]).abs().max().item() > 1e-6, blk


@torch.no_grad()
def test_bf16_runs():
    ids = tokens(VOCAB, 2, 20)
    out = make_model(dtype=torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.cache.layers[0].fam.dtype == torch.bfloat16
