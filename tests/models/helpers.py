"""Helpers shared by the backbone tests in tests/models: tiny seeded models and token batches, chunked
streaming with a carried state, random chunkings, a from-scratch float64 causal-softmax Llama reference and
a float64 transformers Llama holding a model's shared weights, the save_pretrained / from_pretrained round
trip, a short training loop, the HF shifted loss, greedy decoding by recomputation, state sizes, and
infini's gate. Imported as `helpers` (pytest puts tests/models on sys.path)."""

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# ----------------------------------------------------------------------------- models and inputs


def make_tiny_model(model_cls, config, dtype, seed, jitter):
    """`model_cls(config)` built under `torch.manual_seed(seed)`, cast to dtype, in eval mode, with every
    parameter p for which `jitter(name)` is non-zero moved by `jitter(name) * randn_like(p)` (in named order)."""
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = jitter(name)
            if scale:
                p.add_(scale * torch.randn_like(p))
    return model


def norm_jitter(name):
    """A `jitter` for make_tiny_model: 0.1 on the RMSNorm weights (so the tests exercise them), 0 elsewhere."""
    return 0.1 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.0


def tokens(vocab, batch, length, seed=1):
    """A [batch, length] batch of token ids below vocab; seed=None draws from torch's global generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def set_infini_beta(model, value):
    """Every infini layer's memory/local gate beta set to value (-1e4: local attention only)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.beta.fill_(value)


def change_token(ids, pos, vocab, delta=1):
    """A copy of ids with the token at position pos (every row) shifted by delta, mod vocab."""
    out = ids.clone()
    out[:, pos] = (ids[:, pos] + delta) % vocab
    return out


# ----------------------------------------------------------------------------- streaming


def run_chunks(model, ids, sizes, **kwargs):
    """Feed ids in chunks of the given sizes, carrying the returned state; the concatenated logits and the
    final state. kwargs go to every forward call (e.g. use_cache=True)."""
    state, outs, start = None, [], 0
    for n in sizes:
        out = model(ids[:, start : start + n], past_key_values=state, **kwargs)
        state, start = out.cache, start + n
        outs.append(out.logits)
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), state


def chunked_diffs(model, ids, whole, splits, **kwargs):
    """For each chunking in splits: (sizes, final state, max |streamed logits - whole|)."""
    for sizes in splits:
        chunked, state = run_chunks(model, ids, sizes, **kwargs)
        yield sizes, state, (chunked - whole).abs().max().item()


def random_split(total, gen, max_chunk):
    """Chunk sizes summing to total, each drawn uniformly from 1..max_chunk (the last one clipped)."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(1, max_chunk + 1, (1,), generator=gen)), total - sum(sizes)))
    return sizes


def random_cuts(total, gen, cuts=5):
    """Chunk sizes summing to total, from `cuts` distinct random cut points in 1..total-1."""
    points = sorted(torch.randperm(total - 1, generator=gen)[:cuts].add(1).tolist())
    return [b - a for a, b in zip([0] + points, points + [total])]


def state_numel(state, tensors=lambda state: state.tensors()):
    """Total number of elements of the tensors a carried state holds (`tensors(state)` lists them)."""
    return sum(t.numel() for t in tensors(state))


# ----------------------------------------------------------------------------- references


def reference_logits(model, ids, attn_prefix="self_attn."):
    """Plain Llama-style decoder with full causal softmax attention, written from scratch (float64 weights of
    `model`; RoPE rotates the pairs (i, i + D/2)). attn_prefix: where q/k/v/o_proj sit inside a layer."""
    cfg, W = model.config, dict(model.named_parameters())
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    T = ids.shape[1]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    theta = cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"]  # transformers' Llama
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [B, H, T, D], rotate the pairs (i, i + D/2)
        a, b = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = W["model.embed_tokens.weight"][ids]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q, k, v = (h @ W[p + attn_prefix + f"{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(*t.shape[:2], H, D).transpose(1, 2) for t in (q, k, v))
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(x.shape) @ W[p + attn_prefix + "o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g, u = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    return rms(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


def llama_copy(model):
    """A float64 transformers Llama (sdpa) holding `model`'s shared weights (every weight but the beacon ones),
    with RoPE angles and RMSNorm patched to float64 (transformers computes them in float32), so that a
    comparison can be made at 1e-8."""
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


def shifted_loss(logits, labels):
    """The HF causal-LM loss written out: cross-entropy of logits[t] against labels[t + 1], -100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def greedy_recompute(model, prompt, steps):
    """Greedy decoding without a state: the whole sequence is recomputed for every new token."""
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


# ----------------------------------------------------------------------------- training and saving


def train_losses(model, ids, labels, steps, lr):
    """`steps` AdamW steps on model(ids, labels=labels).loss; the loss before each step (grads are left set)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_and_reload(model, path):
    """model.save_pretrained(path), then AutoModelForCausalLM.from_pretrained(path) in eval mode."""
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()
