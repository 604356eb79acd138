"""Every streaming backbone refuses padded attention masks (pad tokens would enter its carried state)."""

from __future__ import annotations

import pytest
import torch

from slm.config import ModelConfig
from slm.models import build_model

STREAMING = {"infini": {"segment_len": 8}, "megalodon": {"chunk_len": 8}, "fam": {"block_len": 8}, "beacon": {"window_len": 8, "condensing_ratio": 2}}


@pytest.mark.parametrize("backbone", list(STREAMING))
def test_padded_mask_is_refused_and_all_ones_equals_no_mask(backbone):
    cfg = ModelConfig(backbone=backbone, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, options=STREAMING[backbone])
    model = build_model(cfg, vocab_size=50, seed=0).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(plain, ones)
        padded = torch.ones_like(ids)
        padded[1, -3:] = 0
        with pytest.raises(ValueError, match=rf"^{backbone}: attention_mask with padding is not supported"):
            model(ids, attention_mask=padded)
