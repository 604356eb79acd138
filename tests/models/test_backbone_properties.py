"""The properties every registered backbone has (DESIGN.md, Backbones), one suite parametrised over
`slm.models.BACKBONES`: processing in chunks with the carried state equals processing at once; the
degenerate setting equals plain causal attention (or, for CEMA, MEGA's real damped EMA); causality;
the save/load round trip; training lowers the loss; the HF label convention; a bounded state (the
streaming backbones); greedy generation equals recomputation; bf16 forward and backward; configs
refuse bad values.

A backbone's tiny-model recipe and inputs are its `Case` in backbone_cases.py, its degenerate
setting an entry in DEGENERATE below. A backbone that registers without them fails
`test_every_registered_backbone_has_a_case` by name; with them it runs every test here. What only
one backbone has (Infini memory, FAM, beacon masks, CEMA kernels) is tested in test_<backbone>.py.
"""

import math

import pytest
import torch
from backbone_cases import CASES
from helpers import (
    change_token,
    chunked_diffs,
    greedy_recompute,
    llama_copy,
    reference_logits,
    run_chunks,
    save_and_reload,
    set_infini_beta,
    shifted_loss,
    state_numel,
    tokens,
    train_losses,
)

import slm.models.megalodon as meg
from slm.models import BACKBONES

NAMES = [name for name in sorted(BACKBONES) if name in CASES]


def _vid(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


# ----------------------------------------------------------------------------- degenerate settings


@torch.no_grad()
def _llama_equals_the_reference():
    """llama is plain causal attention: it equals the from-scratch float64 reference (to 1e-6, as
    transformers computes the RoPE angles in float32)."""
    case = CASES["llama"]
    ids = tokens(case.vocab, 2, 24)
    model = case.make()
    assert (model(ids).logits - reference_logits(model, ids)).abs().max().item() < 1e-6


@torch.no_grad()
def _infini_local_gate_one_segment():
    """Gate forced local (beta = -1e4) and segment_len >= input length."""
    case = CASES["infini"]
    ids = tokens(case.vocab, 2, 24)
    model = case.make(segment_len=32)
    set_infini_beta(model, -1e4)
    ref = reference_logits(model, ids, attn_prefix="self_attn.")
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    set_infini_beta(model, 0.0)  # gate open: the (empty) memory takes half the weight, so it must differ
    assert (model(ids).logits - ref).abs().max().item() > 1e-3


@torch.no_grad()
def _fam_no_fam_one_block():
    """fam_len = 0 and block_len >= input length."""
    case = CASES["fam"]
    ids = tokens(case.vocab, 2, 24)
    model = case.make(fam_len=0, block_len=32)
    ref = reference_logits(model, ids, attn_prefix="")  # fam keeps q/k/v/o_proj directly on the layer
    assert (model(ids).logits - ref).abs().max().item() < 1e-10
    with_fam = case.make(fam_len=3, block_len=32)  # same weights, plus the initial FAM to attend to
    assert (with_fam(ids).logits - ref).abs().max().item() > 1e-4


@torch.no_grad()
def _beacon_ratio_zero_equals_llama(window_len):
    """condensing_ratio 0: no beacons. With window_len >= length this is plain causal attention; with smaller
    windows too (the raw KV of <= max_beacon_windows previous windows is kept, at the same positions)."""
    case = CASES["beacon"]
    model = case.make(condensing_ratio=0, window_len=window_len)
    llama = llama_copy(model)
    ids = tokens(case.vocab, 2, 29, seed=5)
    ours, ref = model(ids).logits, llama(ids).logits
    assert (ours - ref).abs().max() < 1e-8
    streamed, _ = run_chunks(model, ids, [5, 1, 11, 12], use_cache=True)
    assert (streamed - ref).abs().max() < 1e-8


@torch.no_grad()
def _megalodon_cema_theta_zero_is_mega_damped_ema():
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


# backbone -> (its degenerate-setting check, the keyword arguments of each run)
DEGENERATE = {
    "llama": (_llama_equals_the_reference, ({},)),
    "infini": (_infini_local_gate_one_segment, ({},)),
    "fam": (_fam_no_fam_one_block, ({},)),
    "beacon": (_beacon_ratio_zero_equals_llama, (dict(window_len=64), dict(window_len=8))),
    "megalodon": (_megalodon_cema_theta_zero_is_mega_damped_ema, ({},)),
}


# ----------------------------------------------------------------------------- the registry is covered


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_has_a_case(name):
    assert name in CASES, (
        f"backbone {name!r} is registered but tests/models/backbone_cases.py has no Case for it: "
        "add its tiny-model recipe there to run every property test on it"
    )
    assert name in DEGENERATE, f"backbone {name!r} has no degenerate-setting check in DEGENERATE ({__file__})"


def test_every_case_is_a_registered_backbone():
    assert set(CASES) <= set(BACKBONES) and set(DEGENERATE) <= set(BACKBONES), (set(CASES), set(BACKBONES))


# ----------------------------------------------------------------------------- the properties


@pytest.mark.parametrize(
    "name,overrides",
    [pytest.param(n, v, id=f"{n}-{_vid(v)}") for n in NAMES for v in CASES[n].stream.variants],
)
@torch.no_grad()
def test_chunked_with_state_equals_whole(name, overrides):
    case = CASES[name]
    s = case.stream
    model = case.make(**overrides)
    s.prepare(model)
    ids = tokens(case.vocab, 2, s.length)
    whole = model(ids).logits
    assert whole.shape == (2, s.length, case.vocab)
    gen = torch.Generator().manual_seed(s.gen_seed)
    splits = [list(sizes) for sizes in s.splits] + [s.random(gen) for _ in range(2)]
    for sizes, state, diff in chunked_diffs(model, ids, whole, splits, **s.kwargs):
        assert case.position(state) == s.length
        assert diff < s.tol, (sizes, diff)


@pytest.mark.parametrize(
    "name,kwargs",
    [pytest.param(n, kw, id=f"{n}-{_vid(kw)}") for n in NAMES if n in DEGENERATE for kw in DEGENERATE[n][1]],
)
def test_degenerate_setting_equals_plain_attention(name, kwargs):
    check, _ = DEGENERATE[name]
    check(**kwargs)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_causality(name):
    case = CASES[name]
    c = case.causality
    model = case.make()
    c.prepare(model)
    ids = tokens(case.vocab, c.batch, c.length, seed=c.seed)
    for t in c.positions:
        ids2 = change_token(ids, t, case.vocab, delta=c.delta)
        a, b = model(ids).logits, model(ids2).logits
        if c.before_tol == 0:
            assert torch.equal(a[:, :t], b[:, :t]), t
        elif t:
            assert (a[:, :t] - b[:, :t]).abs().max().item() < c.before_tol, t
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6, t


@pytest.mark.parametrize(
    "name,overrides,expected",
    [pytest.param(n, o, e, id=f"{n}-{_vid(o)}") for n in NAMES for o, e in CASES[n].round_trip.variants],
)
@torch.no_grad()
def test_save_load_round_trip(name, overrides, expected, tmp_path):
    case = CASES[name]
    r = case.round_trip
    model = case.make(dtype=torch.float32, **overrides)
    r.prepare(model)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded, BACKBONES[name].model_cls)
    assert {key: getattr(loaded.config, key) for key in expected} == expected
    if r.tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = tokens(case.vocab, 2, r.length, seed=r.seed)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("name", NAMES)
