"""RHO-1 selective loss: every invariant of DESIGN.md as a test."""

from __future__ import annotations

import math

import pytest
import torch

from slm.config import SelectionConfig
from slm.selection import selective_loss, top_k_mask


def batch(seed=0, B=3, T=17):
    g = torch.Generator().manual_seed(seed)
    ce = (torch.rand(B, T, generator=g) * 5).requires_grad_()
    ref = torch.rand(B, T, generator=g) * 5
    ref[:, 0] = float("nan")  # position 0 has no context
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -4:] = 0  # padding
    return ce, ref, mask


def plain_causal_lm_loss(ce, ref, mask):
    valid = torch.isfinite(ref) & mask.bool()
    return ce[valid].mean()


@pytest.mark.parametrize("mode", ["sequence", "batch", "global", "soft"])
def test_ratio_one_equals_plain_causal_lm(mode):
    ce, ref, mask = batch()
    sel = selective_loss(ce, ref, SelectionConfig(mode=mode, ratio=1.0), mask)
    assert torch.allclose(sel.loss, plain_causal_lm_loss(ce, ref, mask), atol=1e-6)


def test_disabled_equals_plain_causal_lm():
    ce, ref, mask = batch()
    sel = selective_loss(ce, ref, SelectionConfig(enabled=False, ratio=0.3), mask)
    assert torch.allclose(sel.loss, plain_causal_lm_loss(ce, ref, mask))


@pytest.mark.parametrize("mode", ["sequence", "batch", "global", "soft", "static"])
def test_no_valid_token_gives_zero_loss_and_zero_gradient(mode):
    ce, ref, mask = batch()
    ref[:] = float("nan")
    sel = selective_loss(ce, ref, SelectionConfig(mode=mode, ratio=0.5), mask, base_loss=ref.clone())
    sel.loss.backward()
    assert sel.loss.item() == 0.0 and torch.equal(ce.grad, torch.zeros_like(ce))


def test_nan_reference_never_poisons_the_gradient():
    ce, ref, mask = batch()
    ref[0, 5] = float("nan")
    sel = selective_loss(ce, ref, SelectionConfig(ratio=0.5), mask)
    sel.loss.backward()
    assert torch.isfinite(ce.grad).all() and ce.grad[0, 5] == 0 and not sel.valid[0, 5]


@pytest.mark.parametrize("ratio", [0.1, 0.33, 0.6, 0.9])
def test_kept_fraction_matches_ratio_within_one_token(ratio):
    ce, ref, mask = batch(seed=3, B=4, T=50)
    per_batch = selective_loss(ce, ref, SelectionConfig(mode="batch", ratio=ratio), mask)
    n_valid = int(per_batch.valid.sum())
    assert abs(int(per_batch.weights.sum()) - ratio * n_valid) <= 1
    per_seq = selective_loss(ce, ref, SelectionConfig(mode="sequence", ratio=ratio), mask)
    for row in range(4):
        assert abs(int(per_seq.weights[row].sum()) - ratio * int(per_seq.valid[row].sum())) <= 1


def test_kept_tokens_have_the_highest_excess_and_loss_averages_them():
    ce, ref, mask = batch(seed=1)
    sel = selective_loss(ce, ref, SelectionConfig(mode="batch", ratio=0.4), mask)
    kept, dropped = sel.weights.bool(), ~sel.weights.bool() & sel.valid
    assert sel.excess[kept].min() >= sel.excess[dropped].max()
    # RHO-1 eq. 2: mean of the model's loss over the kept tokens
    assert torch.allclose(sel.loss, ce[kept].mean())
    excess = (ce.detach() - ref)[sel.valid]
    assert torch.allclose(sel.excess[sel.valid], excess)


def test_sequence_mode_selects_within_each_row():
    ce, ref, mask = batch(seed=2)
    sel = selective_loss(ce, ref, SelectionConfig(mode="sequence", ratio=0.5), mask)
    for row in range(ce.shape[0]):
        k, d = sel.weights[row].bool(), ~sel.weights[row].bool() & sel.valid[row]
        assert sel.excess[row][k].min() >= sel.excess[row][d].max()


def test_static_mode_uses_precomputed_excess_only():
    ce, ref, mask = batch(seed=4)
    base = ref + torch.linspace(0, 1, ref.shape[1])  # excess grows with position
    sel = selective_loss(ce, ref, SelectionConfig(mode="static", ratio=0.5), mask, base_loss=base)
    other = selective_loss(ce * 3, ref, SelectionConfig(mode="static", ratio=0.5), mask, base_loss=base)
    assert torch.equal(sel.weights, other.weights)  # the online loss does not change the choice
    with pytest.raises(ValueError, match="base_loss"):
        selective_loss(ce, ref, SelectionConfig(mode="static"), mask)


def test_soft_weights_rise_with_excess_and_stay_in_unit_interval():
    ce, ref, mask = batch(seed=5)
    sel = selective_loss(ce, ref, SelectionConfig(mode="soft", ratio=0.5, temperature=0.5), mask)
    w, e = sel.weights[sel.valid], sel.excess[sel.valid]
    order = e.argsort()
    assert torch.all(w[order][1:] >= w[order][:-1] - 1e-7) and w.min() >= 0 and w.max() <= 1


def test_stats_are_logged_and_consistent():
    ce, ref, mask = batch(seed=6)
    sel = selective_loss(ce, ref, SelectionConfig(mode="batch", ratio=0.5), mask)
    s = sel.stats(ce)
    assert abs(s["kept_fraction"] - 0.5) <= 1 / s["valid_tokens"]
    assert s["excess_kept"] > s["excess_dropped"]
    assert math.isfinite(s["loss_kept"]) and math.isfinite(s["loss_dropped"])


def test_top_k_mask_handles_ties_deterministically():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0])
    valid = torch.tensor([True, True, True, True])
    assert top_k_mask(scores, valid, 0.5).tolist() == [True, True, False, False]
