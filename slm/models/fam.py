"""`fam`: TransformerFAM, Feedback Attention Memory (Hwang, Wang, Huo, Sim & Mengibar 2024,
"TransformerFAM: Feedback attention is working memory", arXiv:2404.09173).

A Llama-style pre-norm decoder (RMSNorm, SwiGLU, RoPE) with Block Sliding Window Attention (BSWA,
sec. 2.1, eq. 1) plus, in every layer, `fam_len` feedback activations F (sec. 2.2, Algorithm 2):
    Q, K, V       = QKV(PreLN(I_tau));   Q^F, K^F, V^F = QKV(PreLN(F_{tau-1}))   (same weights)
    a_t           = Attn(q_t, [K_{tau-m:tau-1}, K^F, K_{tau,:t}]) + i_t         (block tokens)
    O_tau         = FF(PreLN(A_tau)) + A_tau
    AF_tau        = Attn(Q^F, [K^F, K_tau]) + F_{tau-1}                          (FAM compresses the block)
    F_tau         = FF(PreLN(AF_tau)) + AF_tau
The feedback is within the layer: F_tau of layer l is the FAM input of layer l at block tau+1 (sec. 1,
"within-transformer-block feedback"); block outputs O go up to layer l+1 as usual.

Choices (paper appendix B unless noted):
- FAM init (B.1): `fam_init="prompt"` (default, the paper's choice): learned prompt embeddings of
  `fam_len` tokens, passed through the layers with full attention among themselves; the activation at the
  input of layer l is that layer's initial FAM F_{-1}. `fam_init="prefix"`: a learned F_{-1} per layer
  (prefix tuning, B.4.6). The first update uses a zero residual instead of F_{-1} (B.1).
- FAM positions (B.2.1): F_tau takes the last `fam_len` positions of block tau, i.e. as keys read at
  block tau+1 and as queries of the update that creates it. RoPE uses absolute stream positions; the
  prompt sits at positions -fam_len..-1. Random position offset / random state passing (B.2.2-3) are
  training-loop techniques and are not done here (a trainer can carry the state between steps).
- BSWA memory (sec. 2.1): `memory_blocks` previous complete blocks; the FAM update attends only to
  F_{tau-1} and the whole current block (Alg. 2); block queries see only the latest FAM (B.4.2).
- Incomplete blocks (streaming): tokens attend the memory blocks, F_{tau-1} and the causal prefix of
  their block; F is updated only when a block completes.
- Grouped-query attention (num_key_value_heads < num_attention_heads) as in Llama: the FAM keys and values
  have the KV heads too.
- `fam_read="joint"` (default, Alg. 2): block tokens attend the FAM keys inside one softmax with the block's
  keys. `fam_read="gated"`: a_t = Attn(q_t, [K_mem, K_blk,:t]) + tanh(gamma_h) Attn(q_t, K^F), gamma = 0 at init
  (a zero-initialised tanh gate, as Flamingo's): a model grafted from a Llama checkpoint then computes
  exactly what the checkpoint does within a block, and the gate learns to open. The FAM update is the same.

State (`FamCache`, only via `past_key_values` / `cache`): per layer F [B, fam_len, C], the RoPE'd keys and
values of the last `memory_blocks` complete blocks and of the incomplete block, and the absolute position.
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


class FamConfig(StreamingConfig):
    """Llama-style sizes (`StreamingConfig`) plus:
    block_len (64): BSWA block size, the FAM update stride.
    memory_blocks (1): previous blocks of keys/values each block attends to (BSWA memory segment).
    fam_len (8): feedback memory activations per layer (0 = plain BSWA).
    fam_init ("prompt"): "prompt" (learned prompt embeddings through the layers, paper B.1) or
        "prefix" (a learned initial FAM per layer).
    fam_read ("joint"): "joint" (one softmax over memory, FAM and block keys, Alg. 2) or "gated" (the FAM
        read added through a zero-initialised tanh gate per head; see the module docstring).
    """

    model_type = "slm_fam"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    block_len: int = 64
    memory_blocks: int = 1
    fam_len: int = 8
    fam_init: str = "prompt"
    fam_read: str = "joint"

    integer_keys = {**StreamingConfig.integer_keys, "block_len": 1, "memory_blocks": 0, "fam_len": 0}

    def _check_structure(self):
        super()._check_structure()
        if self.fam_init not in ("prompt", "prefix"):
            raise ValueError(f"fam_init={self.fam_init!r}: expected 'prompt' or 'prefix'")
        if self.fam_read not in ("joint", "gated"):
            raise ValueError(f"fam_read={self.fam_read!r}: expected 'joint' or 'gated'")


@dataclass
class FamLayerState:
    fam: torch.Tensor  # [B, fam_len, C] F of the last complete block (initial FAM before that)
    mem_k: torch.Tensor  # [B, H, <= memory_blocks * block_len, D] RoPE'd keys of previous blocks
    mem_v: torch.Tensor
    blk_k: torch.Tensor  # [B, H, < block_len, D] RoPE'd keys of the incomplete block
    blk_v: torch.Tensor


@dataclass
class FamCache:
    layers: list[FamLayerState]
    position: int = 0  # absolute position of the next token

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.layers for t in (s.fam, s.mem_k, s.mem_v, s.blk_k, s.blk_v)]

    def detach(self) -> FamCache:
        """Cut the autograd graph (truncated BPTT across chunks)."""
        return FamCache(
            [FamLayerState(*(t.detach() for t in (s.fam, s.mem_k, s.mem_v, s.blk_k, s.blk_v))) for s in self.layers],
            self.position,
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position


class FamDecoderLayer(AttentionProjections):
    """One layer; it owns its attention projections (q_proj ... o_proj), which the FAM shares (Alg. 2)."""

    def __init__(self, config: FamConfig):
        super().__init__(config)
        c = config.hidden_size
        self.block_len, self.fam_len, self.memory_blocks = config.block_len, config.fam_len, config.memory_blocks
        self.rope_theta = config.rope_theta
        self.input_layernorm = RMSNorm(c, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c, config.rms_norm_eps)
        self.mlp = SwiGLU(c, config.intermediate_size)
        if config.fam_init == "prefix":
            self.fam_init = nn.Parameter(torch.zeros(config.fam_len, c))  # learned F_{-1} of this layer
        if config.fam_read == "gated":
            self.fam_gate = nn.Parameter(torch.zeros(self.heads))  # gamma, tanh(0) = 0: the FAM read starts shut
        self.fam_read_gated = config.fam_read == "gated"

    def memory_gate(self) -> torch.Tensor | None:
        """Per head, the weight of the gated FAM read (None with the joint softmax read)."""
        return torch.tanh(self.fam_gate) if self.fam_read_gated else None

    @property
    def gate_parameter(self) -> nn.Parameter:
        return self.fam_gate

    def qkv(self, x, q_start: int, kv_start: int):
        """Q, K, V = QKV(PreLN(x)), heads split, RoPE at positions q_start+i (Q) and kv_start+i (K)."""
        q, k, v = super().qkv(self.input_layernorm(x))
        ar = torch.arange(x.shape[1], device=x.device)
        cq, sq = rope_cos_sin(ar + q_start, self.head_dim, self.rope_theta, x.dtype)
        ck, sk = rope_cos_sin(ar + kv_start, self.head_dim, self.rope_theta, x.dtype)
        return apply_rope(q, cq, sq), apply_rope(k, ck, sk), v

    def attend(self, q, k, v):
        """Full (unmasked) softmax attention, grouped-query when k/v have fewer heads."""
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])

    def ffn(self, a):  # O = FF(PreLN(A)) + A  (Alg. 2)
        return a + self.mlp(self.post_attention_layernorm(a))

    def prompt_forward(self, p):
        """The FAM prompt through this layer: full attention among its tokens (paper B.1)."""
        q, k, v = self.qkv(p, -self.fam_len, -self.fam_len)
        return self.ffn(p + self.merge(self.attend(q, k, v)))

    def forward(self, x, state: FamLayerState, pos: int):
        B, T, _ = x.shape
        L, nF = self.block_len, self.fam_len
        q, k, v = self.qkv(x, pos, pos)
        fam, mem_k, mem_v, blk_k, blk_v = state.fam, state.mem_k, state.mem_v, state.blk_k, state.blk_v
        outs, start = [], 0
        while start < T:  # pieces of the input that fall in one block
            p = blk_k.shape[-2]  # tokens of the current block already seen
            n = min(T - start, L - p)
            piece, blk_start = slice(start, start + n), pos + start - p
            blk_k = torch.cat([blk_k, k[:, :, piece]], dim=-2)
            blk_v = torch.cat([blk_v, v[:, :, piece]], dim=-2)
            # F_{tau-1}: keys at the last positions of the previous block; update queries at those of this one (B.2.1)
            fq, fk, fv = self.qkv(fam, blk_start + L - nF, blk_start - nF)
            if self.fam_read_gated:  # a_t = Attn(q_t, [K_mem, K_{tau,:t}]) + tanh(gamma) Attn(q_t, K^F_{tau-1})
                keys, vals = torch.cat([mem_k, blk_k], dim=-2), torch.cat([mem_v, blk_v], dim=-2)
                local = causal_attention(q[:, :, piece], keys, vals, q_offset=keys.shape[-2] - n)
                gate = self.memory_gate().view(1, -1, 1, 1)
                outs.append(local + gate * self.attend(q[:, :, piece], fk, fv) if nF else local)
            else:  # a_t = Attn(q_t, Concat(K_{tau-m:tau-1}, K^F_{tau-1}, K_{tau,:t})) -- eq. (1), Alg. 2
                keys, vals = torch.cat([mem_k, fk, blk_k], dim=-2), torch.cat([mem_v, fv, blk_v], dim=-2)
                outs.append(causal_attention(q[:, :, piece], keys, vals, q_offset=keys.shape[-2] - n))
            if p + n == L:  # block complete
                if nF:  # AF = Attn(Q^F, Concat(K^F_{tau-1}, K_tau)) + F_{tau-1}; F_tau = FF(PreLN(AF)) + AF  (Alg. 2)
                    kf, vf = torch.cat([fk, blk_k], -2), torch.cat([fv, blk_v], -2)
                    af = self.merge(self.attend(fq, kf, vf))
                    fam = self.ffn(af if blk_start == 0 else af + fam)  # first update: zero residual (B.1)
                drop = max(0, mem_k.shape[-2] + L - self.memory_blocks * L)  # BSWA: keep memory_blocks blocks
                # (contiguous copies: a view would keep the whole concatenation alive in the carried state)
                mem_k, mem_v = (
                    torch.cat([mem_k, blk_k], -2)[:, :, drop:].contiguous(),
                    torch.cat([mem_v, blk_v], -2)[:, :, drop:].contiguous(),
                )
                blk_k, blk_v = blk_k[:, :, :0], blk_v[:, :, :0]
            start += n
        x = x + self.merge(torch.cat(outs, dim=-2))  # a_t = SelfAttention(...) + i_t
        return self.ffn(x), FamLayerState(fam, mem_k, mem_v, blk_k, blk_v)


class FamPreTrainedModel(PreTrainedModel):
    config_class = FamConfig
    base_model_prefix = "model"
    _no_split_modules = ["FamDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        init_weights(module, std)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, FamDecoderLayer):
            if hasattr(module, "fam_init"):
                nn.init.normal_(module.fam_init, mean=0.0, std=std)
            if hasattr(module, "fam_gate"):
                nn.init.zeros_(module.fam_gate)
        elif isinstance(module, FamModel):
            nn.init.normal_(module.fam_prompt, mean=0.0, std=std)


class FamModel(FamPreTrainedModel):
    def __init__(self, config: FamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        n = config.fam_len if config.fam_init == "prompt" else 0
        self.fam_prompt = nn.Parameter(torch.zeros(n, config.hidden_size))  # FAM prompt embeddings (B.1)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def initial_state(self, x) -> list[FamLayerState]:
        B, H = x.shape[0], self.config.num_key_value_heads
        D = self.config.hidden_size // self.config.num_attention_heads
        if self.config.fam_init == "prompt":
            fams, p = [], self.fam_prompt[None].to(x.dtype)
            for layer in self.layers:  # the prompt activation at layer l's input is its F_{-1}
                fams.append(p)
                p = layer.prompt_forward(p) if self.config.fam_len else p
        else:
            fams = [layer.fam_init[None].to(x.dtype) for layer in self.layers]
        empty = x.new_zeros(B, H, 0, D)
        return [FamLayerState(f.expand(B, -1, -1), empty, empty, empty, empty) for f in fams]

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, cache=None, **kwargs):
        reject_padding(attention_mask, "fam", "feedback memory")
        past = cache if cache is not None else past_key_values
        if use_cache is None:  # return the state when streaming or evaluating, not in plain training
            use_cache = past is not None or not self.training
        x = self.embed_tokens(input_ids)
        pos = past.position if past is not None else 0
        states = past.layers if past is not None else self.initial_state(x)
        new_states = []
        for layer, s in zip(self.layers, states):
            x, s = layer(x, s, pos)
            new_states.append(s)
        state = FamCache(new_states, pos + input_ids.shape[1]) if use_cache else None
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=state)


class FamForCausalLM(StreamingCausalLM, FamPreTrainedModel):
    decoder_class = FamModel


register_backbone(
    "fam",
    FamConfig,
    FamForCausalLM,
    graft=GraftSpec(
        closed_options={"fam_read": "gated"},
        new_parameters=("fam_prompt", "fam_gate", "fam_init"),
        span_key="block_len",
        renames=((".self_attn.", "."),),
    ),
)  # the layer owns its projections: layers.i.q_proj
