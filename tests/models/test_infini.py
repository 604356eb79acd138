"""Property tests of the `infini` backbone (Infini-attention, Munkhdalai et al. 2024)."""

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

import slm.models.infini as infini

VOCAB = 64


def make_model(dtype=torch.float64, seed=0, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        segment_len=8,
        memory_update="delta",
    )
    kwargs.update(overrides)
    return make_tiny_model(infini.InfiniForCausalLM, infini.InfiniConfig(**kwargs), dtype, seed, norm_jitter)


def set_beta(model, value):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.beta.fill_(value)


@pytest.mark.parametrize("update", ["delta", "linear"])
@torch.no_grad()
def test_chunked_with_state_equals_whole(update):
    model = make_model(memory_update=update)
    set_beta(model, 0.3)
    ids = tokens(VOCAB, 2, 45)
    whole = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    splits = [[1] * 45, [3, 5, 8, 13, 16], [8] * 5 + [5], [7, 1, 9, 20, 8]]
    splits += [random_split(45, gen, 12) for _ in range(2)]
    for sizes, state, diff in chunked_diffs(model, ids, whole, splits):
        assert state.position == 45
        assert diff < 1e-10, (sizes, diff)


@torch.no_grad()
def test_local_gate_one_segment_equals_causal_attention():
    """Degenerate setting: gate forced local (beta = -1e4) and segment_len >= input length."""
    ids = tokens(VOCAB, 2, 24)
    model = make_model(segment_len=32)
    set_beta(model, -1e4)
    ref = reference_logits(model, ids, attn_prefix="self_attn.")
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    set_beta(model, 0.0)  # gate open: the (empty) memory takes half the weight, so it must differ
    assert (model(ids).logits - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("update", ["delta", "linear"])
@torch.no_grad()
def test_memory_carries_information_across_segments(update):
    """Segments only see each other through the memory: with the gate shut, changing token 0 leaves
    every later segment untouched; with the gate open it changes them (the memory is read)."""
    model = make_model(memory_update=update)
    ids = tokens(VOCAB, 1, 32)
    ids2 = change_token(ids, 0, VOCAB)
    set_beta(model, -1e4)
    assert torch.equal(model(ids).logits[:, 8:], model(ids2).logits[:, 8:])
    set_beta(model, 0.0)
    a, b = model(ids).logits, model(ids2).logits
    for seg in range(1, 4):
        assert (a[:, 8 * seg : 8 * seg + 8] - b[:, 8 * seg : 8 * seg + 8]).abs().max().item() > 1e-6, seg


@torch.no_grad()
def test_causality():
    model = make_model()
    set_beta(model, 0.5)
    ids = tokens(VOCAB, 2, 32)
    for t in (0, 5, 8, 19, 31):
        ids2 = change_token(ids, t, VOCAB, delta=7)
        a, b = model(ids).logits, model(ids2).logits
        if t:
            assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-12
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = make_model(dtype=torch.float32, memory_update="linear", segment_len=6, gate_init=0.7)
    set_beta(model, 0.25)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded, infini.InfiniForCausalLM)
    assert loaded.config.segment_len == 6 and loaded.config.memory_update == "linear"
    ids = tokens(VOCAB, 2, 20)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = make_model(dtype=torch.float32).train()
    ids = tokens(VOCAB, 4, 32)
    losses = train_losses(model, ids, ids, steps=10, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.model.layers[0].self_attn.beta.grad is not None  # the gate is trained


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
    model = make_model(dtype=torch.float32)
    s64, s512 = model(tokens(VOCAB, 1, 64)).cache, model(tokens(VOCAB, 1, 512)).cache
    assert state_numel(s64) == state_numel(s512) > 0
    more = tokens(VOCAB, 1, 3, seed=5)  # now with a partial segment held
    assert state_numel(model(more, past_key_values=s64).cache) == state_numel(model(more, past_key_values=s512).cache)


@torch.no_grad()
def test_greedy_generate_matches_recompute():
    model = make_model(dtype=torch.float32)
    set_beta(model, 0.0)
    prompt = tokens(VOCAB, 1, 11)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False)
    assert torch.equal(out, greedy_recompute(model, prompt, 9))  # no state: recompute everything each step


@pytest.mark.parametrize(
    "key,value", [("segment_len", 0), ("memory_update", "none"), ("memory_eps", 0.0), ("num_attention_heads", 5)]
)
def test_config_rejects_nonsense(key, value):
    assert_config_rejects(infini.InfiniConfig, key, value)


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
