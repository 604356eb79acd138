"""`beacon`: Activation Beacon (Zhang et al. 2024, "Soaring from 4K to 400K: Extending LLM's Context with
Activation Beacon", arXiv 2401.03462; v2 "Long Context Compression with Activation Beacon").

A Llama decoder (RMSNorm, RoPE, SwiGLU; module names as in transformers' Llama) that reads its input in
windows of `window_len` tokens (sec 2.2, sliding windows with stride = window). After a window is complete,
k = window_len / condensing_ratio beacon tokens <bcn> (one learned embedding, sec 2.1) are appended and run
through every layer with their own Q/K/V/O projections (sec 2.3, "beacon_param q,k,v,o"; copied from the
regular ones at init) and the shared norms/MLP. Their keys/values are the condensed activations of the window
(eq 1-3): the window's raw keys/values are then dropped and only the beacons' are kept as memory for the later
windows, at most `max_beacon_windows` windows of them (oldest dropped first), so the state is bounded.

Attention (sec 2.2, Fig. 2), with memory = kept beacon KV of previous windows:
  * raw token i of the current window: memory + raw tokens 0..i of its window (causal prefix);
  * beacon j (0-based) of the window: memory + raw tokens 0..(j+1)*ratio-1 + beacons 0..j of the window.
    This is the paper's "stepwise expansion" assignment (its best variant, sec 2.2 / Table 5).
Positions (RoPE) are those of the working context [memory | window raw tokens | window beacons]:
memory i -> i, raw token i -> M + i, beacon j -> M + window_len + j (beacons appended after the window, v1).
Keys are cached before RoPE (as the reference code does) so memory can be re-indexed when it slides.
condensing_ratio = 0 means no condensing (the reference code's ratio 0): the window's raw KV is the memory,
i.e. plain causal Llama attention as long as at most `max_beacon_windows` windows precede the token.

State (`BeaconState`, passed as `past_key_values` / `cache`): per layer the memory KV and the raw KV of the
incomplete current window (both pre-RoPE), plus the absolute position `pos`. Padding masks are refused
(`attention_mask` must be all ones): pad tokens would be condensed into beacons. Only raw tokens reach
`last_hidden_state`, aligned with input_ids.

Config keys of its own: window_len (64), condensing_ratio (8; 0 = none; must divide window_len),
max_beacon_windows (64).
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
    init_weights,
    reject_padding,
    rope_cos_sin,
)
from slm.models.registry import GraftSpec, register_backbone


class BeaconConfig(StreamingConfig):
    """Llama-style sizes (`StreamingConfig`; num_key_value_heads is honoured: grouped-query attention)
    plus window_len, condensing_ratio and max_beacon_windows (see the module docstring)."""

    model_type = "slm_beacon"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    tie_word_embeddings: bool = True
    window_len: int = 64
    condensing_ratio: int = 8
    max_beacon_windows: int = 64

    integer_keys = {**StreamingConfig.integer_keys, "window_len": 1, "max_beacon_windows": 1}

    def _check_structure(self):
        ratio = self.condensing_ratio
        if not isinstance(ratio, int) or ratio < 0:
            raise ValueError(f"condensing_ratio={ratio!r}: must be an integer >= 0 (0 = no beacons)")
        if ratio and self.window_len % ratio:
            raise ValueError(f"condensing_ratio={ratio}: must divide window_len={self.window_len}")
        super()._check_structure()


@dataclass
class BeaconLayerState:
    mem_k: torch.Tensor  # [B, KVH, M, hd] kept beacon keys (pre-RoPE), M <= max_beacon_windows * k
    mem_v: torch.Tensor
    raw_k: torch.Tensor  # [B, KVH, n, hd] raw keys of the incomplete window, n = pos % window_len
    raw_v: torch.Tensor


@dataclass
class BeaconState:
    pos: int  # absolute position (tokens seen)
    layers: list

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


def window_mask(n_mem: int, n_old: int, n_raw: int, n_beacons: int, ratio: int, device) -> torch.Tensor:
    """Boolean [queries, keys] mask for one window step (True = attend). Queries: the n_raw new raw tokens
    (window indices n_old..), then the beacons; keys: memory, the window's raw tokens, the beacons."""
    n_win = n_old + n_raw
    qi = torch.arange(n_old, n_win, device=device)[:, None]
    raw_q = torch.cat(
        [
            torch.ones(n_raw, n_mem, dtype=torch.bool, device=device),
            torch.arange(n_win, device=device)[None, :] <= qi,  # causal prefix of the window
            torch.zeros(n_raw, n_beacons, dtype=torch.bool, device=device),
        ],
        1,
    )
    if n_beacons == 0:
        return raw_q
    j = torch.arange(n_beacons, device=device)[:, None]
    bcn_q = torch.cat(
        [
            torch.ones(n_beacons, n_mem, dtype=torch.bool, device=device),
            torch.arange(n_win, device=device)[None, :] < (j + 1) * ratio,  # stepwise expansion
            torch.arange(n_beacons, device=device)[None, :] <= j,
        ],
        1,
    )  # previous beacons
    return torch.cat([raw_q, bcn_q], 0)


