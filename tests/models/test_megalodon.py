"""Property tests for the `megalodon` backbone (CPU, tiny sizes, float64 for equivalences)."""

import math

import pytest
import torch
from helpers import (
    change_token,
    chunked_diffs,
    greedy_recompute,
    make_tiny_model,
    random_cuts,
    save_and_reload,
    shifted_loss,
    state_numel,
    tokens,
    train_losses,
)

import slm.models.megalodon as meg
from slm.models.megalodon import MegalodonConfig, MegalodonForCausalLM

V = 61


def tiny_config(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        z_dim=16,
        value_dim=32,
        cema_ndim=4,
        chunk_len=8,
        norm_num_groups=4,
    )
    base.update(kw)
    return MegalodonConfig(**base)


def make_model(seed=0, dtype=torch.float64, **kw):
    # every parameter moved by 0.1 randn: the zero-initialised gains/offsets leave their special values
    return make_tiny_model(MegalodonForCausalLM, tiny_config(**kw), dtype, seed, lambda name: 0.1)


@torch.no_grad()
def test_chunked_with_state_equals_whole():
    model = make_model()
    ids = tokens(V, 2, 37, seed=1)
    whole = model(ids).logits
    g = torch.Generator().manual_seed(2)
    splits_list = [[1] * 37, [8, 8, 8, 8, 5], [3, 5, 1, 7, 13, 8], [20, 1, 1, 15]]
    splits_list += [random_cuts(37, g) for _ in range(2)]
    for splits, state, diff in chunked_diffs(model, ids, whole, splits_list, use_cache=True):
        assert state.pos == 37
        assert diff < 1e-8, (splits, diff)


@pytest.mark.parametrize("L", [1, 2, 3, 16, 17, 1000])
def test_blocked_powers_equal_direct_powers(L):
    """powers(q, L) builds q^t from two small exp tables; it must equal exp(t log q) (and q**t) at any L."""
    torch.manual_seed(0)
    q = torch.polar(torch.rand(5, 3, dtype=torch.float64) * 0.5 + 0.49, torch.rand(5, 3, dtype=torch.float64) * 6)
    t = torch.arange(L, dtype=torch.float64)
    direct = torch.exp(torch.log(q)[..., None] * t)
    got = meg.powers(q, L, torch.float64)
    assert got.shape == (5, 3, L)
    assert ((got - direct).abs() / direct.abs()).max() < 1e-12
    assert ((got - q[..., None] ** t).abs() / direct.abs()).max() < 1e-12
    q32 = q.to(torch.complex64)  # |q| < 1: absolute error (float32 underflows where float64 still has 1e-136)
    assert (meg.powers(q32, L, torch.float32) - direct).abs().max() < 1e-5


@torch.no_grad()
def test_cema_fft_equals_recurrent_with_initial_state():
    torch.manual_seed(0)
    cema = meg.ComplexEMA(6, 4).double()
    cema.reset_parameters()
    a, q, eta = cema.coefficients(torch.float64)
    x = torch.randn(2, 6, 29, dtype=torch.float64)
    h0 = torch.randn(2, 6, 4, dtype=torch.complex128)
    y_fft, h_fft = meg.cema_fft(x, a, q, eta, h0)
    y_rec, h_rec = meg.cema_recurrent(x, a, q, eta, h0)
    assert (y_fft - y_rec).abs().max() < 1e-10
    assert (h_fft - h_rec).abs().max() < 1e-10
    assert a.imag.abs().max() > 1e-3  # the phase is really non-trivial here


@torch.no_grad()
def test_cema_theta_zero_is_mega_damped_ema():
    """theta = 0 (sigmoid(-inf) = 0): CEMA is MEGA's real damped EMA, h_t = alpha x_t + (1 - alpha delta) h_{t-1},
    y_t = eta^T h_t (+ omega x_t), computed here in a plain Python loop."""
    torch.manual_seed(0)
    D, N, L = 3, 4, 21
    cema = meg.ComplexEMA(D, N).double()
    cema.reset_parameters()
    cema.theta.fill_(-math.inf)
    x = torch.randn(1, L, D, dtype=torch.float64)
    alpha, delta = torch.sigmoid(cema.alpha).tolist(), torch.sigmoid(cema.delta).tolist()
    eta = (cema.eta[..., 0] / math.sqrt(N)).tolist()
    omega = cema.omega.tolist()
    expected = torch.zeros(L, D, dtype=torch.float64)
    for d in range(D):
        h = [0.0] * N
        for t in range(L):
            xt = x[0, t, d].item()
            h = [alpha[d][n] * xt + (1 - alpha[d][n] * delta[d][n]) * h[n] for n in range(N)]
            expected[t, d] = sum(eta[d][n] * h[n] for n in range(N)) + omega[d] * xt
    for steps in ([L], [1] * L, [5, 1, 15]):  # FFT path, recurrent path, both with carried state
        h, ys, start = None, [], 0
        for n in steps:
            y, h = cema(x[:, start : start + n], h, True)
            ys.append(y)
            start += n
        assert (torch.cat(ys, 1)[0] - expected).abs().max() < 1e-12


