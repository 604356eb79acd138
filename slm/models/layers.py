"""Building blocks shared by the slm backbones (nanoGPT-style: small, readable, cited).

RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020) and rotary position embeddings
(Su et al. 2021) as Llama uses them, so every backbone speaks the same dialect as `llama`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reject_padding(attention_mask: torch.Tensor | None, backbone: str, state: str) -> None:
    """The streaming backbones carry state across the sequence: a pad token would enter it, so padded
    masks are refused."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            f"{backbone}: attention_mask with padding is not supported (the {state} would absorb pad tokens); "
            "pack sequences without padding or feed rows one at a time"
        )


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g"""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


class SwiGLU(nn.Module):
    """FFN(x) = W_down (SiLU(W_gate x) * W_up x)"""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32):
    """cos/sin tables for absolute `positions` (shape [T]): angle = pos * theta^(-2i/d)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]. RoFormer eq. (34): x*cos + rotate_half(x)*sin."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q, k, v, q_offset: int = 0) -> torch.Tensor:
    """Softmax attention where query i (absolute index q_offset+i within k) sees keys 0..q_offset+i.

    k/v may have fewer heads than q (grouped-query attention: query head h reads kv head h // (H / KVH))."""
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if tq == tk and q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    i = torch.arange(tq, device=q.device)[:, None] + q_offset
    j = torch.arange(tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i, enable_gqa=gqa)


class AttentionProjections(nn.Module):
    """The four Llama attention projections with its names (q_proj, k_proj, v_proj, o_proj), so that a
    Llama / Mistral / Qwen2 checkpoint's weights load as they are: grouped-query layout (k/v project to
    num_key_value_heads heads), optional q/k/v biases (Qwen2; Llama's `attention_bias`) and o bias (Llama's
    `attention_bias` only). `split` returns [B, heads, T, head_dim] tensors."""

    def __init__(self, config):
        super().__init__()
        c, self.heads, self.kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = c // self.heads
        self.q_proj = nn.Linear(c, self.heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(c, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(c, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c, bias=config.attention_out_bias)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.split(self.q_proj(x), self.heads),
            self.split(self.k_proj(x), self.kv_heads),
            self.split(self.v_proj(x), self.kv_heads),
        )

    def merge(self, a: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, C] through W_O."""
        return self.o_proj(a.transpose(1, 2).flatten(2))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases (GPT-2 / Llama init)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
