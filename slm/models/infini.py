"""`infini`: Infini-attention (Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", arXiv:2404.07143).

A Llama-style pre-norm decoder (RMSNorm, SwiGLU, RoPE) whose attention layers process the stream in
segments of `segment_len` tokens. Within a segment: causal softmax attention with RoPE (A_dot). Across
segments: a compressive memory per head (M, z), read with sigma(Q) (eq. 3) and written with sigma(K), V
(eq. 4 linear or eq. 5 delta), sigma = ELU + 1. The two reads are mixed by a learned gate per head (eq. 6).

Choices made here (the paper leaves them open):
- RoPE uses absolute stream positions (position offset carried in the state). Since attention only runs
  inside a segment and RoPE is relative, this equals segment-local positions up to rounding.
- Memory reads/writes use the pre-RoPE queries/keys (no positional encoding in the memory).
- M and z are fp32 (float64 for a float64 model). The division of eq. 3 / eq. 5 gets `memory_eps`
  added to its denominator so the first segment (M = 0, z = 0) reads exactly 0 instead of 0/0 = NaN.
- Retrieve before update: segment s reads M_{s-1}; a segment is written to memory when it completes.
- Grouped-query attention (num_key_value_heads < num_attention_heads, as in a grafted Llama-3/Mistral/
  Qwen2): the memory is kept per KV head, and query head h reads the memory of KV head h // (H / KVH).
- `gate_mode="mix"` is eq. (6). `gate_mode="add"` is A = A_dot + tanh(beta) A_mem with beta = 0 at init
  (Flamingo's zero-initialised tanh gate, Alayrac et al. 2022): exactly local attention at step 0 yet with a
  full gradient on beta. A grafted model uses it, so that it starts as the source checkpoint (a sigmoid mix
  would halve A_dot at beta = 0, and a sigmoid pushed shut has almost no gradient: a public reproduction
  whose gates stayed near 0.5 never retrieved).

State (`InfiniCache`, carried only through `past_key_values` / `cache`): per layer M [B,KVH,D,D],
z [B,KVH,D] and the keys (post-RoPE and pre-RoPE) and values of the current incomplete segment
(< segment_len tokens), plus the absolute position. Its size is bounded by the segment length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from slm.models.causal_lm import StreamingCausalLM
from slm.models.config_base import StreamingConfig
from slm.models.layers import (
    AttentionProjections,
    RMSNorm,
    SwiGLU,
    apply_rope,
    causal_attention,
    init_weights,
    reject_padding,
    rope_cos_sin,
)
from slm.models.registry import GraftSpec, register_backbone


class InfiniConfig(StreamingConfig):
    """Llama-style sizes (`StreamingConfig`) plus:
    segment_len (64): tokens per segment (local attention span, memory write unit).
    memory_update ("delta"): "linear" (eq. 4) or "delta" (eq. 5).
    gate_init (0.0): initial gate logit beta of every head (mix: sigmoid(0) = even mix of memory and local;
        add: tanh(0) = 0, memory shut).
    gate_mode ("mix"): "mix" (eq. 6, a sigmoid convex mix) or "add" (local + tanh(beta) * memory).
    memory_eps (1e-6): added to the memory read/delta denominators sigma(.) z (guards z = 0).
    """

    model_type = "slm_infini"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    segment_len: int = 64
    memory_update: str = "delta"
    gate_init: float = 0.0
    gate_mode: str = "mix"
    memory_eps: float = 1e-6

    integer_keys = {**StreamingConfig.integer_keys, "segment_len": 1}
    positive_keys = (*StreamingConfig.positive_keys, "memory_eps")

    def _check_structure(self):
        super()._check_structure()
        if self.memory_update not in ("linear", "delta"):
            raise ValueError(f"memory_update={self.memory_update!r}: expected 'linear' or 'delta'")
        if self.gate_mode not in ("mix", "add"):
            raise ValueError(
                f"gate_mode={self.gate_mode!r}: expected 'mix' (eq. 6) or 'add' (zero-initialised tanh gate)"
            )

    def _check_numbers(self):
        super()._check_numbers()
        if not isinstance(self.gate_init, (int, float)):
            raise ValueError(f"gate_init={self.gate_init!r}: must be a number")


@dataclass
class InfiniLayerState:
    M: torch.Tensor  # [B, KVH, D, D] compressive memory (fp32 / fp64)
    z: torch.Tensor  # [B, KVH, D] normalisation term (fp32 / fp64)
    k: torch.Tensor  # [B, KVH, t, D] pre-RoPE keys of the incomplete segment (t < segment_len)
    k_rope: torch.Tensor  # [B, KVH, t, D] their RoPE'd keys, for the local attention
    v: torch.Tensor  # [B, KVH, t, D] their values


@dataclass
class InfiniCache:
    layers: list[InfiniLayerState]
    position: int = 0  # absolute position of the next token

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.layers for t in (s.M, s.z, s.k, s.k_rope, s.v)]

    def detach(self) -> InfiniCache:
        """Cut the autograd graph (truncated BPTT across chunks)."""
        return InfiniCache(
            [InfiniLayerState(*(t.detach() for t in (s.M, s.z, s.k, s.k_rope, s.v))) for s in self.layers],
            self.position,
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position


def sigma(x: torch.Tensor) -> torch.Tensor:
    """Element-wise ELU + 1 nonlinearity of the memory (paper sec. 2.1.2)."""
    return F.elu(x) + 1.0


class InfiniAttention(AttentionProjections):
    def __init__(self, config: InfiniConfig):
        super().__init__(config)
        self.segment_len = config.segment_len
        self.delta = config.memory_update == "delta"
        self.additive_gate = config.gate_mode == "add"
        self.eps = config.memory_eps
        self.rope_theta = config.rope_theta
        self.beta = nn.Parameter(torch.full((self.heads,), float(config.gate_init)))  # gate, eq. (6)

    def memory_gate(self) -> torch.Tensor:
        """Per head, the weight of the memory read: sigmoid(beta) (mix, eq. 6) or tanh(beta) (add)."""
        return torch.tanh(self.beta) if self.additive_gate else torch.sigmoid(self.beta)

    @property
    def gate_parameter(self) -> nn.Parameter:
        return self.beta

    @torch.autocast("cuda", enabled=False)  # memory math stays in M's dtype (fp32 / fp64)
    @torch.autocast("cpu", enabled=False)
    def retrieve(self, q, M, z):
        """A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})  -- eq. (3); eps guards z = 0.
        q: [B, H, T, D]; the G = H / KVH query heads of a group read their KV head's memory."""
        B, H, T, D = q.shape
        sq = sigma(q.to(M.dtype)).reshape(B, M.shape[1], -1, D)  # [B, KVH, G*T, D]
        return ((sq @ M) / (sq @ z.unsqueeze(-1) + self.eps)).view(B, H, T, D)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def update(self, M, z, k, v):
        """Write a completed segment's (pre-RoPE) keys and values into memory."""
        sk, v = sigma(k.to(M.dtype)), v.to(M.dtype)
        if self.delta:  # M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))  -- eq. (5)
            v = v - (sk @ M) / (sk @ z.unsqueeze(-1) + self.eps)
        M = M + sk.transpose(-2, -1) @ v  # linear: M_s = M_{s-1} + sigma(K)^T V  -- eq. (4)
        z = z + sk.sum(dim=-2)  # z_s = z_{s-1} + sum_t sigma(K_t)  -- eq. (4)
        return M, z

    def forward(self, x: torch.Tensor, state: InfiniLayerState | None, pos: int):
        B, T, _ = x.shape
        KVH, D, L = self.kv_heads, self.head_dim, self.segment_len
        q, k, v = self.qkv(x)  # [B, H | KVH, T, D], no PE (memory path)
        cos, sin = rope_cos_sin(torch.arange(pos, pos + T, device=x.device), D, self.rope_theta, x.dtype)
        q_rope, k_rope = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # local attention path
        if state is None:
            mem_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            empty = x.new_zeros(B, KVH, 0, D)
            state = InfiniLayerState(
                x.new_zeros(B, KVH, D, D, dtype=mem_dtype), x.new_zeros(B, KVH, D, dtype=mem_dtype), empty, empty, empty
            )
        M, z, seg_k, seg_k_rope, seg_v = state.M, state.z, state.k, state.k_rope, state.v
        gate = self.memory_gate().view(1, self.heads, 1, 1)
        outs, start = [], 0
        while start < T:  # pieces of the input that fall in one segment
            p = seg_k.shape[-2]  # tokens of the current segment already seen
            n = min(T - start, L - p)
            piece = slice(start, start + n)
            seg_k = torch.cat([seg_k, k[:, :, piece]], dim=-2)
            seg_k_rope = torch.cat([seg_k_rope, k_rope[:, :, piece]], dim=-2)
            seg_v = torch.cat([seg_v, v[:, :, piece]], dim=-2)
            # A_dot: causal softmax attention within the segment (sec. 2.1.1)
            a_dot = causal_attention(q_rope[:, :, piece], seg_k_rope, seg_v, q_offset=p)
            a_mem = self.retrieve(q[:, :, piece], M, z).to(x.dtype)  # reads M_{s-1}, eq. (3)
            if self.additive_gate:  # A = A_dot + tanh(beta) A_mem
                outs.append(a_dot + gate * a_mem)
            else:  # A = sig(beta) A_mem + (1 - sig(beta)) A_dot, eq. (6)
                outs.append(gate * a_mem + (1.0 - gate) * a_dot)
            if p + n == L:  # segment complete: memory update, eq. (4)/(5)
                M, z = self.update(M, z, seg_k, seg_v)
                seg_k = seg_k_rope = seg_v = x.new_zeros(B, KVH, 0, D)
            start += n
        return self.merge(torch.cat(outs, dim=-2)), InfiniLayerState(M, z, seg_k, seg_k_rope, seg_v)


