"""What only the `megalodon` backbone has (MEGALODON): the blocked CEMA powers, CEMA by FFT and by
recurrence, chunked attention, the timestep norm (CPU, float64). The properties every backbone shares,
and CEMA's degenerate setting (MEGA's damped EMA), are in test_backbone_properties.py."""

import pytest
import torch

import slm.models.megalodon as meg


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
