"""`slm run`: the built-in demo recipe, shrunk with --set, runs, skips on rerun, redoes with --from and when a stage it
read was rebuilt; the rebuilt-input rule itself (`slm.stages.reads`)."""

from __future__ import annotations

import json
import os

import pytest

from slm.errors import SlmError
from slm.pipeline import builtin_recipe, load_pipeline, run_pipeline

TRAIN = ["seq_len=64", "micro_batch_size=4", "max_steps=4", "eval_every=2", "eval_batches=2", "checkpoint_every=4"]
MODEL = ["hidden_size=32", "num_layers=2", "num_heads=2", "intermediate_size=64"]


def shrink(work_dir) -> list[str]:
    """--set overrides that turn the demo recipe into a seconds-long pipeline."""
    sets = [f"work_dir={work_dir}"]
    sets += [
        f"stages.data.{k}"
        for k in (
            "hq_documents=80",
            "train_documents=80",
            "validation_documents=10",
            "questions=4",
            "vocab_size=320",
            "retrieval_chars=300",
        )
    ]
    for stage in ("reference", "pretrain_slm", "pretrain_clm"):
        sets += [f"stages.{stage}.train.{t}" for t in TRAIN] + [f"stages.{stage}.model.{m}" for m in MODEL]
    for stage in ("pretrain_slm", "pretrain_clm"):
        sets.append(f"stages.{stage}.model.options.segment_len=16")
    sets += ["stages.score.seq_len=64", "stages.score.documents_per_shard=40"]
    for stage in ("eval_reference", "eval_slm", "eval_clm"):
        sets += [f"stages.{stage}.seq_len=64", f"stages.{stage}.max_batches=2", f"stages.{stage}.max_new_tokens=4"]
    return sets


def test_demo_recipe_is_valid_and_ships_with_the_package():
    pipeline, stages, path = load_pipeline(None)
    assert path == builtin_recipe() and pipeline.name == "demo"
    assert [s.kind for s in stages] == [
        "demo_data",
        "reference",
        "score",
        "pretrain",
        "pretrain",
        "eval",
        "eval",
        "eval",
    ]
    assert all(s.cfg.out_dir.startswith(pipeline.work_dir) for s in stages)
    slm_stage = next(s for s in stages if s.name == "pretrain_slm")
    assert slm_stage.cfg.model.backbone != "llama"  # the student is a long-context backbone


def test_run_skip_redo_from_and_rebuilt_inputs(tmp_path, capsys):
    sets = shrink(tmp_path / "w")
    summary = run_pipeline(None, sets)
    assert [r["status"] for r in summary] == ["complete"] * 8
    assert json.loads((tmp_path / "w/eval_slm/results.json").read_text())["selection"]["ratio"] == 0.6
    again = run_pipeline(None, sets)
    assert [r["status"] for r in again] == ["skipped"] * 8
    redo = run_pipeline(None, sets, from_stage="eval_slm")
    assert [r["status"] for r in redo] == ["skipped"] * 6 + ["complete"] * 2

    # the shards rebuilt on their own (`slm score --force`): what reads them, and what reads that, runs again;
    # the reference and its evaluation, which read neither, stay
    from slm.stages import score

    stages = {s.name: s for s in load_pipeline(None, sets)[1]}
    score.run(stages["score"].cfg, force=True)
    capsys.readouterr()
    rebuilt = run_pipeline(None, sets)
    assert {r["stage"]: r["status"] for r in rebuilt} == {
        "data": "skipped",
        "reference": "skipped",
        "score": "skipped",
        "pretrain_slm": "complete",
        "pretrain_clm": "complete",
        "eval_reference": "skipped",
        "eval_slm": "complete",
        "eval_clm": "complete",
    }
    said = " ".join(capsys.readouterr().err.split())  # the console (stderr) wraps long lines
    shards, slm_out = stages["score"].cfg.out_dir, stages["pretrain_slm"].cfg.out_dir
    assert f"pretrain: {os.path.abspath(shards)} finished again since {slm_out} was written; running it again" in said
    assert [r["status"] for r in run_pipeline(None, sets)] == ["skipped"] * 8


def test_rebuilt_input_by_hash_and_for_older_records_by_time(tmp_path):
    from slm.stages.reads import rebuilt_upstream, upstream_stages

    up, down = tmp_path / "up", tmp_path / "down"
    up.mkdir(), down.mkdir()
    (up / "stage.json").write_text('{"run_id": "a"}')
    (up / "train.jsonl").write_text("")
    cfg = {"out_dir": str(down), "corpus": {"path": str(up / "train.jsonl")}, "model": "llama", "own": str(down / "x")}
    now = upstream_stages(cfg, down, tmp_path)
    assert list(now) == [str(up)]  # "llama" names no file; the stage's own out_dir is not an input
    record = {"fingerprints": {"upstream": now}}
    (down / "stage.json").write_text(json.dumps(record))
    assert rebuilt_upstream(record, down / "stage.json", upstream_stages(cfg, down, tmp_path)) == []
    (up / "stage.json").write_text('{"run_id": "b"}')  # rebuilt
    assert rebuilt_upstream(record, down / "stage.json", upstream_stages(cfg, down, tmp_path)) == [str(up)]

    # a record from before the hashes: compared by the stage.json files' times
    old = {"fingerprints": {}}
    os.utime(up / "stage.json", ns=(1, 10**18))
    os.utime(down / "stage.json", ns=(1, 2 * 10**18))
    assert rebuilt_upstream(old, down / "stage.json", upstream_stages(cfg, down, tmp_path)) == []
    os.utime(up / "stage.json", ns=(1, 3 * 10**18))
    assert rebuilt_upstream(old, down / "stage.json", upstream_stages(cfg, down, tmp_path)) == [str(up)]


def test_pipeline_errors_name_the_stage_and_key(tmp_path):
    with pytest.raises(SlmError, match=r"stages\[reference\].config: key 'train.max_stepz': unknown key"):
        load_pipeline(None, [f"work_dir={tmp_path}", "stages.reference.train.max_stepz=3"])
    with pytest.raises(SlmError, match=r"no stage named 'nope'"):
        load_pipeline(None, ["stages.nope.x=1"])
    with pytest.raises(SlmError, match=r"--from 'nope': no such stage"):
        run_pipeline(None, [f"work_dir={tmp_path}"], from_stage="nope")


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from slm.config import ReferenceConfig, load_config

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "pipelines").glob("*.yaml")):
        load_pipeline(path)
    for path in sorted((root / "reference").glob("*.yaml")):
        load_config(path, ReferenceConfig)


def test_override_of_one_stage_leaves_anchor_sharing_stages_alone(tmp_path):
    # eval_slm and eval_clm share the &eval anchor in the demo recipe
    _, stages, _ = load_pipeline(None, [f"work_dir={tmp_path}", "stages.eval_slm.validation.max_documents=7"])
    by_name = {s.name: s.cfg for s in stages}
    assert by_name["eval_slm"].validation.max_documents == 7
    assert (
        by_name["eval_clm"].validation.max_documents is None
        and by_name["eval_reference"].validation.max_documents is None
    )


def test_the_demo_recipe_in_pipelines_is_the_one_in_the_package():
    """pipelines/demo.yaml (for readers of the repository) and slm/recipes/demo.yaml (what `slm run` runs after a
    plain install) are one recipe: byte for byte the same file."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert (repo / "pipelines" / "demo.yaml").read_bytes() == builtin_recipe().read_bytes()