class InfiniDecoderLayer(nn.Module):
    def __init__(self, config: InfiniConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = InfiniAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, state, pos):
        a, state = self.self_attn(self.input_layernorm(x), state, pos)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), state


class InfiniPreTrainedModel(PreTrainedModel):
    config_class = InfiniConfig
    base_model_prefix = "model"
    _no_split_modules = ["InfiniDecoderLayer"]

    def _init_weights(self, module):
        init_weights(module, self.config.initializer_range)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InfiniAttention):
            nn.init.constant_(module.beta, float(self.config.gate_init))


class InfiniModel(InfiniPreTrainedModel):
    def __init__(self, config: InfiniConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InfiniDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, cache=None, **kwargs):
        reject_padding(attention_mask, "infini", "compressive memory")
        past = cache if cache is not None else past_key_values
        if use_cache is None:  # return the state when streaming or evaluating, not in plain training
            use_cache = past is not None or not self.training
        x = self.embed_tokens(input_ids)
        pos = past.position if past is not None else 0
        states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, past.layers[i] if past is not None else None, pos)
            states.append(s)
        state = InfiniCache(states, pos + input_ids.shape[1]) if use_cache else None
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=state)


class InfiniForCausalLM(StreamingCausalLM, InfiniPreTrainedModel):
    decoder_class = InfiniModel


register_backbone(
    "infini",
    InfiniConfig,
    InfiniForCausalLM,
    graft=GraftSpec(
        closed_options={"gate_mode": "add", "gate_init": 0.0},
        new_parameters=("self_attn.beta",),
        span_key="segment_len",
    ),
)