class BeaconAttention(AttentionProjections):
    def __init__(self, config: BeaconConfig):
        super().__init__(config)
        # the beacons' own projections (sec 2.3), initialised as copies of the regular ones (see _init_weights),
        # biases included where the regular projections have them (a grafted Qwen2 / Llama with attention_bias)
        for p in ("q", "k", "v", "o"):
            regular = getattr(self, f"{p}_proj")
            setattr(self, f"beacon_{p}_weight", nn.Parameter(torch.empty_like(regular.weight)))
            if regular.bias is not None:
                setattr(self, f"beacon_{p}_bias", nn.Parameter(torch.empty_like(regular.bias)))

    def beacon_proj(self, p: str, x):
        return F.linear(x, getattr(self, f"beacon_{p}_weight"), getattr(self, f"beacon_{p}_bias", None))

    def copy_regular_to_beacon(self):
        """Beacon projections := the regular ones (the paper's initialisation, sec 2.3)."""
        for p in ("q", "k", "v", "o"):
            regular = getattr(self, f"{p}_proj")
            getattr(self, f"beacon_{p}_weight").copy_(regular.weight)
            if regular.bias is not None:
                getattr(self, f"beacon_{p}_bias").copy_(regular.bias)

    def forward(self, x, n_raw: int, mem, raw, rope_q, rope_k, mask):
        """x: [B, n_raw + n_beacons, D] (normed); mem/raw: (k, v) pre-RoPE caches. Returns the output and the new
        raw and beacon (k, v), pre-RoPE."""
        xr, xb = x[:, :n_raw], x[:, n_raw:]
        q, k, v = (  # raw tokens through the regular projections, beacons through their own
            self.split(torch.cat([getattr(self, f"{n}_proj")(xr), self.beacon_proj(n, xb)], 1), h)
            for n, h in (("q", self.heads), ("k", self.kv_heads), ("v", self.kv_heads))
        )
        keys = torch.cat([mem[0], raw[0], k], 2)
        values = torch.cat([mem[1], raw[1], v], 2)
        q, keys = apply_rope(q, *rope_q), apply_rope(keys, *rope_k)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        out = torch.cat([self.o_proj(o[:, :n_raw]), self.beacon_proj("o", o[:, n_raw:])], 1)
        return out, (k[:, :, :n_raw], v[:, :, :n_raw]), (k[:, :, n_raw:], v[:, :, n_raw:])