@torch.no_grad()
def test_chunk_attention_degenerate_and_chunked():
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 13, 5
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))

    def plain(q, k, v):  # causal softmax attention, scale 1
        s = q @ k.transpose(-1, -2)
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v

    for chunk_len in (T, T + 5, 64):
        assert (meg.chunk_attention(q, k, v, chunk_len) - plain(q, k, v)).abs().max() < 1e-12
    # chunk_len < T: independent causal attention inside each chunk of 4
    got = meg.chunk_attention(q, k, v, 4)
    ref = torch.cat([plain(q[:, :, i : i + 4], k[:, :, i : i + 4], v[:, :, i : i + 4]) for i in range(0, T, 4)], 2)
    assert (got - ref).abs().max() < 1e-12
    # a cached prefix of 3 keys: the queries are positions 3.. of the same chunk grid
    got = meg.chunk_attention(q[:, :, 3:], k, v, 4, prefix=3)
    assert (got - ref[:, :, 3:]).abs().max() < 1e-12


@torch.no_grad()
def test_timestep_norm_matches_naive_cumulative_statistics():
    torch.manual_seed(0)
    B, T, D, G = 2, 9, 8, 2
    x = torch.randn(B, T, D, dtype=torch.float64) * 3 + 5
    w, b = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    y, mean, var = meg.timestep_norm(x, 0, None, None, w, b, G, 1e-5)
    y1, m1, v1 = meg.timestep_norm(x[:, :4], 0, None, None, w, b, G, 1e-5)
    y2, m2, v2 = meg.timestep_norm(x[:, 4:], 4, m1, v1, w, b, G, 1e-5)
    assert (torch.cat([y1, y2], 1) - y).abs().max() < 1e-12
    for t in range(T):
        seen = x[:, : t + 1].reshape(B, t + 1, G, D // G).transpose(1, 2).reshape(B, G, -1)
        mu, sd = seen.mean(-1), seen.var(-1, unbiased=False)
        ref = (x[:, t].view(B, G, -1) - mu[..., None]) / torch.sqrt(sd[..., None] + 1e-5)
        assert (y[:, t] - (ref.reshape(B, D) * (1 + w) + b)).abs().max() < 1e-10
    assert (mean - mu).abs().max() < 1e-12 and (var - sd).abs().max() < 1e-12


@torch.no_grad()
def test_causality():
    model = make_model()
    ids = tokens(V, 1, 30, seed=3)
    ids2 = change_token(ids, 17, V)
    a, b = model(ids).logits, model(ids2).logits
    assert (a[:, :17] - b[:, :17]).abs().max() < 1e-10  # FFT round-off only (the convolution mixes positions)
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 1e-6


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = make_model(dtype=torch.float32)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded, MegalodonForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = tokens(V, 2, 19, seed=None)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = MegalodonForCausalLM(tiny_config()).train()
    ids = tokens(V, 4, 24, seed=4)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    ref = shifted_loss(out.logits, labels)
    assert torch.allclose(out.loss, ref) and out.cache is None
    losses = train_losses(model, ids, labels, steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_forward_backward_is_finite():
    model = MegalodonForCausalLM(tiny_config()).to(torch.bfloat16).train()
    ids = tokens(V, 2, 20, seed=None)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@torch.no_grad()
def test_bounded_state():
    model = make_model(chunk_len=16)

    def tensors(state):
        t = [state.final_mean, state.final_var]
        for s in state.layers:
            t += [s.norm_mean, s.norm_var, s.cema_h, s.k, s.v]
        return t

    s64 = model(tokens(V, 1, 64, seed=None), use_cache=True).cache
    s512 = model(tokens(V, 1, 512, seed=None), use_cache=True).cache
    assert s512.pos == 512 and state_numel(s64, tensors) == state_numel(s512, tensors)
    s70 = model(tokens(V, 1, 70, seed=None), use_cache=True).cache
    assert s70.layers[0].k.shape[2] == 70 % 16  # only the incomplete chunk's keys are kept


@torch.no_grad()
def test_greedy_generate_uses_state():
    model = make_model()
    ids = tokens(V, 1, 11, seed=None)
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(gen, greedy_recompute(model, ids, 6))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="chunk_len"):
        tiny_config(chunk_len=0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_config(norm_num_groups=5)
    with pytest.raises(ValueError, match="z_dim"):
        tiny_config(z_dim=6)
