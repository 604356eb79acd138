"""`megalodon`: MEGALODON (Ma et al. 2024, "Megalodon: Efficient LLM Pretraining and Inference with
Unlimited Context Length", arXiv 2404.08801), built on MEGA (Ma et al. 2023, arXiv 2209.10655).

One layer (paper sec. 3, Fig. 2; layout as in the authors' reference code):
    X^   = TimestepNorm(X)                                   sec 3.3, eq (5)-(6)
    X'   = CEMA(X^) + omega * X^                             sec 3.1, eq (2)-(3)
    M    = RMSNorm(X')
    Z    = M W_z + b_z,   Z^ = Z / ||Z|| (per head)          sec 3.2, eq (7)-(8)
    Q, K = (kappa + 1) * Z^ + mu  (+ RoPE, chunk-relative)   eq (9)
    V    = silu(X^ W_v + b_v),  R = silu(M W_r + b_r)        MEGA eq (13), reset gate eq (16)
    O    = softmax(Q K^T) V   causal, inside chunks of `chunk_len` only        MEGA sec 3.5
    Y    = X + M W_h1 + b_h1 + (R * O) W_h2                  MEGA eq (17), update gate dropped
    out  = X + FFN(LayerNorm(Y))                             two-hop residual, sec 3.4, eq (11)
followed (after the last layer) by a final TimestepNorm.
Kept from MEGA's gating: the reset gate R. Dropped, as Megalodon does: MEGA's update gate phi (eq 18)
and the silu on H; the single-head EMA "expansion" beta (absorbed into the complex eta).

CEMA choice (documented): eq (2) puts the phase on the input term too, h_t = a x_t + q h_{t-1} with
a = alpha e^{i theta}, q = (1 - alpha delta) e^{i theta}; the authors' code uses a = alpha (real). The two
differ by the unit constant e^{i theta} that a complex eta absorbs; we follow the paper's equation.
theta_{j,k} = 2 pi k / h * sigmoid(omega_j), k = 1..h (sec 3.1), base angles initialised as the
reference code does (log-spaced in (1/d, 1), randomly permuted across dimensions).

State (`MegalodonState`, passed as `past_key_values` / `cache`): per layer the timestep-norm running
mean/var (fp32, fp64 in fp64 runs), the complex CEMA hidden h, the current incomplete chunk's keys and
values; the final-norm statistics; the absolute position `pos` (= the running count of the norms).
Padding masks are refused (`attention_mask` must be all ones): pad tokens would enter the CEMA and norm state.

Config keys of its own: z_dim (shared Q/K width, default hidden_size//2), value_dim (default
hidden_size), cema_ndim (EMA order h, default 16), chunk_len (attention chunk, default 64),
norm_num_groups (timestep-norm groups, default 8), norm_eps (1e-5). The reference code uses
z = D/4, v = 2D; the defaults here keep the attention parameter count near Llama's 4 D^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from slm.models.causal_lm import StreamingCausalLM
from slm.models.config_base import StreamingConfig
from slm.models.layers import RMSNorm, SwiGLU, apply_rope, init_weights, reject_padding, rope_cos_sin
from slm.models.registry import register_backbone


class MegalodonConfig(StreamingConfig):
    """Llama-style sizes (`StreamingConfig`; num_key_value_heads is ignored and stored as
    num_attention_heads: Q and K share one Z) plus the keys listed in the module docstring."""

    model_type = "slm_megalodon"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    tie_word_embeddings: bool = True
    z_dim: int | None = None
    value_dim: int | None = None
    cema_ndim: int = 16
    chunk_len: int = 64
    norm_num_groups: int = 8
    norm_eps: float = 1e-5

    integer_keys = {
        **StreamingConfig.integer_keys,
        **dict.fromkeys(("z_dim", "value_dim", "cema_ndim", "chunk_len", "norm_num_groups"), 1),
    }
    positive_keys = (*StreamingConfig.positive_keys, "norm_eps")

    def _fill_defaults(self):
        self.z_dim = self.hidden_size // 2 if self.z_dim is None else self.z_dim
        self.value_dim = self.hidden_size if self.value_dim is None else self.value_dim
        self.num_key_value_heads = self.num_attention_heads

    def _check_structure(self):  # replaces the hidden_size head split: the heads split z_dim / value_dim
        if self.attention_bias or self.attention_out_bias:
            raise ValueError(
                "attention_bias / attention_out_bias: megalodon has no Llama attention projections to bias"
            )
        if self.z_dim % (2 * self.num_attention_heads):
            raise ValueError(f"z_dim={self.z_dim}: must be divisible by 2*num_attention_heads (even RoPE head dim)")
        if self.value_dim % self.num_attention_heads:
            raise ValueError(f"value_dim={self.value_dim}: must be divisible by num_attention_heads")
        if self.hidden_size % self.norm_num_groups:
            raise ValueError(f"norm_num_groups={self.norm_num_groups}: must divide hidden_size={self.hidden_size}")


@dataclass
class MegalodonLayerState:
    norm_mean: torch.Tensor  # [B, G] timestep-norm running mean (fp32/fp64)
    norm_var: torch.Tensor  # [B, G] running (population) variance
    cema_h: torch.Tensor  # [B, D, h] complex CEMA hidden state
    k: torch.Tensor  # [B, H, c, dz] keys of the current chunk so far (c = pos % chunk_len, after RoPE)
    v: torch.Tensor  # [B, H, c, dv]


@dataclass
class MegalodonState:
    pos: int  # absolute position = tokens seen = running count of every timestep norm
    layers: list
    final_mean: torch.Tensor
    final_var: torch.Tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- timestep normalization (sec 3.3)
def timestep_norm(x, count: int, mean, var, weight, bias, groups: int, eps: float):
    """Eq (5)-(6): y_t = (x_t - mu_t) / sqrt(var_t + eps) * (1 + w) + b, with mu_t, var_t the mean and
    population variance of the group's features over ALL time steps <= t (causal cumulative statistics).
    Computed in parallel with Chan et al.'s pairwise (Welford-style) combination of per-step group
    statistics, shifted by the previous running mean (or the first step's mean) against cancellation.
    x: [B, T, D] in fp32/fp64; (count, mean [B,G], var [B,G]) the running statistics before x."""
    B, T, D = x.shape
    xg = x.view(B, T, groups, D // groups)
    mu_s, var_s = xg.mean(-1), xg.var(-1, unbiased=False)  # [B, T, G] per-step group statistics
    n = count + torch.arange(1, T + 1, device=x.device, dtype=x.dtype)[None, :, None]
    shift = mean if count > 0 else mu_s[:, 0]
    d = mu_s - shift[:, None]
    m1 = d.cumsum(1) / n  # running mean - shift (the previous steps contribute 0 by the choice of shift)
    m2 = (var_s + d * d).cumsum(1)
    if count > 0:
        m2 = m2 + count * var[:, None]
    cum_mean = shift[:, None] + m1
    cum_var = (m2 / n - m1 * m1).clamp_min(0)
    y = (xg - cum_mean[..., None]) * torch.rsqrt(cum_var + eps)[..., None]
    y = y.reshape(B, T, D) * (1.0 + weight.to(x.dtype)) + bias.to(x.dtype)
    return y, cum_mean[:, -1], cum_var[:, -1]


class TimestepNorm(nn.Module):
    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma = 1 + weight, as in the reference code
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, count, mean, var):
        acc = _acc_dtype(x.dtype)
        if count == 0:
            mean = var = None
        return timestep_norm(x.to(acc), count, mean, var, self.weight, self.bias, self.groups, self.eps)


# ---------------------------------------------------------------- complex EMA (sec 3.1)
def powers(q, L: int, real_dtype):
    """q^t for t = 0..L-1 ([..., L]), with about 2 sqrt(L) complex exps instead of L: t = s B + r, so
    q^t = (q^B)^s q^r, an outer product of a table of B low powers and one of ceil(L / B) high powers."""
    B = max(1, math.isqrt(L - 1) + 1) if L > 1 else 1
    S = -(-L // B)
    log_q = torch.log(q)[..., None]
    low = torch.exp(log_q * torch.arange(B, device=q.device, dtype=real_dtype))  # q^r
    high = torch.exp(log_q * (B * torch.arange(S, device=q.device, dtype=real_dtype)))  # q^{sB}
    return (high[..., :, None] * low[..., None, :]).flatten(-2)[..., :L]


def cema_fft(x, a, q, eta, h0=None, want_state=True):
    """FFT path. x: [B, D, L] real; a, q, eta: [D, h] complex; h0: [B, D, h] complex or None.
    y_t = Re(eta^T h_t) = sum_{s<=t} K_{t-s} x_s + Re(eta^T q^{t+1} h0),  K_t = Re(eta^T a q^t)  (eq 2-3)."""
    L = x.shape[-1]
    vander = powers(q, L, x.dtype)  # [D, h, L]: q^t
    kernel = torch.einsum("dn,dnl->dl", eta * a, vander).real  # K_t
    n = 2 * L  # zero-pad so the circular FFT convolution is the causal linear one
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :L]
    if h0 is not None:
        y = y + torch.einsum("dn,bdn,dnl->bdl", eta * q, h0, vander).real
    h_last = None
    if want_state:  # h_L = q^L h0 + sum_s q^{L-1-s} a x_s
        h_last = torch.einsum("dnl,bdl->bdn", vander, x.flip(-1).to(vander.dtype)) * a  # sum_u q^u x_{L-1-u}
        if h0 is not None:
            h_last = h_last + h0 * vander[..., -1] * q
    return y, h_last


def cema_recurrent(x, a, q, eta, h0=None):
    """Recurrent path, eq (2)-(3) literally: h_t = a x_t + q h_{t-1}, y_t = Re(eta^T h_t)."""
    B, D, L = x.shape
    h = torch.zeros(B, D, a.shape[-1], dtype=a.dtype, device=x.device) if h0 is None else h0
    ys = []
    for t in range(L):
        h = a * x[:, :, t, None] + q * h
        ys.append((eta * h).sum(-1).real)
    return torch.stack(ys, -1), h


class ComplexEMA(nn.Module):
    def __init__(self, dim: int, ndim: int):
        super().__init__()
        self.ndim = ndim
        self.alpha = nn.Parameter(torch.zeros(dim, ndim))  # alpha = sigmoid(.) in (0, 1)
        self.delta = nn.Parameter(torch.zeros(dim, ndim))  # delta = sigmoid(.) in (0, 1)
        self.theta = nn.Parameter(torch.zeros(dim))  # base angle omega_j = sigmoid(.)
        self.eta = nn.Parameter(torch.zeros(dim, ndim, 2))  # complex eta (real, imag)
        self.omega = nn.Parameter(torch.zeros(dim))  # residual weight (MEGA eq 4)

    @torch.no_grad()
    def reset_parameters(self):  # as in the reference implementation
        dim = self.theta.shape[0]
        nn.init.normal_(self.alpha, std=0.2)
        nn.init.normal_(self.delta, std=0.2)
        freqs = torch.exp(-torch.arange(1, dim + 1, dtype=torch.float64) * math.log(dim) / dim)
        freqs = freqs[torch.randperm(dim)] if dim > 1 else freqs.clamp_max(0.5)
        self.theta.copy_(torch.log(freqs / (1 - freqs)))
        nn.init.normal_(self.eta, std=1.0)
        self.eta[..., 1] = 0.0
        nn.init.trunc_normal_(self.omega, std=0.25, a=-1.0, b=1.0)

    def coefficients(self, dtype):
        alpha, delta = torch.sigmoid(self.alpha.to(dtype)), torch.sigmoid(self.delta.to(dtype))
        k = torch.arange(1, self.ndim + 1, device=alpha.device, dtype=dtype)
        angle = torch.sigmoid(self.theta.to(dtype))[:, None] * (2 * math.pi / self.ndim) * k  # theta_{j,k}
        phase = torch.polar(torch.ones_like(angle), angle)  # cos theta + i sin theta
        a = alpha * phase  # eq (2): alpha (cos theta + i sin theta)
        q = (1 - alpha * delta) * phase  # eq (2): (1 - alpha delta)(cos theta + i sin theta)
        eta = torch.view_as_complex(self.eta.to(dtype).contiguous()) / math.sqrt(self.ndim)
        return a, q, eta

    def forward(self, x, h0, want_state: bool):
        """x: [B, T, D] (fp32/fp64) -> (y [B, T, D], h_T)."""
        a, q, eta = self.coefficients(x.dtype)
        xt = x.transpose(1, 2)
        if x.shape[1] == 1:  # streaming step: the recurrence
            y, h = cema_recurrent(xt, a, q, eta, h0)
        else:  # whole sequences / training: FFT convolution
            y, h = cema_fft(xt, a, q, eta, h0, want_state)
        return y.transpose(1, 2) + x * self.omega.to(x.dtype), h


# ---------------------------------------------------------------- chunk-wise attention (sec 3.2)
def chunk_attention(q, k, v, chunk_len: int, prefix: int = 0):
    """Causal softmax attention (scale 1: Q, K are already normalised, eq 9-10) restricted to chunks of
    `chunk_len` positions. q: [B, H, T, dz]; k, v: [B, H, prefix + T, d]; the first `prefix` keys are the
    current chunk's earlier tokens (query i sits at chunk position prefix + i)."""
    B, H, T, _ = q.shape
    S = prefix + T
    c = min(chunk_len, S)
    pad = (-S) % c
    q = F.pad(q, (0, 0, prefix, pad))  # dummy queries for the cached prefix, dropped below
    k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    n = (S + pad) // c
    # the chunks as extra heads, [B, H * n, c, d]: 4-D inputs, which SDPA's fused kernels take (5-D ones fall back
    # to its unfused math kernel)
    o = F.scaled_dot_product_attention(
        q.reshape(B, H * n, c, -1), k.reshape(B, H * n, c, -1), v.reshape(B, H * n, c, -1), is_causal=True, scale=1.0
    )
    return o.view(B, H, n * c, -1)[:, :, prefix:S]


class MegalodonLayer(nn.Module):
    def __init__(self, config: MegalodonConfig):
        super().__init__()
        D, self.heads, self.chunk_len = config.hidden_size, config.num_attention_heads, config.chunk_len
        self.dz, self.dv = config.z_dim // self.heads, config.value_dim // self.heads
        self.rope_theta = config.rope_theta
        self.timenorm = TimestepNorm(D, config.norm_num_groups, config.norm_eps)
        self.cema = ComplexEMA(D, config.cema_ndim)
        self.rmsnorm = RMSNorm(D, config.rms_norm_eps)
        self.wz = nn.Linear(D, config.z_dim)
        self.wv = nn.Linear(D, config.value_dim)
        self.wr = nn.Linear(D, config.value_dim)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(config.value_dim, D, bias=False)
        self.qk_gamma = nn.Parameter(torch.zeros(2, config.z_dim))  # kappa_q, kappa_k (minus 1)
        self.qk_beta = nn.Parameter(torch.zeros(2, config.z_dim))  # mu_q, mu_k
        self.ffn_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.ffn = SwiGLU(D, config.intermediate_size)

    def forward(self, x, state: MegalodonLayerState | None, pos: int, want_state: bool):
        B, T, D = x.shape
        dtype = x.dtype
        x_tsn, mean, var = self.timenorm(x, pos, *((state.norm_mean, state.norm_var) if state else (None, None)))
        x_cema, h = self.cema(x_tsn, state.cema_h if state else None, want_state)
        x_tsn, m = x_tsn.to(dtype), self.rmsnorm(x_cema.to(dtype))
        z = F.normalize(self.wz(m).view(B, T, self.heads, self.dz), dim=-1, eps=1e-6)  # eq (8): Z / ||Z||
        z = z.reshape(B, T, -1).unsqueeze(2) * (self.qk_gamma + 1.0) + self.qk_beta  # eq (9)
        q, k = (t.view(B, T, self.heads, self.dz).transpose(1, 2) for t in z.unbind(2))
        v = F.silu(self.wv(x_tsn)).view(B, T, self.heads, self.dv).transpose(1, 2)
        r = F.silu(self.wr(m))  # reset gate
        positions = (pos + torch.arange(T, device=x.device)) % self.chunk_len  # RoPE inside the chunk
        cos, sin = rope_cos_sin(positions, self.dz, self.rope_theta, dtype=q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        prefix = pos % self.chunk_len
        if prefix:
            if state is None or state.k.shape[2] != prefix:
                raise ValueError("megalodon state: the cached chunk does not match the position")
            k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
        o = chunk_attention(q, k, v, self.chunk_len, prefix)
        o = o.transpose(1, 2).reshape(B, T, -1)
        y = x + self.wh1(m) + self.wh2(o * r)  # attention sub-layer with its own residual
        out = x + self.ffn(self.ffn_norm(y))  # two-hop residual (sec 3.4): the FFN adds onto the layer input
        if not want_state:
            return out, None
        keep = (prefix + T) % self.chunk_len  # tokens of the still incomplete chunk
        return out, MegalodonLayerState(
            mean, var, h, k[:, :, k.shape[2] - keep :].clone(), v[:, :, v.shape[2] - keep :].clone()
        )


# ---------------------------------------------------------------- HF wrappers
class MegalodonPreTrainedModel(PreTrainedModel):
    config_class = MegalodonConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegalodonLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init_weights(module, self.config.initializer_range)
        elif isinstance(module, ComplexEMA):
            module.reset_parameters()
        elif isinstance(module, TimestepNorm):
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, MegalodonLayer):
            module.qk_gamma.zero_()
            module.qk_beta.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class MegalodonModel(MegalodonPreTrainedModel):
    def __init__(self, config: MegalodonConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MegalodonLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = TimestepNorm(config.hidden_size, config.norm_num_groups, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, cache=None, **kwargs):
        reject_padding(attention_mask, "megalodon", "CEMA and timestep-norm state")
        state: MegalodonState | None = past_key_values if past_key_values is not None else cache
        if use_cache is None:
            use_cache = state is not None or not self.training
        pos = state.pos if state is not None else 0
        x = self.embed_tokens(input_ids)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, state.layers[i] if state is not None else None, pos, use_cache)
            new_layers.append(layer_state)
        fm, fv = (state.final_mean, state.final_var) if state is not None else (None, None)
        h, mean, var = self.norm(x, pos, fm, fv)
        new_state = MegalodonState(pos + input_ids.shape[1], new_layers, mean, var) if use_cache else None
        return BaseModelOutputWithPast(last_hidden_state=h.to(x.dtype), cache=new_state)


class MegalodonForCausalLM(StreamingCausalLM, MegalodonPreTrainedModel):
    decoder_class = MegalodonModel


register_backbone(
    "megalodon",
    MegalodonConfig,
    MegalodonForCausalLM,
    graft_refusal="its CEMA and timestep-norm layers replace attention: no source weight has a place in them",
)