class BeaconDecoderLayer(nn.Module):
    def __init__(self, config: BeaconConfig):
        super().__init__()
        self.self_attn = BeaconAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, n_raw, mem, raw, rope_q, rope_k, mask):
        a, new_raw, beacons = self.self_attn(self.input_layernorm(x), n_raw, mem, raw, rope_q, rope_k, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_raw, beacons


class BeaconPreTrainedModel(PreTrainedModel):
    config_class = BeaconConfig
    base_model_prefix = "model"
    _no_split_modules = ["BeaconDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init_weights(module, self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, BeaconAttention):  # runs after its children: copy the regular projections
            module.copy_regular_to_beacon()


class BeaconModel(BeaconPreTrainedModel):
    def __init__(self, config: BeaconConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.beacon_embed_tokens = nn.Embedding(1, config.hidden_size)  # the learned <bcn> embedding
        self.layers = nn.ModuleList(BeaconDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _empty_state(self, batch: int, dtype, device) -> list:
        c = self.config
        e = torch.zeros(
            batch, c.num_key_value_heads, 0, c.hidden_size // c.num_attention_heads, dtype=dtype, device=device
        )
        return [BeaconLayerState(e, e, e, e) for _ in self.layers]

    def _window_step(self, x, states: list, n_old: int):
        """Run the new raw tokens x [B, n, D] of the current window (n_old tokens of it already cached) through
        all layers; if this completes the window, also its beacons, and fold the window into the memory."""
        c, (B, n_raw, _) = self.config, x.shape
        w, ratio = c.window_len, c.condensing_ratio
        complete = n_old + n_raw == w
        n_b = w // ratio if complete and ratio else 0
        if n_b:
            # the one learned <bcn> vector for every beacon; looked up through the module so that ZeRO-3, which
            # gathers a partitioned weight only inside its module's forward, hands it over whole
            beacon_ids = torch.zeros(B, n_b, dtype=torch.long, device=x.device)
            x = torch.cat([x, self.beacon_embed_tokens(beacon_ids).to(x.dtype)], 1)
        M = states[0].mem_k.shape[2]
        dev, hd = x.device, c.hidden_size // c.num_attention_heads
        pos_raw = M + torch.arange(n_old, n_old + n_raw, device=dev)
        pos_b = M + w + torch.arange(n_b, device=dev)
        pos_k = torch.cat([torch.arange(M + n_old + n_raw, device=dev), pos_b])
        rope_q = rope_cos_sin(torch.cat([pos_raw, pos_b]), hd, c.rope_theta, dtype=x.dtype)
        rope_k = rope_cos_sin(pos_k, hd, c.rope_theta, dtype=x.dtype)
        mask = window_mask(M, n_old, n_raw, n_b, ratio, dev)
        new_states = []
        for layer, s in zip(self.layers, states):
            x, (rk, rv), (bk, bv) = layer(x, n_raw, (s.mem_k, s.mem_v), (s.raw_k, s.raw_v), rope_q, rope_k, mask)
            rk, rv = torch.cat([s.raw_k, rk], 2), torch.cat([s.raw_v, rv], 2)
            if not complete:
                new_states.append(BeaconLayerState(s.mem_k, s.mem_v, rk, rv))
                continue
            add_k, add_v = (bk, bv) if ratio else (rk, rv)  # ratio 0: the raw activations are the memory
            keep = c.max_beacon_windows * (n_b if ratio else w)  # drop the oldest windows beyond the cap
            mk, mv = torch.cat([s.mem_k, add_k], 2)[:, :, -keep:], torch.cat([s.mem_v, add_v], 2)[:, :, -keep:]
            new_states.append(BeaconLayerState(mk, mv, rk[:, :, :0], rv[:, :, :0]))
        return x[:, :n_raw], new_states  # beacon positions never reach the output

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, cache=None, **kwargs):
        reject_padding(attention_mask, "beacon", "beacon memory")
        state: BeaconState | None = past_key_values if past_key_values is not None else cache
        if use_cache is None:
            use_cache = state is not None or not self.training
        x = self.embed_tokens(input_ids)
        pos = state.pos if state is not None else 0
        layers = state.layers if state is not None else self._empty_state(x.shape[0], x.dtype, x.device)
        w, T, start, outs = self.config.window_len, x.shape[1], 0, []
        while start < T:  # windows are processed one after the other (sec 2.2)
            n_old = (pos + start) % w
            n = min(w - n_old, T - start)
            out, layers = self._window_step(x[:, start : start + n], layers, n_old)
            outs.append(out)
            start += n
        h = self.norm(torch.cat(outs, 1))
        return BaseModelOutputWithPast(last_hidden_state=h, cache=BeaconState(pos + T, layers) if use_cache else None)


class BeaconForCausalLM(StreamingCausalLM, BeaconPreTrainedModel):
    decoder_class = BeaconModel


def _copy_beacon_projections(model: BeaconForCausalLM) -> None:
    for layer in model.model.layers:
        layer.self_attn.copy_regular_to_beacon()


register_backbone(
    "beacon",
    BeaconConfig,
    BeaconForCausalLM,
    graft=GraftSpec(
        closed_options={}, new_parameters=("beacon_",), span_key="window_len", after_copy=_copy_beacon_projections
    ),
)
