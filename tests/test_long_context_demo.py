"""pipelines/long-context-demo.yaml (issue 12): it validates, warms every backbone up on short pass-key pairs from
scratch, continues each with the selective loss at one L, fine-tunes each on pass-key pairs (one per row, the
answer weighted), grafts the pretrained llama to infini and beacon, and keeps retrieval documents whole. Fast:
loads configs only, trains nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from slm.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "long-context-demo.yaml"
DRIVER = ROOT / "scripts" / "bench" / "long_context_demo.py"
SEGMENT_KEY = {"infini": "segment_len", "megalodon": "chunk_len", "fam": "block_len", "beacon": "window_len"}


@pytest.fixture(scope="module")
def loaded():
    return load_pipeline(PIPELINE)


BACKBONES = ("infini", "megalodon", "fam", "beacon", "llama")


def test_validates_and_names_every_backbone(loaded):
    import slm.models

    pipeline, stages, _ = loaded
    assert pipeline.name == "long-context-demo"
    assert [s.kind for s in stages[:3]] == ["demo_data", "reference", "score"]
    warmups = [s for s in stages if s.name.startswith("warmup_")]
    backbones = [s.cfg.model.backbone for s in warmups]
    assert sorted(backbones) == sorted(["infini", "megalodon", "fam", "beacon", "llama"])
    assert set(backbones) <= set(slm.models.BACKBONES)
    assert all(s.cfg.out_dir.startswith(pipeline.work_dir) for s in stages)


def test_warmup_then_selective_pretraining_at_one_length_with_segments_below_it(loaded):
    _, stages, _ = loaded
    by_name = {s.name: s for s in stages}
    score = by_name["score"]
    L = score.cfg.seq_len
    for b in BACKBONES:
        warmup, s = by_name[f"warmup_{b}"], by_name[f"pretrain_{b}"]
        assert warmup.cfg.model.init_from is None and warmup.cfg.corpus.path.endswith("retrieval_warmup.jsonl")
        assert s.cfg.model.init_from == f"{warmup.cfg.out_dir}/model", s.name  # pretraining continues the warm-up
        assert s.cfg.train.seq_len == L and warmup.cfg.train.seq_len <= L, s.name
        assert s.cfg.selection.enabled, s.name
        assert s.cfg.shards == score.cfg.out_dir
        backbone = warmup.cfg.model.backbone
        if backbone in SEGMENT_KEY:  # the recurrent memory must be used within a training row
            assert warmup.cfg.model.options[SEGMENT_KEY[backbone]] < L, s.name
        else:
            assert warmup.cfg.model.rope_scaling is None  # plain llama; scaling is applied at eval time


def test_corpus_has_retrieval_documents_kept_whole(loaded):
    _, stages, _ = loaded
    data = next(s for s in stages if s.kind == "demo_data")
    assert data.cfg.retrieval_share >= 0.3 and data.cfg.retrieval_finetune_documents >= 1000
    assert data.cfg.retrieval_warmup_documents >= 1000
    for s in stages:
        if s.kind in ("reference", "score", "finetune"):
            retrieval = "retrieval" in s.cfg.corpus.path
            # pass-key pairs one per row with the answer as the completion; the other corpora packed whole
            assert s.cfg.corpus.packing == ("single" if retrieval else "whole"), s.name
            if retrieval:
                assert s.cfg.corpus.completion_field == "completion" and s.cfg.train.prompt_loss_weight < 1


def test_every_model_is_fine_tuned_on_retrieval_and_the_llama_is_grafted(loaded):
    _, stages, _ = loaded
    by_name = {s.name: s for s in stages}
    finetune = [s for s in stages if s.kind == "finetune"]
    L = by_name["score"].cfg.seq_len
    for s in finetune:
        assert s.cfg.corpus.path.endswith("retrieval.jsonl") and s.cfg.train.seq_len == L, s.name
    continued = {s.cfg.model.init_from for s in finetune if s.name.startswith("finetune_")}
    assert continued == {f"{by_name[f'pretrain_{b}'].cfg.out_dir}/model" for b in BACKBONES}
    grafts = {s.cfg.model.backbone: s.cfg.model.init_from for s in finetune if s.name.startswith("graft_")}
    assert grafts == dict.fromkeys(("infini", "beacon"), f"{by_name['pretrain_llama'].cfg.out_dir}/model")


def test_override_reaches_only_the_named_stage():
    _, stages, _ = load_pipeline(PIPELINE, ["stages.pretrain_fam.train.max_steps=7"])
    steps = {s.name: s.cfg.train.max_steps for s in stages if s.kind in ("reference", "pretrain")}
    assert steps.pop("pretrain_fam") == 7
    assert all(v != 7 for v in steps.values()), steps


def test_driver_quick_overrides_validate(tmp_path):
    spec = importlib.util.spec_from_file_location("long_context_demo", DRIVER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Args:
        quick, pipeline, work_dir, set, rope = True, PIPELINE, tmp_path / "w", [], list(mod.ROPE_VARIANTS)

    _, stages, _ = load_pipeline(PIPELINE, mod.pipeline_overrides(Args))
    assert all(s.cfg.train.max_steps <= 20 for s in stages if s.kind in ("reference", "pretrain", "finetune"))
    labels = [v["label"] for v in mod.variants(stages, Args)]
    assert labels == [
        "infini",
        "megalodon",
        "fam",
        "beacon",
        "llama",
        "llama+yarn",
        "llama+dynamic",
        "llama->infini (graft)",
        "llama->beacon (graft)",
    ]
