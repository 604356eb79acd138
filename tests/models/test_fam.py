"""Property tests of the `fam` backbone (TransformerFAM, Hwang et al. 2024)."""

import math

import pytest
import torch
from helpers import (
    assert_config_rejects,
    change_token,
    chunked_diffs,
    greedy_recompute,
    make_tiny_model,
    norm_jitter,
    random_split,
    reference_logits,
    save_and_reload,
    shifted_loss,
    state_numel,
    tokens,
    train_losses,
)

import slm.models.fam as fam

VOCAB = 64


def make_model(dtype=torch.float64, seed=0, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        block_len=5,
        memory_blocks=1,
        fam_len=3,
    )
    kwargs.update(overrides)
    return make_tiny_model(fam.FamForCausalLM, fam.FamConfig(**kwargs), dtype, seed, norm_jitter)


@pytest.mark.parametrize("fam_init,memory_blocks", [("prompt", 1), ("prefix", 2), ("prompt", 0)])
@torch.no_grad()
def test_chunked_with_state_equals_whole(fam_init, memory_blocks):
    model = make_model(fam_init=fam_init, memory_blocks=memory_blocks)
    ids = tokens(VOCAB, 2, 33)
    whole = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    splits = [[1] * 33, [3, 4, 8, 2, 16], [5] * 6 + [3], [7, 1, 9, 16]]
    splits += [random_split(33, gen, 11) for _ in range(2)]
    for sizes, state, diff in chunked_diffs(model, ids, whole, splits):
        assert state.position == 33
        assert diff < 1e-10, (sizes, diff)


@torch.no_grad()
def test_no_fam_one_block_equals_causal_attention():
    """Degenerate setting: fam_len = 0 and block_len >= input length."""
    ids = tokens(VOCAB, 2, 24)
    model = make_model(fam_len=0, block_len=32)
    ref = reference_logits(model, ids, attn_prefix="")  # fam keeps q/k/v/o_proj directly on the layer
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    with_fam = make_model(fam_len=3, block_len=32)  # same weights, plus the initial FAM to attend to
    assert (with_fam(ids).logits - ref).abs().max().item() > 1e-4


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
def test_causality():
    model = make_model()
    ids = tokens(VOCAB, 2, 32)
    for t in (0, 4, 5, 19, 31):
        ids2 = change_token(ids, t, VOCAB, delta=7)
        a, b = model(ids).logits, model(ids2).logits
        if t:
            assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-12
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6


@pytest.mark.parametrize("fam_init", ["prompt", "prefix"])
@torch.no_grad()
def test_save_load_round_trip(tmp_path, fam_init):
    model = make_model(dtype=torch.float32, fam_init=fam_init, block_len=6, memory_blocks=2, fam_len=4)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded, fam.FamForCausalLM)
    assert (loaded.config.block_len, loaded.config.memory_blocks, loaded.config.fam_len) == (6, 2, 4)
    ids = tokens(VOCAB, 2, 20)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = make_model(dtype=torch.float32, block_len=8).train()
    ids = tokens(VOCAB, 4, 32)
    losses = train_losses(model, ids, ids, steps=10, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.model.fam_prompt.grad is not None and model.model.fam_prompt.grad.abs().sum() > 0


@torch.no_grad()
def test_labels_follow_hf_convention():
    model = make_model(dtype=torch.float32)
    ids = tokens(VOCAB, 2, 16)
    labels = ids.clone()
    labels[0, 3:7] = -100
    out = model(ids, labels=labels)
    ref = shifted_loss(out.logits, labels)
    assert torch.allclose(out.loss, ref)


@torch.no_grad()
def test_state_is_bounded():
    model = make_model(dtype=torch.float32, block_len=8, memory_blocks=2)
    s64, s512 = model(tokens(VOCAB, 1, 64)).cache, model(tokens(VOCAB, 1, 512)).cache
    assert state_numel(s64) == state_numel(s512) > 0
    more = tokens(VOCAB, 1, 3, seed=5)  # now with a partial block held
    assert state_numel(model(more, past_key_values=s64).cache) == state_numel(model(more, past_key_values=s512).cache)


@torch.no_grad()
def test_greedy_generate_matches_recompute():
    model = make_model(dtype=torch.float32)
    prompt = tokens(VOCAB, 1, 11)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False)
    assert torch.equal(out, greedy_recompute(model, prompt, 9))  # no state: recompute everything each step


@torch.no_grad()
def test_bf16_runs():
    ids = tokens(VOCAB, 2, 20)
    out = make_model(dtype=torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.cache.layers[0].fam.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "key,value",
    [("block_len", 0), ("memory_blocks", -1), ("fam_len", -2), ("fam_init", "zeros"), ("num_attention_heads", 5)],
)
def test_config_rejects_nonsense(key, value):
    assert_config_rejects(fam.FamConfig, key, value)
