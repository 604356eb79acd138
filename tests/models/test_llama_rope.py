"""`llama` backbone RoPE scaling (transformers rope_parameters) and the LongRoPE factor search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import save_and_reload, tokens
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import slm  # noqa: F401  (registers the backbones)
from slm.analysis.longrope import (
    _crossover,
    _mutate,
    is_monotone,
    load_rope_scaling,
    longrope_attention_factor,
    longrope_perplexity,
    longrope_rope_scaling,
    ntk_factors,
    perplexity,
    save_rope_scaling,
    search_longrope_factors,
    yarn_factors,
)
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.models import build_model

VOCAB = 97
ORIG = 32  # "pretraining" length
TARGET = 128  # extended length, s = 4
SIZES = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
HEAD_DIM = 16
N_PAIRS = HEAD_DIM // 2
THETA = 10000.0
BASE_INV_FREQ = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))


def make(rope_scaling=None, max_pos=TARGET, like=None):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SIZES, max_position_embeddings=max_pos, rope_scaling=rope_scaling), VOCAB)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model.eval()


def ids(n=2, length=TARGET, seed=0):
    return tokens(VOCAB, n, length, seed=seed)


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def longrope(long_factor, **extra):
    return {
        "rope_type": "longrope",
        "long_factor": list(map(float, long_factor)),
        "short_factor": [1.0] * N_PAIRS,
        "original_max_position_embeddings": ORIG,
        **extra,
    }


# --------------------------------------------------------------------------- (a) every rope type builds and is honoured

S = TARGET / ORIG
NTK = ntk_factors(S, N_PAIRS)
CASES = {
    # name: (rope_scaling, max_position_embeddings, expected inv_freq at TARGET tokens, expected attention scaling)
    "linear": ({"rope_type": "linear", "factor": S}, TARGET, BASE_INV_FREQ / S, 1.0),
    # dynamic NTK: max_position_embeddings is the pretraining length; base grows past it
    "dynamic": (
        {"rope_type": "dynamic", "factor": S},
        ORIG,
        # base' = base * (factor * T / L - (factor - 1))^(d / (d - 2)) at T = TARGET tokens
        1.0
        / (THETA * (S * TARGET / ORIG - (S - 1)) ** (HEAD_DIM / (HEAD_DIM - 2)))
        ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM),
        1.0,
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": S, "original_max_position_embeddings": ORIG},
        TARGET,
        BASE_INV_FREQ / torch.tensor(yarn_factors(S, N_PAIRS, THETA, ORIG), dtype=torch.float),
        0.1 * math.log(S) + 1.0,
    ),
    "longrope": (
        longrope(NTK),
        TARGET,
        BASE_INV_FREQ / torch.tensor(NTK, dtype=torch.float),
        math.sqrt(1 + math.log(S) / math.log(ORIG)),
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": S,
            "original_max_position_embeddings": ORIG,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        TARGET,
        None,
        1.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rope_type_builds_runs_and_is_honoured(name):
    scaling, max_pos, want_inv_freq, want_scaling = CASES[name]
    default = make(max_pos=max_pos)
    model = make(scaling, max_pos=max_pos, like=default)
    assert model.config.rope_parameters["rope_type"] == name
    x = ids()
    out = logits(model, x)
    assert out.shape == (2, TARGET, VOCAB) and torch.isfinite(out).all()
    rotary = model.model.rotary_emb
    if want_inv_freq is not None:  # the frequencies transformers uses at TARGET tokens are the published ones
        torch.testing.assert_close(rotary.inv_freq, want_inv_freq.float(), rtol=1e-5, atol=0)
    assert rotary.attention_scaling == pytest.approx(want_scaling, rel=1e-12)
    assert not torch.allclose(out, logits(default, x))  # the scaling changes the model at TARGET tokens


@pytest.mark.parametrize(
    "scaling, needle",
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "linear", "factr": 2.0, "factor": 2.0}, "factr"),
        ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
        ({k: v for k, v in longrope([1.0] * N_PAIRS).items() if k != "short_factor"}, "short_factor"),
        ({k: v for k, v in longrope([1.0] * N_PAIRS).items() if k != "long_factor"}, "long_factor"),
        ({**longrope([1.0] * N_PAIRS), "long_factor": [1.0] * (N_PAIRS - 1)}, "long_factor"),
        ({**longrope([1.0] * N_PAIRS), "short_factor": [1.0, -1.0] * (N_PAIRS // 2)}, "short_factor"),
        (
            {k: v for k, v in longrope([1.0] * N_PAIRS).items() if k != "original_max_position_embeddings"},
            "original_max_position_embeddings",
        ),
        ({**longrope([1.0] * N_PAIRS), "original_max_position_embeddings": 4 * TARGET}, "exceeds"),
        ({"rope_type": "linear", "factor": 0.5}, "factor"),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, "rope_theta"),
        ({"rope_type": "ntk"}, "rope_type"),
    ],
)
def test_bad_rope_scaling_names_the_key(scaling, needle):
    with pytest.raises(SlmError, match=needle):
        make(scaling)


def test_legacy_type_key_is_rope_type():
    assert make({"type": "linear", "factor": 2.0}).config.rope_parameters["rope_type"] == "linear"


# ------------------------------------------------------------------ (b) LongRoPE with unit factors is plain RoPE


def test_longrope_unit_factors_reproduce_default_rope_exactly():
    default = make()
    unit = make(longrope([1.0] * N_PAIRS, attention_factor=1.0), like=default)
    for length in (ORIG // 2, ORIG, TARGET):  # short factors, boundary, long factors (beyond ORIG)
        x = ids(length=length, seed=length)
        assert torch.equal(logits(unit, x), logits(default, x)), length


# --------------------------------------------------------------------------- (c) the default attention factor


@pytest.mark.parametrize("orig, target", [(32, 128), (4096, 131072), (2048, 2048 * 3)])
def test_longrope_default_attention_factor_is_published_formula(orig, target):
    published = math.sqrt(1 + math.log(target / orig) / math.log(orig))
    assert longrope_attention_factor(target / orig, orig) == pytest.approx(published, rel=1e-15)
    # slm path (factor filled in explicitly) and plain transformers path (factor from max_position_embeddings)
    params = {
        "rope_type": "longrope",
        "long_factor": [2.0] * N_PAIRS,
        "short_factor": [1.0] * N_PAIRS,
        "original_max_position_embeddings": orig,
    }
    model = make(dict(params), max_pos=target)
    raw = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=VOCAB,
        intermediate_size=64,
        max_position_embeddings=target,
        rope_parameters=dict(params),
    )
    for config in (model.config, raw):
        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=target)
        assert attention_factor == pytest.approx(published, rel=1e-12)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(published, rel=1e-12)


# --------------------------------------------------------------------------- (d) the search


def test_search_operators_keep_monotone_constraint():
    rng = np.random.default_rng(0)
    parents = [np.full(N_PAIRS, 4.0), NTK, np.sort(rng.uniform(1, 5, N_PAIRS))]
    for _ in range(300):
        a, b = parents[rng.integers(3)], parents[rng.integers(3)]
        child = _mutate(a, rng, 0.5, 1.0, 5.0, 0.01)
        assert is_monotone(child) and child.min() >= 1.0 and child.max() <= 5.0
        cross = _crossover(a, b, rng)
        assert cross is None or is_monotone(cross)


def test_search_longrope_factors():
    model = make(max_pos=ORIG)
    x = ids(n=2)
    before = logits(model, x)
    kwargs = dict(population=8, generations=3, mutation_prob=0.3, progress=False, batch_size=2)
    result = search_longrope_factors(model, x, ORIG, TARGET, seed=0, **kwargs)

    f = result["long_factor"]
    assert len(f) == N_PAIRS and is_monotone(f)
    assert min(f) >= 1.0 and max(f) <= 1.25 * S + 1e-9
    assert result["short_factor"] == [1.0] * N_PAIRS
    assert result["attention_factor"] == pytest.approx(longrope_attention_factor(S, ORIG))
    h = result["history"]
    assert len(h) == 3 + 1 and all(b <= a for a, b in zip(h, h[1:])) and h[-1] == result["perplexity"]

    # PI is in the initial population, so the best is no worse than PI (measured independently here)
    pi = longrope_perplexity(model, x, [S] * N_PAIRS, ORIG, batch_size=2)
    assert result["baselines"]["pi"] == pytest.approx(pi, rel=1e-12)
    assert result["perplexity"] <= pi

    # the model is left as it was: same rotary module, same logits
    assert torch.equal(logits(model, x), before)

    # deterministic for a seed
    assert search_longrope_factors(model, x, ORIG, TARGET, seed=0, **kwargs) == result

    # the reported perplexity is what a model configured with the factors computes
    deployed = make(longrope_rope_scaling(result), max_pos=TARGET, like=model)
    assert perplexity(deployed, x) == pytest.approx(result["perplexity"], rel=1e-6)


def test_search_result_files_load_into_model_config(tmp_path):
    result = {
        "long_factor": NTK.tolist(),
        "short_factor": [1.0] * N_PAIRS,
        "original_max_position_embeddings": ORIG,
        "target_len": TARGET,
        "scale": S,
        "attention_factor": longrope_attention_factor(S, ORIG),
        "perplexity": 12.5,
        "baselines": {"pi": 13.0},
    }
    for name in ("rope.json", "rope.yaml"):
        loaded = load_rope_scaling(save_rope_scaling(result, tmp_path / name))
        assert loaded == longrope_rope_scaling(result)
        ModelConfig(**SIZES, max_position_embeddings=TARGET, rope_scaling=loaded)  # validates
        make(loaded)  # builds


def test_search_rejects_bad_arguments():
    model = make(max_pos=ORIG)
    with pytest.raises(SlmError, match="target_len"):
        search_longrope_factors(model, ids(length=ORIG), ORIG, ORIG, progress=False)
    with pytest.raises(SlmError, match="target_len"):
        search_longrope_factors(model, ids(length=64), ORIG, TARGET, progress=False)
    with pytest.raises(SlmError, match="population"):
        search_longrope_factors(model, ids(), ORIG, TARGET, population=3, progress=False)


# --------------------------------------------------------------------------- (e) save / load


def test_longrope_model_save_load_round_trip(tmp_path):
    model = make(longrope(NTK))  # no explicit attention_factor: transformers' default applies
    loaded = save_and_reload(model, tmp_path)
    assert loaded.config.rope_parameters == model.config.rope_parameters
    for length in (ORIG // 2, TARGET):
        x = ids(length=length, seed=length)
        assert torch.equal(logits(loaded, x), logits(model, x)), length
