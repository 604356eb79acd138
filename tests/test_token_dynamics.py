"""`slm analyze token-dynamics`: RHO-1's token categories over checkpoints (rule, fit, end to end,
DeepSpeed weights)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from slm.analysis.token_dynamics import (
    CATEGORIES,
    HH,
    HL,
    LH,
    LL,
    TokenDynamicsConfig,
    classify_tokens,
    fit_loss_lines,
    load_deepspeed_weights,
    token_dynamics,
    token_dynamics_command,
)
from slm.errors import SlmError

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "ran", "to", "red", "big", "house", "and", "seven", "blue"]
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
SEQ_LEN = 24


# --------------------------------------------------------------------------- the rule


def test_each_category_is_produced_exactly():
    # columns: tokens; rows: 5 checkpoints. L_mean (mean last loss) = (1 + 5 + 6 + 0.5) / 4 = 3.125
    losses = np.array(
        [
            [5.0, 1.0, 6.0, 0.5],
            [4.0, 2.0, 6.1, 0.6],
            [3.0, 3.0, 5.9, 0.4],
            [2.0, 4.0, 6.0, 0.5],
            [1.0, 5.0, 6.0, 0.5],
        ]
    )
    cats = classify_tokens(losses)
    assert cats.codes.tolist() == [HL, LH, HH, LL]
    assert [CATEGORIES[c] for c in cats.codes] == ["H->L", "L->H", "H->H", "L->L"]
    assert cats.level == pytest.approx(3.125) and "last checkpoint" in cats.level_source
    np.testing.assert_allclose(cats.delta[:2], [-4.0, 4.0])  # fitted end - fitted start = slope * n


def test_rule_uses_the_fitted_change_and_the_thresholds():
    losses = np.array(
        [
            # exactly +0.5 over the run (binary-exact): not above change=0.5 -> stays; last 0.5 <= level 1 -> L->L
            [0.0, 0.125, 0.25, 0.375, 0.5],
            # fluctuating high loss (RHO-1 Fig. 2b): l_n - l_0 = -6, but the fitted line is flat -> H->H, not H->L
            [8.0, 0.0, 5.0, 12.0, 2.0],
            # last loss equal to the level counts as low (paper: l_n <= L_mean)
            [1.0, 1.0, 1.0, 1.0, 1.0],
            # a drop of 0.6 over the run: H->L at change=0.5, stable (high) at change=1
            [3.6, 3.45, 3.3, 3.15, 3.0],
        ]
    ).T
    cats = classify_tokens(losses, change=0.5, level=1.0)
    assert cats.codes.tolist() == [LL, HH, LL, HL]
    assert cats.level_source == "config" and cats.level == 1.0
    assert classify_tokens(losses, change=1.0, level=1.0).codes.tolist()[3] == HH
    assert cats.delta[1] == pytest.approx(0.0, abs=1e-12) and cats.delta[3] == pytest.approx(-0.6)


def test_slope_fit_equals_numpy_polyfit():
    rng = np.random.default_rng(0)
    losses = rng.normal(3, 1, size=(7, 50))
    for x in (None, np.array([0, 10, 20, 35, 50, 80, 100], dtype=float)):
        slope, intercept = fit_loss_lines(losses, x)
        ref = np.polyfit(np.arange(7) if x is None else x, losses, 1)
        np.testing.assert_allclose(slope, ref[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(intercept, ref[1], rtol=1e-10, atol=1e-12)
    # dL with x = 0..n is slope * n (appendix: L_end - L_start = a n)
    np.testing.assert_allclose(classify_tokens(losses).delta, fit_loss_lines(losses)[0] * 6)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer, a validation jsonl and three tiny llama checkpoints with different weights."""
    from slm.config import ModelConfig
    from slm.data.tokenizer import train_bpe_tokenizer
    from slm.models import build_model

    root = tmp_path_factory.mktemp("td")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(300)]
    tok_dir = root / "tok"
    tokenizer = train_bpe_tokenizer(texts, 300, tok_dir)
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:60]))
    ckpts = []
    for i in range(3):
        torch.manual_seed(100 + i)
        model = build_model(ModelConfig(backbone="llama", **TINY), vocab_size=len(tokenizer))
        d = root / f"step-{(i + 1) * 10:08d}"
        model.save_pretrained(str(d))
        if i == 0:
            tokenizer.save_pretrained(str(d))  # the first checkpoint's tokenizer is the default
        ckpts.append(d)
    return {"root": root, "tok": tok_dir, "val": val, "ckpts": ckpts, "tokenizer": tokenizer}


