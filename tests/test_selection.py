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


# ----------------------------------------------------------------------------- reference-free (ESLM) modes


def test_self_loss_keeps_exactly_the_top_ratio_by_the_students_loss():
    """Selection by the student's own loss: round(ratio * n_valid) tokens, each of higher loss than every
    dropped one, whatever the reference says (none, NaN everywhere, or random)."""
    ce, ref, mask = batch(seed=7, B=4, T=40)
    valid = torch.isfinite(ce) & mask.bool()  # position 0 counts: no reference is asked
    for ratio in (0.1, 0.37, 0.6):
        sel = selective_loss(ce, None, SelectionConfig(mode="self_loss", ratio=ratio), mask)
        kept = sel.weights.bool()
        assert torch.equal(sel.valid, valid)
        assert int(kept.sum()) == round(ratio * int(valid.sum()))
        assert ce.detach()[kept].min() > ce.detach()[valid & ~kept].max()
        assert torch.allclose(sel.loss, ce[kept].mean())  # the CVaR of the loss at 1 - ratio
        for other in (torch.full_like(ref, float("nan")), torch.rand_like(ref)):
            again = selective_loss(ce, other, SelectionConfig(mode="self_loss", ratio=ratio), mask)
            assert torch.equal(again.weights, sel.weights)
    assert set(sel.stats(ce)) >= {"self_loss_kept", "self_loss_dropped", "kept_fraction"}


def test_self_entropy_keeps_the_top_ratio_by_entropy_and_needs_it():
    ce, ref, mask = batch(seed=8, B=3, T=30)
    entropy = torch.rand(ce.shape, generator=torch.Generator().manual_seed(1)) * 3
    entropy[:, 0] = float("nan")  # aligned as the losses: no prediction at t = 0
    sel = selective_loss(ce, None, SelectionConfig(mode="self_entropy", ratio=0.5), mask, entropy=entropy)
    valid = torch.isfinite(ce) & mask.bool() & torch.isfinite(entropy)
    kept = sel.weights.bool()
    assert torch.equal(sel.valid, valid) and int(kept.sum()) == round(0.5 * int(valid.sum()))
    assert entropy[kept].min() > entropy[valid & ~kept].max()
    assert torch.allclose(sel.loss, ce[kept].mean())
    assert "self_entropy_kept" in sel.stats(ce)
    with pytest.raises(ValueError, match="entropy"):
        selective_loss(ce, ref, SelectionConfig(mode="self_entropy"), mask)


@pytest.mark.parametrize("mode", ["self_loss", "self_entropy"])
def test_reference_free_ratio_one_is_plain_lm_and_empty_batch_is_zero(mode):
    ce, _, mask = batch(seed=9)
    entropy = torch.rand_like(ce)
    sel = selective_loss(ce, None, SelectionConfig(mode=mode, ratio=1.0), mask, entropy=entropy)
    assert torch.allclose(sel.loss, ce[mask.bool()].mean(), atol=1e-6)
    sel = selective_loss(ce, None, SelectionConfig(mode=mode, ratio=0.5), torch.zeros_like(mask), entropy=entropy)
    sel.loss.backward()
    assert sel.loss.item() == 0.0 and torch.equal(ce.grad, torch.zeros_like(ce))


def test_reference_modes_without_a_reference_loss_are_refused():
    ce, _, mask = batch()
    with pytest.raises(ValueError, match="needs the reference loss"):
        selective_loss(ce, None, SelectionConfig(mode="batch", ratio=0.5), mask)
    plain = selective_loss(ce, None, SelectionConfig(enabled=False), mask)  # the CLM baseline needs none
    assert torch.allclose(plain.loss, ce[mask.bool()].mean())


def test_entropy_is_the_predictive_entropy_from_the_same_chunked_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slm.models.token_loss import token_losses, token_losses_and_entropy

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[:, :-1]
        want = -(logp.exp() * logp).sum(-1)
        ce, ent = token_losses_and_entropy(model, ids, chunk_tokens=5)
    assert torch.isnan(ent[:, 0]).all()
    torch.testing.assert_close(ent[:, 1:], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, token_losses(model, ids), equal_nan=True)
    ce, ent = token_losses_and_entropy(model, ids, chunk_tokens=5)  # with grad: checkpointed chunks
    assert ce.requires_grad and not ent.requires_grad
    ce[:, 1:].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_token_loss_gradients_equal_with_one_chunk_many_chunks_and_full_logits():
    """One chunk is kept for backward, several are recomputed (checkpointed): the same gradients as full logits."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from slm.models.token_loss import token_losses

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 12))
    weights = torch.rand(2, 11)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    def full():
        logits = model(ids).logits.float()[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none").view(2, 11)
        return (nll * weights).sum()

    want = grads(full)
    for chunk_tokens in (10_000, 5):  # one chunk (22 predictions), five chunks
        got = grads(lambda n=chunk_tokens: (token_losses(model, ids, chunk_tokens=n)[:, 1:] * weights).sum())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
