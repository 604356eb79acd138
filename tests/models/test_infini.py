"""Property tests of the `infini` backbone (Infini-attention, Munkhdalai et al. 2024)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import slm.models.infini as infini

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threading only adds sync overhead (badly so on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(dtype=torch.float64, seed=0, **overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, segment_len=8, memory_update="delta")
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = infini.InfiniForCausalLM(infini.InfiniConfig(**kwargs)).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms and gates, so the tests exercise them
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model


def set_beta(model, value):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.beta.fill_(value)


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_chunks(model, ids, sizes):
    state, outs, start = None, [], 0
    for n in sizes:
        out = model(ids[:, start:start + n], past_key_values=state)
        state, start = out.cache, start + n
        outs.append(out.logits)
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), state


def random_split(total, gen, max_chunk):
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(1, max_chunk + 1, (1,), generator=gen)), total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("update", ["delta", "linear"])
@torch.no_grad()
def test_chunked_with_state_equals_whole(update):
    model = make_model(memory_update=update)
    set_beta(model, 0.3)
    ids = tokens(2, 45)
    whole = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    splits = [[1] * 45, [3, 5, 8, 13, 16], [8] * 5 + [5], [7, 1, 9, 20, 8]]
    splits += [random_split(45, gen, 12) for _ in range(2)]
    for sizes in splits:
        chunked, state = run_chunks(model, ids, sizes)
        assert state.position == 45
        diff = (chunked - whole).abs().max().item()
        assert diff < 1e-10, (sizes, diff)


def reference_logits(model, ids):
    """Plain Llama-style decoder with full causal softmax attention, written from scratch."""
    cfg, W = model.config, dict(model.named_parameters())
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    T = ids.shape[1]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    inv = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [B, H, T, D], rotate the pairs (i, i + D/2)
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = W["model.embed_tokens.weight"][ids]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q, k, v = (h @ W[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(*t.shape[:2], H, D).transpose(1, 2) for t in (q, k, v))
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(x.shape) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g, u = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    return rms(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


@torch.no_grad()
def test_local_gate_one_segment_equals_causal_attention():
    """Degenerate setting: gate forced local (beta = -1e4) and segment_len >= input length."""
    ids = tokens(2, 24)
    model = make_model(segment_len=32)
    set_beta(model, -1e4)
    ref = reference_logits(model, ids)
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    set_beta(model, 0.0)  # gate open: the (empty) memory takes half the weight, so it must differ
    assert (model(ids).logits - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("update", ["delta", "linear"])
@torch.no_grad()
def test_memory_carries_information_across_segments(update):
    """Segments only see each other through the memory: with the gate shut, changing token 0 leaves
    every later segment untouched; with the gate open it changes them (the memory is read)."""
    model = make_model(memory_update=update)
    ids = tokens(1, 32)
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % VOCAB
    set_beta(model, -1e4)
    assert torch.equal(model(ids).logits[:, 8:], model(ids2).logits[:, 8:])
    set_beta(model, 0.0)
    a, b = model(ids).logits, model(ids2).logits
    for seg in range(1, 4):
        assert (a[:, 8 * seg:8 * seg + 8] - b[:, 8 * seg:8 * seg + 8]).abs().max().item() > 1e-6, seg


@torch.no_grad()
def test_causality():
    model = make_model()
    set_beta(model, 0.5)
    ids = tokens(2, 32)
    for t in (0, 5, 8, 19, 31):
        ids2 = ids.clone()
        ids2[:, t] = (ids[:, t] + 7) % VOCAB
        a, b = model(ids).logits, model(ids2).logits
        if t:
            assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-12
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = make_model(dtype=torch.float32, memory_update="linear", segment_len=6, gate_init=0.7)
    set_beta(model, 0.25)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, infini.InfiniForCausalLM)
    assert loaded.config.segment_len == 6 and loaded.config.memory_update == "linear"
    ids = tokens(2, 20)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = make_model(dtype=torch.float32).train()
    ids = tokens(4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.model.layers[0].self_attn.beta.grad is not None  # the gate is trained


@torch.no_grad()
def test_labels_follow_hf_convention():
    model = make_model(dtype=torch.float32)
    ids = tokens(2, 16)
    labels = ids.clone()
    labels[0, 3:7] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)


@torch.no_grad()
def test_state_is_bounded():
    model = make_model(dtype=torch.float32)

    def numel(state):
        return sum(t.numel() for t in state.tensors())

    s64, s512 = model(tokens(1, 64)).cache, model(tokens(1, 512)).cache
    assert numel(s64) == numel(s512) > 0
    more = tokens(1, 3, seed=5)  # now with a partial segment held
    assert numel(model(more, past_key_values=s64).cache) == numel(model(more, past_key_values=s512).cache)


@torch.no_grad()
def test_greedy_generate_matches_recompute():
    model = make_model(dtype=torch.float32)
    set_beta(model, 0.0)
    prompt = tokens(1, 11)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False)
    ids = prompt
    for _ in range(9):  # no state: recompute everything each step
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("key,value", [("segment_len", 0), ("memory_update", "none"), ("memory_eps", 0.0),
                                       ("num_attention_heads", 5)])
def test_config_rejects_nonsense(key, value):
    kwargs = dict(hidden_size=32, num_attention_heads=4)
    kwargs[key] = value
    with pytest.raises(ValueError, match=key):
        infini.InfiniConfig(**kwargs)


@torch.no_grad()
def test_bf16_keeps_memory_in_fp32():
    ids = tokens(2, 20)
    model = make_model(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.cache.layers[0].M.dtype == torch.float32 and torch.isfinite(out.logits).all()
    out = model.to(torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.cache.layers[1].M.dtype == torch.float32 and out.cache.layers[1].z.dtype == torch.float32