def _cfg(tiny, out, **kw) -> TokenDynamicsConfig:
    base = dict(out_dir=str(out), validation={"path": str(tiny["val"])}, seq_len=SEQ_LEN, max_rows=6, batch_size=4)
    return TokenDynamicsConfig.model_validate({**base, **kw})


# --------------------------------------------------------------------------- end to end


def test_end_to_end_on_hf_checkpoints(tiny, tmp_path):
    from slm.models import load_pretrained
    from slm.models.token_loss import token_losses

    out = tmp_path / "td"
    res = token_dynamics(_cfg(tiny, out, checkpoints=[str(p) for p in tiny["ckpts"]]), progress=False)
    assert (out / "token_dynamics.json").is_file() and (out / "token_dynamics.png").stat().st_size > 5000
    saved = json.loads((out / "token_dynamics.json").read_text())
    assert saved["tokens"] == res["tokens"] > 0
    shares = [c["share"] for c in saved["categories"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert sum(c["count"] for c in saved["categories"].values()) == saved["tokens"]
    assert [c["step"] for c in saved["checkpoints"]] == [10, 20, 30]
    assert saved["thresholds"]["change"] == 0.2 and len(saved["mean_loss"]) == 3

    # the stored losses are token_losses of each checkpoint on the same rows; categories follow the rule
    arrays = np.load(out / "token_losses.npz")
    ids = torch.from_numpy(arrays["input_ids"]).long()
    with torch.inference_mode():
        ref = token_losses(load_pretrained(str(tiny["ckpts"][1])).float().eval(), ids).numpy()
    valid = arrays["valid"]
    np.testing.assert_allclose(arrays["losses"][1][valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert not valid[:, 0].any()
    cats = classify_tokens(arrays["losses"][:, valid])
    np.testing.assert_array_equal(arrays["categories"][valid], cats.codes)
    assert (arrays["categories"][~valid] == -1).all()


def test_command_flags_and_errors(tiny, tmp_path):
    ck = [str(p) for p in tiny["ckpts"]]
    res = token_dynamics_command(
        ck[:2],
        validation=str(tiny["val"]),
        out=str(tmp_path / "cmd"),
        seq_len=SEQ_LEN,
        max_rows=2,
        tokenizer=str(tiny["tok"]),
        change_threshold=0.5,
        level_threshold=4.0,
        progress=False,
    )
    assert res["thresholds"] == {"change": 0.5, "level": 4.0, "level_source": "config"}
    assert res["rows"] == 2 and len(res["checkpoints"]) == 2

    def one_line_error(match, **kw):
        with pytest.raises(SlmError, match=match) as e:
            token_dynamics_command(validation=str(tiny["val"]), out=str(tmp_path / "err"), progress=False, **kw)
        assert "\n" not in str(e.value)

    one_line_error("at least 2 checkpoints", checkpoints=ck[:1])
    one_line_error("directory not found", checkpoints=[ck[0], str(tmp_path / "missing")])
    one_line_error("directory not found", run_dir=str(tmp_path / "no-run"))
    one_line_error("exactly one of checkpoints", checkpoints=ck, run_dir=str(tmp_path))
    one_line_error("exactly one of checkpoints")
    one_line_error("not a Hugging Face model directory", checkpoints=[ck[0], str(tiny["tok"])])
    one_line_error("at least 2 checkpoints.*keep_checkpoints", run_dir=str(tmp_path))
    one_line_error("holds no tokenizer", checkpoints=[ck[1], ck[2]])


# --------------------------------------------------------------------------- DeepSpeed checkpoints


def _ds_checkpoint(run, step: int, state_dict: dict):
    from slm.training.checkpoint import MARKER, tag_for
    from slm.utils.io import atomic_write_json

    tag = run / "checkpoints" / tag_for(step)
    tag.mkdir(parents=True)
    torch.save(
        {
            "module": state_dict,
            "ds_config": {"zero_optimization": {"stage": 2}},
            "mp_world_size": 1,
            "step": step,  # slm's client state: plain values (RNG states live in rng-rankNNNNN.pt as tensors)
        },
        tag / "mp_rank_00_model_states.pt",
    )
    atomic_write_json(tag / MARKER, {"step": step, "fingerprints": {}})
    return tag


def test_deepspeed_weights_give_the_source_logits_and_run_dir_end_to_end(tiny, tmp_path):
    from slm.models import load_pretrained

    run = tmp_path / "run"
    sources = [load_pretrained(str(p)).float().eval() for p in tiny["ckpts"]]
    tags = [_ds_checkpoint(run, 10 * (i + 1), m.state_dict()) for i, m in enumerate(sources)]
    # the run's export: another set of weights, same architecture, with the tokenizer
    torch.manual_seed(7)
    export = type(sources[0])(sources[0].config)
    export.save_pretrained(str(run / "model"))
    tiny["tokenizer"].save_pretrained(str(run / "model"))

    ids = torch.randint(0, sources[0].config.vocab_size, (2, 16))
    model = load_pretrained(str(run / "model")).float().eval()
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits, sources[1](ids).logits)
        load_deepspeed_weights(model, tags[1])
        torch.testing.assert_close(model(ids).logits, sources[1](ids).logits, rtol=0, atol=0)

    res = token_dynamics(_cfg(tiny, tmp_path / "td-run", run_dir=str(run), x_axis="step"), progress=False)
    direct = token_dynamics(
        _cfg(tiny, tmp_path / "td-hf", checkpoints=[str(p) for p in tiny["ckpts"]], x_axis="step"), progress=False
    )
    assert [c["step"] for c in res["checkpoints"]] == [10, 20, 30] and res["x"] == [10.0, 20.0, 30.0]
    assert {k: c["count"] for k, c in res["categories"].items()} == {
        k: c["count"] for k, c in direct["categories"].items()
    }
    np.testing.assert_allclose(res["mean_loss"], direct["mean_loss"], rtol=1e-6)


def test_deepspeed_errors(tiny, tmp_path):
    from slm.models import load_pretrained

    model = load_pretrained(str(tiny["ckpts"][0])).float()
    z3 = tmp_path / "z3"
    z3.mkdir()
    torch.save({"module": {}}, z3 / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(SlmError, match="ZeRO-3"):
        load_deepspeed_weights(model, z3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlmError, match="no DeepSpeed model states"):
        load_deepspeed_weights(model, empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = dict(model.state_dict())
    sd.pop("model.norm.weight")
    torch.save({"module": sd}, bad / "mp_rank_00_model_states.pt")
    with pytest.raises(SlmError, match="missing.*model.norm.weight"):
        load_deepspeed_weights(model, bad)
    # a run without its export names what is missing
    run = tmp_path / "run"
    _ds_checkpoint(run, 1, model.state_dict())
    _ds_checkpoint(run, 2, model.state_dict())
    with pytest.raises(SlmError, match="architecture .*no Hugging Face model"):
        token_dynamics(_cfg(tiny, tmp_path / "o", run_dir=str(run)), progress=False)
