"""pipelines/long-context-demo.yaml (issue 12): it validates, trains every backbone at one L with the selective
loss, fine-tunes each on whole retrieval documents, grafts the pretrained llama to infini and beacon, and keeps
retrieval documents whole. Fast: loads configs only, trains nothing."""

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


def test_validates_and_names_every_backbone(loaded):
    import slm.models

    pipeline, stages, _ = loaded
    assert pipeline.name == "long-context-demo"
    assert [s.kind for s in stages[:3]] == ["demo_data", "reference", "score"]
    pretrain = [s for s in stages if s.kind == "pretrain"]
    backbones = [s.cfg.model.backbone for s in pretrain]
    assert sorted(backbones) == sorted(["infini", "megalodon", "fam", "beacon", "llama"])
    assert set(backbones) <= set(slm.models.BACKBONES)
    assert all(s.cfg.out_dir.startswith(pipeline.work_dir) for s in stages)


def test_one_training_length_selective_loss_and_segments_below_it(loaded):
    _, stages, _ = loaded
    score = next(s for s in stages if s.kind == "score")
    pretrain = [s for s in stages if s.kind == "pretrain"]
    L = score.cfg.seq_len
    for s in pretrain:
        assert s.cfg.train.seq_len == L, s.name
        assert s.cfg.selection.enabled, s.name
        assert s.cfg.shards == score.cfg.out_dir
        backbone = s.cfg.model.backbone
        if backbone in SEGMENT_KEY:  # the recurrent memory must be used within a training row
            assert s.cfg.model.options[SEGMENT_KEY[backbone]] < L, s.name
        else:
            assert s.cfg.model.rope_scaling is None  # plain llama; scaling is applied at eval time


def test_corpus_has_retrieval_documents_kept_whole(loaded):
    _, stages, _ = loaded
    data = next(s for s in stages if s.kind == "demo_data")
    assert data.cfg.retrieval_share >= 0.3 and data.cfg.retrieval_finetune_documents >= 1000
    assert all(s.cfg.corpus.packing == "whole" for s in stages if s.kind in ("reference", "score", "finetune"))


def test_every_model_is_fine_tuned_on_retrieval_and_the_llama_is_grafted(loaded):
    _, stages, _ = loaded
    by_name = {s.name: s for s in stages}
    finetune = [s for s in stages if s.kind == "finetune"]
    L = by_name["score"].cfg.seq_len
    for s in finetune:
        assert s.cfg.corpus.path.endswith("retrieval.jsonl") and s.cfg.train.seq_len == L, s.name
    continued = {s.cfg.model.init_from for s in finetune if s.name.startswith("finetune_")}
    assert continued == {
        f"{by_name[f'pretrain_{b}'].cfg.out_dir}/model" for b in ("infini", "megalodon", "fam", "beacon", "llama")
    }
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
