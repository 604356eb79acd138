"""The one stage registry (slm.stages.registry): every kind has its config, its run and its CLI command; the
RULER, token-dynamics and LongRoPE-search kinds run in a pipeline (skipped on a rerun, redone when their model
changes) and render as Slurm jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml

from slm.cli import app, run_cli
from slm.config import STAGE_CONFIGS, PipelineConfig, validate
from slm.errors import SlmError
from slm.jobs import render_pipeline
from slm.pipeline import load_pipeline, run_pipeline
from slm.stages.registry import STAGES, get_stage

NEW_KINDS = ("ruler", "token_dynamics", "longrope_search")
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def cli_command(command: str):
    """The click command behind `slm a b` in the typer app."""
    node = typer.main.get_command(app)
    for word in command.split()[1:]:
        node = node.commands[word]
    return node


def test_every_kind_has_its_config_run_and_command():
    assert set(STAGES) == set(STAGE_CONFIGS)
    for kind, stage in STAGES.items():
        assert stage.config is STAGE_CONFIGS[kind] and "out_dir" in stage.config.model_fields
        assert callable(stage.runner), kind
        options = {o for p in cli_command(stage.command).params for o in p.opts}
        assert {"--config", "--set", "--force"} <= options, (kind, stage.command)  # what a rendered job calls
        assert stage.outputs and stage.skip


def test_an_unknown_kind_is_one_line_naming_the_kinds(tmp_path):
    raw = {"work_dir": str(tmp_path), "stages": [{"name": "r", "kind": "rular", "config": {}}]}
    with pytest.raises(SlmError, match=r"p.yaml: key 'stages.0.kind': .*unknown stage kind 'rular'.*'ruler'") as e:
        validate(raw, PipelineConfig, "p.yaml")
    assert "\n" not in str(e.value)
    with pytest.raises(SlmError, match="unknown stage kind 'nope'; expected one of"):
        get_stage("nope")


# --------------------------------------------------------------------------- fixtures: tiny checkpoints


@pytest.fixture(scope="module")
def models(tiny_demo, tmp_path_factory):
    """Two tiny random llama checkpoints (with the demo tokenizer), standing in for two steps of a run."""
    import torch
    from transformers import AutoTokenizer

    from slm.config import ModelConfig
    from slm.models import build_model

    root = tmp_path_factory.mktemp("stage_kinds")
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo.tokenizer)
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        d = root / f"step-{(i + 1) * 10:08d}"
        build_model(ModelConfig(backbone="llama", **TINY), vocab_size=len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return {"root": root, "checkpoints": dirs, "validation": tiny_demo.validation}


def stage_configs(models, w: str = "${work_dir}") -> dict[str, dict]:
    """A config of each new kind on the tiny checkpoints: seconds each on two CPU cores."""
    last = str(models["checkpoints"][-1])
    return {
        "ruler": {
            "out_dir": f"{w}/ruler",
            "model": last,
            "tasks": ["passkey"],
            "lengths": [96, 128],
            "samples_per_length": 2,
            "depths": [0.0, 1.0],
            "template_set": "compact",
            "chunk_len": 64,
            "max_new_tokens": 4,
            "device": "cpu",
        },
        "token_dynamics": {
            "out_dir": f"{w}/dynamics",
            "checkpoints": [str(c) for c in models["checkpoints"]],
            "validation": {"path": str(models["validation"])},
            "seq_len": 32,
            "max_rows": 4,
            "device": "cpu",
        },
        "longrope_search": {
            "out_dir": f"{w}/longrope",
            "model": last,
            "data": {"path": str(models["validation"])},
            "original_len": 32,
            "target_len": 64,
            "samples": 1,
            "population": 4,
            "generations": 1,
        },
    }


def write_pipeline(path: Path, work_dir: Path, configs: dict[str, dict], kinds=NEW_KINDS) -> Path:
    stages = [{"name": k, "kind": k, "config": configs[k]} for k in kinds]
    path.write_text(yaml.safe_dump({"name": "kinds", "work_dir": str(work_dir), "stages": stages}))
    return path


# --------------------------------------------------------------------------- slm jobs render, one kind at a time


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_jobs_render_the_kind(kind, models, tmp_path):
    """The job runs the kind's CLI command on its frozen config, which validates as the stage's config; the stage
    waits for the one whose output it reads; it is a single task with no launcher, no array, no preemption trap."""
    configs = stage_configs(models)
    configs["data"] = {"out_dir": "${work_dir}/data", "hq_documents": 10, "train_documents": 10}
    pipeline = {
        "name": "kinds",
        "work_dir": str(tmp_path / "w"),
        "stages": [
            {"name": "data", "kind": "demo_data", "config": configs["data"]},
            {"name": "first", "kind": "demo_data", "config": {"out_dir": "${work_dir}/first"}},
            {"name": kind, "kind": kind, "config": configs[kind]},
        ],
    }
    # the stage reads the demo stage's output: it must wait for `data`, not for the stage just before it
    if kind == "token_dynamics":
        pipeline["stages"][2]["config"]["validation"] = {"path": "${work_dir}/data/validation.jsonl"}
    else:
        key = "data" if kind == "longrope_search" else "tokenizer"
        pipeline["stages"][2]["config"][key] = (
            {"path": "${work_dir}/data/validation.jsonl"} if key == "data" else "${work_dir}/data/tokenizer"
        )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    jobs = {j.stage: j for j in render_pipeline(path, tmp_path / "jobs")}
    job = jobs[kind]
    script = job.script.read_text()
    assert f"{get_stage(kind).command} --config {job.config}" in script
    assert job.depends_on == ["data"] and job.array is None
    assert "srun" not in script and "SLM_STOP_FILE" not in script and "--nodes=1" in script
    frozen = yaml.safe_load(job.config.read_text())
    assert get_stage(kind).config.model_validate(frozen) == load_pipeline(path)[1][2].cfg
    assert frozen["out_dir"] == str(tmp_path / "w" / configs[kind]["out_dir"].split("/")[-1])


# --------------------------------------------------------------------------- slm run: run, skip, redo


def test_pipeline_runs_the_kinds_and_skips_them_on_a_rerun(models, tmp_path, capsys):
    work = tmp_path / "w"
    path = write_pipeline(tmp_path / "p.yaml", work, stage_configs(models))
    first = run_pipeline(path)
    assert [(s["stage"], s["status"]) for s in first] == [(k, "complete") for k in NEW_KINDS]
    records = {
        k: json.loads((work / d / "stage.json").read_text())
        for k, d in (("ruler", "ruler"), ("token_dynamics", "dynamics"), ("longrope_search", "longrope"))
    }
    results = json.loads((work / "ruler" / "results.json").read_text())
    assert records["ruler"]["metrics"]["effective_length"] == results["effective_length"]["length"]
    assert records["ruler"]["metrics"]["samples"] == 4 and (work / "ruler" / "heatmap_passkey.png").is_file()
    dyn = json.loads((work / "dynamics" / "token_dynamics.json").read_text())
    assert records["token_dynamics"]["metrics"]["tokens"] == dyn["tokens"] > 0
    assert sum(records["token_dynamics"]["metrics"]["shares"].values()) == pytest.approx(1.0)
    factors = yaml.safe_load((work / "longrope" / "rope_scaling.yaml").read_text())
    search = json.loads((work / "longrope" / "search.json").read_text())
    assert factors["rope_type"] == "longrope" and factors["long_factor"] == search["long_factor"]
    assert records["longrope_search"]["metrics"]["perplexity"] == search["perplexity"]
    said = capsys.readouterr().err
    assert "ruler: samples=4" in said and "perplexity=" in said and "shares.H->L=" in said  # the key figures

    # a rerun skips every stage and leaves its record as it was
    again = run_pipeline(path)
    assert [s["status"] for s in again] == ["skipped"] * 3
    assert "complete for this config and model; skipping" in capsys.readouterr().err.replace("\n", "")
    for k, d in (("ruler", "ruler"), ("token_dynamics", "dynamics"), ("longrope_search", "longrope")):
        assert json.loads((work / d / "stage.json").read_text()) == records[k]

    # the factors file gone: searched again, the rest skipped
    (work / "longrope" / "rope_scaling.yaml").unlink()
    assert [s["status"] for s in run_pipeline(path)] == ["skipped", "skipped", "complete"]
    assert "rope_scaling.yaml is gone; searching again" in capsys.readouterr().err.replace("\n", "")  # rich wraps
    assert (work / "longrope" / "rope_scaling.yaml").is_file()

    # the model rewritten: every stage that reads it is redone
    weights = models["checkpoints"][-1] / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # same bytes, a new file: what retraining into the same folder looks like
    assert [s["status"] for s in run_pipeline(path)] == ["complete"] * 3
    assert capsys.readouterr().err.replace("\n", "").count("an input changed since") == 3
    assert json.loads((work / "ruler" / "results.json").read_text())["scores"] == results["scores"]


def test_longrope_command_writes_the_factors_at_out_and_skips_a_rerun(models, tmp_path, capsys):
    cfg = stage_configs(models)["longrope_search"]
    flags = ["--model", cfg["model"], "--data", cfg["data"]["path"], "--original-len", "32", "--target-len", "64"]
    flags += ["--samples", "1", "--population", "4", "--generations", "1", "--out", str(tmp_path / "f.json")]
    assert run_cli(["analyze", "longrope-search", *flags]) == 0
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'f.json'}" in out.out
    assert json.loads((tmp_path / "f.json").read_text())["rope_type"] == "longrope"
    record = json.loads((tmp_path / "f" / "stage.json").read_text())  # the stage's folder: --out without suffix
    assert record["kind"] == "longrope_search" and record["config"]["factors_file"] == "../f.json"
    assert run_cli(["analyze", "longrope-search", *flags]) == 0
    assert "skipping" in capsys.readouterr().err
    assert run_cli(["analyze", "longrope-search", "--out", str(tmp_path / "g.yaml")]) == 2
    assert "key 'model': required key is missing" in capsys.readouterr().err


def test_jobs_status_does_not_import_submit():
    """submit reads Slurm states through status; status reads jobs.json through slm.jobs.record, not submit."""
    import ast

    import slm.jobs.status

    tree = ast.parse(Path(slm.jobs.status.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "slm.jobs.record" in imported and "slm.jobs.submit" not in imported