def test_training_reduces_loss(name):
    case = CASES[name]
    tr = case.training
    torch.manual_seed(0)
    model = case.make(dtype=torch.float32, **tr.overrides) if tr.jittered else case.init(**tr.overrides)
    model.train()
    ids = tokens(case.vocab, 4, tr.length, seed=tr.seed)
    labels = ids.clone()
    labels[:, : tr.masked_prefix] = -100
    out = model(ids, labels=labels)
    assert torch.allclose(out.loss, shifted_loss(out.logits, labels))
    assert (out.cache is not None) == case.state_in_training
    losses = train_losses(model, ids, labels, steps=tr.steps, lr=tr.lr)
    assert all(math.isfinite(x) for x in losses)
    if tr.ratio is not None:
        assert losses[-1] < tr.ratio * losses[0], losses
    if tr.margin is not None:
        assert losses[-1] < losses[0] - tr.margin, losses
    if tr.trained is not None:
        grad = tr.trained(model).grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_labels_follow_hf_convention(name):
    case = CASES[name]
    model = case.make(dtype=torch.float32)
    ids = tokens(case.vocab, 2, 16)
    labels = ids.clone()
    labels[0, 3:7] = -100
    out = model(ids, labels=labels)
    assert torch.allclose(out.loss, shifted_loss(out.logits, labels))


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_state_is_bounded(name):
    case = CASES[name]
    b = case.bounded
    if isinstance(b, str):
        pytest.skip(f"{name}: {b}")
    model = case.make(dtype=b.dtype, **b.overrides)

    def state_after(ids, state=None):
        return model(ids, past_key_values=state, **b.kwargs).cache

    s64 = state_after(tokens(case.vocab, 1, 64, seed=b.seed))
    s512 = state_after(tokens(case.vocab, 1, 512, seed=b.seed))
    assert case.position(s512) == 512
    assert state_numel(s64, b.tensors) == state_numel(s512, b.tensors) > 0
    b.extra(model, s512)
    more = tokens(case.vocab, 1, 3, seed=5)  # now with a partial segment / block / window / chunk held
    assert state_numel(state_after(more, s64), b.tensors) == state_numel(state_after(more, s512), b.tensors)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_greedy_generate_matches_recompute(name):
    case = CASES[name]
    g = case.generate
    model = case.make(dtype=g.dtype)
    g.prepare(model)
    prompt = tokens(case.vocab, 1, 11, seed=g.seed)
    out = model.generate(prompt, max_new_tokens=g.steps, do_sample=False, **g.kwargs)
    assert torch.equal(out, greedy_recompute(model, prompt, g.steps))  # no state: recompute everything each step


@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward_backward_is_finite(name):
    torch.manual_seed(0)
    case = CASES[name]
    model = case.init().to(torch.bfloat16).train()
    ids = tokens(case.vocab, 2, 20, seed=None)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "name,key,value",
    [pytest.param(n, k, v, id=f"{n}-{k}={v}") for n in NAMES for k, v in CASES[n].rejects],
)
def test_config_rejects_bad_values(name, key, value):
    with pytest.raises(ValueError, match=key):
        CASES[name].config(**{key: value})
