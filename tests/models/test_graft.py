"""Grafting infini, fam and beacon (and llama with RoPE scaling) onto tiny Llama, Mistral and Qwen2 checkpoints
built with transformers: at initialisation the graft equals the source within one segment (float64, 1e-5)."""

import pytest
import torch
from helpers import run_chunks, tokens
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import slm.models  # noqa: F401  (registers the backbones)
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.models import build_model
from slm.models.graft import SIZE_KEYS

VOCAB, SPAN = 64, 16
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
SOURCES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama_bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True}),  # biases on q, k, v and o
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 64}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"rope_theta": 1e6}),  # q/k/v biases, another rope theta
}
GRAFTS = {
    "infini": {"segment_len": SPAN},
    "fam": {"block_len": SPAN, "fam_len": 4},
    "beacon": {"window_len": SPAN, "condensing_ratio": 4},
}


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    """Each source architecture, tiny, random weights (biases and norms jittered so that copying them matters)."""
    root, out = tmp_path_factory.mktemp("sources"), {}
    for name, (config_cls, model_cls, extra) in SOURCES.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**SIZES, **extra)).double().eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def graft(path, backbone, **model):
    return build_model(ModelConfig(backbone=backbone, init_from=str(path), **model), VOCAB, seed=0).eval()


def source(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("backbone", list(GRAFTS))
@pytest.mark.parametrize("src", list(SOURCES))
@torch.no_grad()
def test_graft_equals_the_source_within_one_segment(source_dirs, src, backbone):
    base, model = source(source_dirs[src]), graft(source_dirs[src], backbone, options=GRAFTS[backbone])
    assert model.dtype == torch.float64 and model.config.model_type == f"slm_{backbone}"
    for length in (1, 7, SPAN):
        ids = tokens(VOCAB, 3, length, seed=length)
        assert (model(ids).logits - base(ids).logits).abs().max() < 1e-5, (src, backbone, length)
    ids = tokens(VOCAB, 2, SPAN, seed=5)  # streamed token by token with the state carried: the same
    streamed, _ = run_chunks(model, ids, [1] * SPAN)
    assert (streamed - base(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("backbone", list(GRAFTS))
def test_every_source_weight_is_copied_and_only_new_paths_are_new(source_dirs, backbone):
    base, model = source(source_dirs["qwen2"]), graft(source_dirs["qwen2"], backbone, options=GRAFTS[backbone])
    mine = model.state_dict()
    rename = slm.models.get_backbone(backbone).graft.rename
    for name, value in base.state_dict().items():
        assert torch.equal(mine[rename(name)], value), name
    new = sorted(set(mine) - {rename(n) for n in base.state_dict()})
    expected = {"infini": "self_attn.beta", "fam": "fam_", "beacon": "beacon_"}[backbone]
    assert new and all(expected in n for n in new), new
    if backbone == "beacon":  # the paper's init: the beacons' q/k/v/o (and biases) copy the regular ones
        attn = model.model.layers[1].self_attn
        assert torch.equal(attn.beacon_q_weight, attn.q_proj.weight) and torch.equal(
            attn.beacon_k_bias, attn.k_proj.bias
        )


@pytest.mark.parametrize("backbone", ["infini", "fam"])
def test_closed_gates_still_learn(source_dirs, backbone):
    """The new path starts shut yet its gate gets a gradient from inputs longer than one segment (the pitfall of a
    sigmoid gate pushed shut: it never moves)."""
    model = graft(source_dirs["llama"], backbone, options=GRAFTS[backbone]).train()
    ids = tokens(VOCAB, 2, 3 * SPAN, seed=3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    gates = [p for n, p in model.named_parameters() if n.endswith(("self_attn.beta", "fam_gate"))]
    assert len(gates) == 2 and all(float(g.detach().abs().max()) == 0.0 for g in gates)
    assert all(float(g.grad.abs().max()) > 0 for g in gates)


@torch.no_grad()
def test_past_one_segment_the_graft_is_the_new_backbone(source_dirs):
    base, model = source(source_dirs["llama"]), graft(source_dirs["llama"], "infini", options=GRAFTS["infini"])
    ids = tokens(VOCAB, 2, 3 * SPAN, seed=4)
    diff = (model(ids).logits - base(ids).logits).abs().amax(dim=(0, 2))
    assert diff[:SPAN].max() < 1e-5 and diff[SPAN:].max() > 1e-3  # later segments see only their own tokens + memory


@pytest.mark.parametrize("src", ["llama", "mistral", "qwen2"])
@torch.no_grad()
def test_llama_family_with_rope_scaling_keeps_every_weight(source_dirs, src):
    base = source(source_dirs[src])
    ids = tokens(VOCAB, 2, 40, seed=6)
    same = graft(source_dirs[src], "llama", rope_scaling={"rope_type": "linear", "factor": 1.0})
    assert type(same) is type(base) and (same(ids).logits - base(ids).logits).abs().max() < 1e-5
    yarn = graft(
        source_dirs[src],
        "llama",
        max_position_embeddings=1024,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    )
    assert yarn.config.rope_parameters["rope_type"] == "yarn" and yarn.config.max_position_embeddings == 1024
    assert yarn.config.rope_parameters["rope_theta"] == base.config.rope_parameters["rope_theta"]
    assert all(torch.equal(a, b) for a, b in zip(yarn.state_dict().values(), base.state_dict().values()))
    assert (yarn(ids).logits - base(ids).logits).abs().max() > 1e-4  # the scaling is in effect


def test_grafted_model_round_trips(source_dirs, tmp_path):
    model = graft(source_dirs["qwen2"], "fam", options=GRAFTS["fam"])
    model.save_pretrained(tmp_path / "g")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    ids = tokens(VOCAB, 2, 2 * SPAN + 3, seed=7)
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() < 1e-12
    assert again.config.fam_read == "gated" and again.config.attention_bias


def test_refusals_name_what_is_supported(source_dirs, tmp_path):
    with pytest.raises(
        SlmError, match=r"megalodon.*cannot be grafted.*CEMA.*graftable backbones: \['beacon', 'fam', 'infini'\]"
    ):
        graft(source_dirs["llama"], "megalodon")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        SlmError,
        match=r"model_type 'gpt2' cannot be grafted onto 'infini'; supported sources: "
        r"LlamaForCausalLM \(llama\), MistralForCausalLM \(mistral\), Qwen2ForCausalLM \(qwen2\)",
    ):
        graft(tmp_path / "gpt2", "infini")
    with pytest.raises(
        SlmError, match=r"model.hidden_size=64 disagrees with .* \(hidden_size=32\).*drop model.hidden_size"
    ):
        graft(source_dirs["llama"], "infini", hidden_size=64)
    with pytest.raises(SlmError, match=r"segment_len=128 exceeds the source's sliding_window=64"):
        graft(source_dirs["mistral"], "infini", options={"segment_len": 128})
    with pytest.raises(SlmError, match=r"model.rope_scaling: applies to backbone llama only"):
        graft(source_dirs["llama"], "beacon", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(SlmError, match=r"no config.json"):
        graft(tmp_path, "infini")


def test_size_keys_cover_the_shared_sizes():
    assert set(SIZE_KEYS) <= set(ModelConfig.model_fields)


def test_continuing_an_slm_checkpoint_applies_options(source_dirs, tmp_path):
    graft(source_dirs["llama"], "infini", options=GRAFTS["infini"]).save_pretrained(tmp_path / "inf")
    again = build_model(ModelConfig(init_from=str(tmp_path / "inf"), options={"segment_len": 8}), VOCAB)
    assert again.config.model_type == "slm_infini" and again.config.segment_len == 8
    with pytest.raises(SlmError, match=r"model.options.no_such_key: 'slm_infini' checkpoint .* has no config key"):
        build_model(ModelConfig(init_from=str(tmp_path / "inf"), options={"no_such_key": 1}), VOCAB)
