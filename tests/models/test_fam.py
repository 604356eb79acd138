"""Property tests of the `fam` backbone (TransformerFAM, Hwang et al. 2024)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import slm.models.fam as fam

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
                  num_attention_heads=4, block_len=5, memory_blocks=1, fam_len=3)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = fam.FamForCausalLM(fam.FamConfig(**kwargs)).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, so the tests exercise them
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model


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


@pytest.mark.parametrize("fam_init,memory_blocks", [("prompt", 1), ("prefix", 2), ("prompt", 0)])
@torch.no_grad()
def test_chunked_with_state_equals_whole(fam_init, memory_blocks):
    model = make_model(fam_init=fam_init, memory_blocks=memory_blocks)
    ids = tokens(2, 33)
    whole = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    splits = [[1] * 33, [3, 4, 8, 2, 16], [5] * 6 + [3], [7, 1, 9, 16]]
    splits += [random_split(33, gen, 11) for _ in range(2)]
    for sizes in splits:
        chunked, state = run_chunks(model, ids, sizes)
        assert state.position == 33
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
        q, k, v = (h @ W[p + f"{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(*t.shape[:2], H, D).transpose(1, 2) for t in (q, k, v))
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(x.shape) @ W[p + "o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g, u = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    return rms(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


@torch.no_grad()
def test_no_fam_one_block_equals_causal_attention():
    """Degenerate setting: fam_len = 0 and block_len >= input length."""
    ids = tokens(2, 24)
    model = make_model(fam_len=0, block_len=32)
    ref = reference_logits(model, ids)
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    with_fam = make_model(fam_len=3, block_len=32)  # same weights, plus the initial FAM to attend to
    assert (with_fam(ids).logits - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("fam_init", ["prompt", "prefix"])
@torch.no_grad()
def test_fam_carries_information_beyond_the_window(fam_init):
    """2 layers, 1 memory block of 5: without FAM token 0 reaches at most block 2 (receptive field
    depth x window); with FAM it reaches every later block."""
    ids = tokens(1, 35)
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % VOCAB
    bswa = make_model(fam_len=0, fam_init=fam_init)
    a, b = bswa(ids).logits, bswa(ids2).logits
    assert (a[:, 5:15] - b[:, 5:15]).abs().max().item() > 1e-6  # the memory block is read
    assert torch.equal(a[:, 15:], b[:, 15:])
    model = make_model(fam_init=fam_init)
    a, b = model(ids).logits, model(ids2).logits
    for blk in range(3, 7):
        assert (a[:, 5 * blk:5 * blk + 5] - b[:, 5 * blk:5 * blk + 5]).abs().max().item() > 1e-6, blk


@torch.no_grad()
def test_causality():
    model = make_model()
    ids = tokens(2, 32)
    for t in (0, 4, 5, 19, 31):
        ids2 = ids.clone()
        ids2[:, t] = (ids[:, t] + 7) % VOCAB
        a, b = model(ids).logits, model(ids2).logits
        if t:
            assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-12
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6


@pytest.mark.parametrize("fam_init", ["prompt", "prefix"])
@torch.no_grad()
def test_save_load_round_trip(tmp_path, fam_init):
    model = make_model(dtype=torch.float32, fam_init=fam_init, block_len=6, memory_blocks=2, fam_len=4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, fam.FamForCausalLM)
    assert (loaded.config.block_len, loaded.config.memory_blocks, loaded.config.fam_len) == (6, 2, 4)
    ids = tokens(2, 20)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = make_model(dtype=torch.float32, block_len=8).train()
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
    assert model.model.fam_prompt.grad is not None and model.model.fam_prompt.grad.abs().sum() > 0


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
    model = make_model(dtype=torch.float32, block_len=8, memory_blocks=2)

    def numel(state):
        return sum(t.numel() for t in state.tensors())

    s64, s512 = model(tokens(1, 64)).cache, model(tokens(1, 512)).cache
    assert numel(s64) == numel(s512) > 0
    more = tokens(1, 3, seed=5)  # now with a partial block held
    assert numel(model(more, past_key_values=s64).cache) == numel(model(more, past_key_values=s512).cache)


@torch.no_grad()
def test_greedy_generate_matches_recompute():
    model = make_model(dtype=torch.float32)
    prompt = tokens(1, 11)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False)
    ids = prompt
    for _ in range(9):  # no state: recompute everything each step
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@torch.no_grad()
def test_bf16_runs():
    ids = tokens(2, 20)
    out = make_model(dtype=torch.bfloat16)(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.cache.layers[0].fam.dtype == torch.bfloat16


@pytest.mark.parametrize("key,value", [("block_len", 0), ("memory_blocks", -1), ("fam_len", -2),
                                       ("fam_init", "zeros"), ("num_attention_heads", 5)])
def test_config_rejects_nonsense(key, value):
    kwargs = dict(hidden_size=32, num_attention_heads=4)
    kwargs[key] = value
    with pytest.raises(ValueError, match=key):
        fam.FamConfig(**kwargs)
