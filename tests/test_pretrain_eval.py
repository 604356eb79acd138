"""`slm pretrain` on shards with the selective loss (every backbone), and `slm eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slm.config import EvalConfig, PretrainConfig
from slm.errors import SlmError
from slm.stages import evaluate, pretrain
from slm.training.metrics import read_metrics
from tests.conftest import TINY_MODEL, TINY_TRAIN

SEGMENT_OPTIONS = {
    "llama": {},
    "infini": {"segment_len": 16},
    "megalodon": {"chunk_len": 16, "cema_ndim": 4, "norm_num_groups": 4},
    "fam": {"block_len": 16, "fam_len": 4},
    "beacon": {"window_len": 16, "condensing_ratio": 4},
}


def pretrain_cfg(scored, tiny_demo, tmp_path, backbone="llama", name="pt", selection=None, **train):
    return PretrainConfig.model_validate(
        dict(
            out_dir=str(tmp_path / name),
            shards=scored["shards"],
            validation={"path": str(tiny_demo.validation)},
            model={**TINY_MODEL, "backbone": backbone, "options": SEGMENT_OPTIONS[backbone]},
            train={**TINY_TRAIN, **train},
            selection=selection or {"mode": "batch", "ratio": 0.6},
        )
    )


@pytest.mark.parametrize("backbone", list(SEGMENT_OPTIONS))
def test_every_backbone_trains_with_the_selective_loss(scored, tiny_demo, tmp_path, backbone):
    cfg = pretrain_cfg(
        scored,
        tiny_demo,
        tmp_path,
        backbone,
        max_steps=10,
        eval_every=5,
        checkpoint_every=10,
        optim=dict(lr=1e-2, warmup_steps=2),
    )
    record = pretrain.run(cfg)
    logs = read_metrics(record["outputs"]["metrics"])
    heldout = [m["heldout_loss"] for m in logs if m.get("heldout_loss") is not None]
    assert heldout[-1] < logs[0]["loss"] - 0.3, (backbone, logs[0]["loss"], heldout)
    for m in logs:  # the kept fraction matches the ratio within one token of the micro-batch
        assert abs(m["kept_fraction"] - 0.6) <= 1.0 / m["valid_tokens"] + 1e-9
        assert {"loss_kept", "loss_dropped", "excess_kept", "excess_dropped", "noise_dropped", "kept_clean"} <= m.keys()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(record["outputs"]["model"]).config.model_type.endswith(backbone)


def test_disabled_selection_is_the_plain_causal_lm_baseline(scored, tiny_demo, tmp_path):
    base = pretrain.run(
        pretrain_cfg(scored, tiny_demo, tmp_path, name="clm", selection={"enabled": False}, max_steps=3)
    )
    ratio_one = pretrain.run(
        pretrain_cfg(scored, tiny_demo, tmp_path, name="r1", selection={"ratio": 1.0}, max_steps=3)
    )
    a, b = read_metrics(base["outputs"]["metrics"]), read_metrics(ratio_one["outputs"]["metrics"])
    assert [m["kept_fraction"] for m in a] == [1.0] * 3
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)


def test_selection_stats_read_once_per_interval_equal_the_per_step_reads(scored, tiny_demo, tmp_path):
    """The selective step's extras are device tensors read once per log_every steps: every step's line holds the
    kept fraction, excess and loss of kept and dropped tokens, noise measures and loss of log_every=1."""
    runs = [
        read_metrics(
            pretrain.run(
                pretrain_cfg(scored, tiny_demo, tmp_path, name=f"log{n}", max_steps=5, grad_accum=2, log_every=n)
            )["outputs"]["metrics"]
        )
        for n in (1, 3)
    ]
    every, batched = runs
    assert [m["step"] for m in batched] == [m["step"] for m in every] == [1, 2, 3, 4, 5]
    timing = {"tokens_per_s", "selection_ms"}
    for a, b in zip(every, batched):
        assert set(a) - timing == set(b) - timing and {"kept_fraction", "excess_kept", "noise_dropped"} <= set(a)
        for k in set(a) - timing:
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k


def test_pretrain_resume_equals_uninterrupted(scored, tiny_demo, tmp_path):
    from safetensors.torch import load_file

    whole = pretrain.run(pretrain_cfg(scored, tiny_demo, tmp_path, name="whole", max_steps=5, checkpoint_every=2))
    cfg = pretrain_cfg(scored, tiny_demo, tmp_path, name="killed", max_steps=5, checkpoint_every=2)
    pretrain.run(cfg, stop_after=3)
    resumed = pretrain.run(cfg)
    assert resumed["metrics"]["resumed_from"] == 2
    a, b = (
        load_file(f"{whole['outputs']['model']}/model.safetensors"),
        load_file(f"{resumed['outputs']['model']}/model.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_shards_that_do_not_match_are_refused(scored, tiny_demo, tmp_path):
    with pytest.raises(SlmError, match=r"shards have seq_len 64, train.seq_len is 32"):
        pretrain.run(pretrain_cfg(scored, tiny_demo, tmp_path, seq_len=32))
    from slm.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["a completely different tokenizer corpus"] * 40, 300, tmp_path / "tok")
    cfg = pretrain_cfg(scored, tiny_demo, tmp_path, name="t").model_copy(update={"tokenizer": str(tmp_path / "tok")})
    with pytest.raises(SlmError, match=r"shards were scored with tokenizer sha256 \w+, tokenizer .*tok' has \w+"):
        pretrain.run(cfg)
    with pytest.raises(SlmError, match="selection.mode=static needs base_loss"):
        pretrain.run(pretrain_cfg(scored, tiny_demo, tmp_path, name="s", selection={"mode": "static"}))


def test_eval_reports_loss_accuracy_and_selection_quality(scored, tiny_demo, tmp_path):
    cfg = EvalConfig(
        out_dir=str(tmp_path / "eval"),
        model=scored["reference"],
        validation={"path": str(tiny_demo.validation)},
        questions=str(tiny_demo.questions),
        shards=scored["shards"],
        seq_len=64,
        max_batches=3,
        max_new_tokens=12,
    )
    record = evaluate.run(cfg)
    results = json.loads(Path(f"{cfg.out_dir}/results.json").read_text())
    answers = json.loads(Path(f"{cfg.out_dir}/answers.json").read_text())
    assert results["domain_accuracy"] == pytest.approx(np.mean([a["correct"] for a in answers]))
    assert len(answers) == 10 and all(a["correct"] == (a["prediction"] == a["answer"]) for a in answers)
    sel = results["selection"]
    assert 0 <= sel["noise_dropped"] <= 1 and 0 <= sel["kept_clean"] <= 1 and 0.2 < sel["noise_share"] < 0.6
    assert record["metrics"]["heldout_loss"] == pytest.approx(results["heldout_loss"])

    # by kind of noise: the same selection, split; its totals must agree with the noise/clean measures
    with_kinds = evaluate.run(
        EvalConfig.model_validate(
            {
                **cfg.model_dump(),
                "out_dir": str(tmp_path / "eval_kinds"),
                "noise_corpus": {"path": str(tiny_demo.train), "noise_field": "noise_spans"},
            }
        )
    )
    sel_k = with_kinds["metrics"]["selection"]
    by_kind = sel_k.pop("by_kind")
    assert sel_k == sel
    from slm.data.demo import NOISE_KINDS

    assert set(by_kind) <= {"clean", *NOISE_KINDS} and "clean" in by_kind and "wrong_answer" in by_kind
    assert sum(k["share"] for k in by_kind.values()) == pytest.approx(1.0)
    noise = {n: k for n, k in by_kind.items() if n != "clean"}
    noise_share = sum(k["share"] for k in noise.values())
    assert sum(k["share"] * (1 - k["kept"]) for k in noise.values()) / noise_share == pytest.approx(
        sel["noise_dropped"]
    )
    kept = sum(k["share"] * k["kept"] for k in by_kind.values())
    assert by_kind["clean"]["share"] * by_kind["clean"]["kept"] / kept == pytest.approx(sel["kept_clean"])
    assert all(k["excess"] == pytest.approx(k["model_loss"] - k["ref_loss"]) for k in by_kind.values())


def test_noise_kind_codes_match_the_shards_noise_column(scored, tiny_demo, tmp_path):
    from slm.analysis.noise_kinds import noise_kind_codes
    from slm.config import CorpusConfig
    from slm.data.demo import NOISE_KINDS
    from slm.data.tokenizer import load_tokenizer
    from slm.shards import ShardSet

    shards, tok = ShardSet(scored["shards"]), load_tokenizer(tiny_demo.tokenizer)
    corpus = CorpusConfig(path=str(tiny_demo.train), noise_field="noise_spans")
    n = int(shards.offsets[2]) + 3  # across a shard boundary
    codes, names = noise_kind_codes(shards, corpus, tok, n)
    assert names == sorted(NOISE_KINDS) and codes.shape == (n, shards.seq_len)
    assert np.array_equal(codes > 0, shards.rows(np.arange(n), ("noise",))["noise"] > 0)
    assert set(np.unique(codes)) == set(range(len(names) + 1))

    rows = [json.loads(line) for line in tiny_demo.train.read_text().splitlines()]
    rows[0]["text"] = "Something else entirely. " + rows[0]["text"]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SlmError, match=r"shard-00000.arrow: its tokens differ from corpus.path .*other.jsonl"):
        noise_kind_codes(shards, CorpusConfig(path=str(other), noise_field="noise_spans"), tok, n)

    for r in rows:
        del r["noise_kinds"]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        SlmError, match=r"corpus.path .*other.jsonl': no field 'noise_kinds' \(the kind of each noise span\)"
    ):
        noise_kind_codes(shards, CorpusConfig(path=str(other), noise_field="noise_spans"), tok, n)
    with pytest.raises(SlmError, match=r"noise kinds need corpus.noise_field"):
        noise_kind_codes(shards, CorpusConfig(path=str(tiny_demo.train)), tok, n)


def test_extract_answer():
    from slm.data.demo import ANSWER_PATTERN
    from slm.evaluation.heldout import extract_answer

    assert extract_answer(" 7 + 5 = 12. The answer is 12.", ANSWER_PATTERN) == "12"
    assert extract_answer(" 7 + 5 = 12.", ANSWER_PATTERN) == ""
    assert extract_answer("  42\nmore", None) == "42"
