"""Property tests for the `beacon` backbone (CPU, tiny sizes, float64 for equivalences)."""

import pytest
import torch
from helpers import (
    change_token,
    chunked_diffs,
    greedy_recompute,
    make_tiny_model,
    random_cuts,
    run_chunks,
    save_and_reload,
    shifted_loss,
    state_numel,
    tokens,
    train_losses,
)
from transformers import LlamaConfig, LlamaForCausalLM

import slm.models.beacon as bcn
from slm.models.beacon import BeaconConfig, BeaconForCausalLM

V = 53


def tiny_config(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        window_len=8,
        condensing_ratio=2,
        max_beacon_windows=64,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
    )
    base.update(kw)
    return BeaconConfig(**base)


def make_model(seed=0, dtype=torch.float64, **kw):
    # larger weights than the 0.02 init so attention is far from uniform
    return make_tiny_model(
        BeaconForCausalLM, tiny_config(**kw), dtype, seed, lambda name: 0.02 if "norm" in name else 0.15
    )


@pytest.mark.parametrize("kw", [dict(), dict(num_key_value_heads=2, condensing_ratio=4, max_beacon_windows=2)])
@torch.no_grad()
def test_chunked_with_state_equals_whole(kw):
    model = make_model(**kw)
    L = 35
    ids = tokens(V, 2, L, seed=1)
    whole = model(ids).logits
    assert whole.shape == (2, L, V)
    g = torch.Generator().manual_seed(2)
    splits_list = [[1] * L, [8, 8, 8, 8, 3], [3, 5, 1, 7, 13, 6], [20, 1, 1, 13]]
    splits_list += [random_cuts(L, g) for _ in range(2)]
    for splits, state, diff in chunked_diffs(model, ids, whole, splits_list, use_cache=True):
        assert state.pos == L
        assert diff < 1e-8, (splits, diff)


def _llama_copy(model):
    c = model.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    cfg._attn_implementation = "sdpa"  # the eager path runs softmax in float32
    llama = LlamaForCausalLM(cfg).to(torch.float64).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("beacon" in k for k in unexpected), (missing, unexpected)
    # transformers computes RoPE angles and RMSNorm in float32; patch in the same formulas in float64 so that
    # the comparison can be made at 1e-8
    hd = c.hidden_size // c.num_attention_heads
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))

    def rope64(x, position_ids):
        ang = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat([ang, ang], -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    llama.model.rotary_emb.forward = rope64

    def rms64(m):
        return lambda x: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)

    for mod in llama.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = rms64(mod)
    return llama


@pytest.mark.parametrize("window_len", [64, 8])
@torch.no_grad()
def test_ratio_zero_equals_llama(window_len):
    """condensing_ratio 0: no beacons. With window_len >= length this is plain causal attention; with smaller
    windows too (the raw KV of <= max_beacon_windows previous windows is kept, at the same positions)."""
    model = make_model(condensing_ratio=0, window_len=window_len)
    llama = _llama_copy(model)
    ids = tokens(V, 2, 29, seed=5)
    ours, ref = model(ids).logits, llama(ids).logits
    assert (ours - ref).abs().max() < 1e-8
    streamed, _ = run_chunks(model, ids, [5, 1, 11, 12], use_cache=True)
    assert (streamed - ref).abs().max() < 1e-8


@torch.no_grad()
def test_beacons_change_the_model_and_carry_information():
    model = make_model()
    ids = tokens(V, 1, 32, seed=6)
    llama = _llama_copy(model)
    ours, ref = model(ids).logits, llama(ids).logits
    assert (ours[:, :8] - ref[:, :8]).abs().max() < 1e-8  # first window: no memory yet = plain attention
    assert (ours[:, 8:] - ref[:, 8:]).abs().max() > 1e-3  # later windows see beacons, not raw tokens
    ids2 = change_token(ids, 2, V)
    later = model(ids2).logits
    assert (later[:, 24:] - ours[:, 24:]).abs().max() > 1e-6  # window 0 reaches window 3 only through beacons


@torch.no_grad()
def test_window_mask_stepwise_expansion():
    m = bcn.window_mask(n_mem=3, n_old=0, n_raw=4, n_beacons=2, ratio=2, device="cpu")
    assert m.shape == (6, 3 + 4 + 2)
    assert m[:, :3].all()  # everyone sees the memory
    assert torch.equal(m[:4, 3:7], torch.ones(4, 4, dtype=torch.bool).tril())  # raw: causal within the window
    assert not m[:4, 7:].any()  # raw tokens never see the window's own beacons
    assert m[4, 3:].tolist() == [True, True, False, False, True, False]  # beacon 0: raw 0-1, itself
    assert m[5, 3:].tolist() == [True, True, True, True, True, True]  # beacon 1: raw 0-3, beacons 0-1
    m = bcn.window_mask(n_mem=0, n_old=5, n_raw=2, n_beacons=0, ratio=2, device="cpu")
    assert m.tolist() == [[True] * 6 + [False], [True] * 7]


@torch.no_grad()
def test_causality():
    model = make_model()
    ids = tokens(V, 1, 30, seed=3)
    ids2 = change_token(ids, 13, V)
    a, b = model(ids).logits, model(ids2).logits
    assert torch.equal(a[:, :13], b[:, :13])
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-6


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = make_model(dtype=torch.float32)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded, BeaconForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = tokens(V, 2, 19, seed=None)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_beacon_projections_start_as_copies():
    torch.manual_seed(0)
    attn = BeaconForCausalLM(tiny_config()).model.layers[1].self_attn
    for p in ("q", "k", "v", "o"):
        assert torch.equal(getattr(attn, f"beacon_{p}_weight"), getattr(attn, f"{p}_proj").weight)
        assert getattr(attn, f"beacon_{p}_weight") is not getattr(attn, f"{p}_proj").weight  # copied, not tied


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = BeaconForCausalLM(tiny_config()).train()
    ids = tokens(V, 4, 24, seed=4)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    ref = shifted_loss(out.logits, labels)
    assert torch.allclose(out.loss, ref) and out.cache is None
    losses = train_losses(model, ids, labels, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert model.model.beacon_embed_tokens.weight.grad.abs().sum() > 0  # beacons are trained through later windows


def test_bf16_forward_backward_is_finite():
    model = BeaconForCausalLM(tiny_config()).to(torch.bfloat16).train()
    ids = tokens(V, 2, 20, seed=None)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16


@torch.no_grad()
def test_bounded_state():
    model = make_model(window_len=16, condensing_ratio=4, max_beacon_windows=3)

    def tensors(state):
        return [t for s in state.layers for t in (s.mem_k, s.mem_v, s.raw_k, s.raw_v)]

    s64 = model(tokens(V, 1, 64, seed=None), use_cache=True).cache
    s512 = model(tokens(V, 1, 512, seed=None), use_cache=True).cache
    assert s512.pos == 512 and state_numel(s64, tensors) == state_numel(s512, tensors)
    assert s512.layers[0].mem_k.shape[2] == 3 * 4  # 3 windows of 16 / 4 beacons


@torch.no_grad()
def test_greedy_generate_uses_state():
    model = make_model()
    ids = tokens(V, 1, 11, seed=None)
    gen = model.generate(ids, max_new_tokens=7, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(gen, greedy_recompute(model, ids, 7))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="condensing_ratio"):
        tiny_config(condensing_ratio=3)
    with pytest.raises(ValueError, match="condensing_ratio"):
        tiny_config(condensing_ratio=-1)
    with pytest.raises(ValueError, match="max_beacon_windows"):
        tiny_config(max_beacon_windows=0)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
