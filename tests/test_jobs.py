"""`slm jobs`: rendering (arrays, launchers, dependencies, resource errors), resubmits that only
hand over unfinished work, status without accounting; and, marked `slurm`, a tiny pipeline on a
real Slurm cluster (start one with `eval "$(bash scripts/slurm/start_local_cluster.sh)"`)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slm import cli
from slm.errors import SlmError
from slm.jobs import pipeline_status, render_pipeline, submit_pipeline
from slm.jobs.progress import unfinished_parts
from slm.jobs.render import array_spec, launcher_command
from slm.jobs.status import normalize_state, query_jobs
from slm.pipeline import load_pipeline
from slm.shards.layout import whole_shards
from slm.stages.common import StageRun
from slm.utils.io import atomic_write_json

MODEL = {
    "backbone": "llama",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
TRAIN = {
    "seq_len": 64,
    "micro_batch_size": 4,
    "max_steps": 10,
    "eval_every": 5,
    "eval_batches": 2,
    "checkpoint_every": 10,
    "log_every": 5,
    "optim": {"warmup_steps": 2},
}


def tiny_pipeline(
    work_dir: Path, score_slurm: dict | None = None, pretrain_slurm: dict | None = None, top_slurm: dict | None = None
) -> dict:
    """The demo pipeline at toy sizes: about three minutes through Slurm on two CPU cores."""
    w = "${work_dir}"
    return {
        "name": "tiny",
        "work_dir": str(work_dir),
        "slurm": top_slurm or {"time": "00:20:00"},
        "stages": [
            {
                "name": "data",
                "kind": "demo_data",
                "config": {
                    "out_dir": f"{w}/data",
                    "hq_documents": 200,
                    "train_documents": 200,
                    "validation_documents": 20,
                    "questions": 10,
                    "vocab_size": 512,
                },
            },
            {
                "name": "reference",
                "kind": "reference",
                "slurm": {"launcher": "torchrun"},
                "config": {
                    "out_dir": f"{w}/reference",
                    "tokenizer": f"{w}/data/tokenizer",
                    "corpus": {"path": f"{w}/data/hq.jsonl"},
                    "validation": {"path": f"{w}/data/validation.jsonl"},
                    "model": MODEL,
                    "train": TRAIN,
                },
            },
            {
                "name": "score",
                "kind": "score",
                "slurm": score_slurm or {"array_parts": 2, "array_concurrency": 2},
                "config": {
                    "out_dir": f"{w}/shards",
                    "reference": f"{w}/reference/model",
                    "seq_len": 64,
                    "documents_per_shard": 50,
                    "corpus": {"path": f"{w}/data/train.jsonl", "noise_field": "noise_spans"},
                },
            },
            {
                "name": "pretrain",
                "kind": "pretrain",
                "slurm": pretrain_slurm or {"cpus_per_task": 2, "cpu_ranks_per_node": 2},
                "config": {
                    "out_dir": f"{w}/pretrain",
                    "shards": f"{w}/shards",
                    "validation": {"path": f"{w}/data/validation.jsonl"},
                    "model": MODEL,
                    "train": TRAIN,
                },
            },
            {
                "name": "eval",
                "kind": "eval",
                "config": {
                    "out_dir": f"{w}/eval",
                    "model": f"{w}/pretrain/model",
                    "validation": {"path": f"{w}/data/validation.jsonl"},
                    "questions": f"{w}/data/questions.jsonl",
                    "shards": f"{w}/shards",
                    "seq_len": 64,
                    "max_batches": 2,
                    "max_new_tokens": 4,
                },
            },
        ],
    }


def write_pipeline(path: Path, pipeline: dict) -> Path:
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def fake_command(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def fake_output(tmp_path: Path, name: str, text: str) -> str:
    """A command that prints `text` whatever its arguments."""
    return fake_command(tmp_path, name, f"cat <<'END'\n{text}END")


def fake_sbatch(tmp_path: Path) -> str:
    """Prints ids 101, 102, ... like `sbatch --parsable` and logs each call's arguments."""
    d = tmp_path / "bin"
    return fake_command(
        tmp_path,
        "sbatch",
        f"n=$(( $(cat {d}/count 2>/dev/null || echo 100) + 1 )); echo $n > {d}/count\n"
        f'echo "$n $*" >> {d}/calls\necho "$n;cluster"',
    )


def sbatch_calls(tmp_path: Path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "bin" / "calls").read_text().splitlines()]


def mark_complete(pipeline_path: Path, *names: str) -> None:
    """Write the stage.json a finished run of these stages leaves."""
    _, stages, _ = load_pipeline(pipeline_path)
    for s in stages:
        if s.name in names:
            cfg = s.cfg.model_copy(update={"part": 0, "parts": 1}) if s.kind == "score" else s.cfg
            run = StageRun(s.kind, cfg, Path(s.cfg.out_dir))
            run.out_dir.mkdir(parents=True, exist_ok=True)
            run.complete({}, {}, time.time(), {})


def fake_shards(directory: Path, num_shards: int, whole: list[int], truncated: list[int] = ()) -> None:
    """A shard folder as scoring leaves it midway: a manifest, sidecars and files for `whole`."""
    (directory / ".done").mkdir(parents=True)
    atomic_write_json(directory / "manifest.json", {"num_shards": num_shards, "shards": {}, "metadata": {}})
    for k in list(whole) + list(truncated):
        name = f"shard-{k:05d}.arrow"
        (directory / name).write_bytes(b"x" * 100)
        atomic_write_json(directory / ".done" / f"{name}.json", {"bytes": 100 if k in whole else 200, "rows": 1})


# ----------------------------------------------------------------------------- rendering


def test_array_spec():
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([0, 1, 2, 3], 2) == "0-3%2"
    assert array_spec([3, 1]) == "1,3"
    assert array_spec([0, 1, 2, 5, 7, 8], 4) == "0-2,5,7-8%4"
    with pytest.raises(SlmError):
        array_spec([])


def test_render_scripts_array_and_frozen_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_pipeline(
        tmp_path / "p.yaml", tiny_pipeline(Path("work"), score_slurm={"array_parts": 4, "array_concurrency": 2})
    )
    jobs = render_pipeline(path, tmp_path / "jobs", ["stages.score.seq_len=64"])
    by = {j.stage: j for j in jobs}
    score = (tmp_path / "jobs" / "score.sbatch").read_text()
    assert "unset RANK WORLD_SIZE LOCAL_RANK" in score  # a job never joins the submitter's process group
    assert "#SBATCH --array=0-3%2\n" in score
    assert f"#SBATCH --output={tmp_path}/jobs/logs/score-%A_%a.out" in score
    assert f"#SBATCH --chdir={tmp_path}\n" in score
    assert f'slm score --config {tmp_path}/jobs/configs/score.yaml --part "$SLURM_ARRAY_TASK_ID" --parts 4' in score
    assert f'export PATH="{Path(sys.executable).parent}:$PATH"' in score  # the jobs run this Python's `slm`
    data = (tmp_path / "jobs" / "data.sbatch").read_text()
    assert (
        "--array" not in data
        and "srun" not in data
        and f"slm data demo --config {tmp_path}/jobs/configs/data.yaml" in data
    )
    assert "slm eval --config" in (tmp_path / "jobs" / "eval.sbatch").read_text()
    # the frozen pipeline is a valid pipeline with absolute paths; each stage's file is its config
    _, frozen, _ = load_pipeline(tmp_path / "jobs" / "pipeline.yaml")
    _, original, _ = load_pipeline(path)
    for f, o in zip(frozen, original):
        assert f.cfg == o.cfg
        cfg = yaml.safe_load(by[f.name].config.read_text())
        assert cfg["out_dir"] == o.cfg.out_dir
        assert by[f.name].out_dir == tmp_path / "work" / Path(o.cfg.out_dir).relative_to("work")
    assert yaml.safe_load(by["score"].config.read_text())["parts"] == 4


def test_dependencies_follow_the_data(tmp_path):
    pipeline = tiny_pipeline(tmp_path / "w")
    pipeline["stages"].append(
        {
            "name": "standalone_eval",
            "kind": "eval",
            "config": {"out_dir": str(tmp_path / "x"), "model": "/models/other"},
        }
    )
    jobs = render_pipeline(write_pipeline(tmp_path / "p.yaml", pipeline), tmp_path / "jobs")
    deps = {j.stage: j.depends_on for j in jobs}
    assert deps == {
        "data": [],
        "reference": ["data"],
        "score": ["data", "reference"],
        "pretrain": ["data", "score"],
        "eval": ["data", "score", "pretrain"],
        "standalone_eval": ["eval"],
    }  # names none: waits for the stage before


def test_submit_chains_stages_with_afterok_in_order(tmp_path):
    path = write_pipeline(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "w"))
    result = submit_pipeline(path, tmp_path / "jobs", sbatch=fake_sbatch(tmp_path))
    calls = sbatch_calls(tmp_path)
    assert [c[-1].rsplit("/", 1)[1] for c in calls] == [
        "data.sbatch",
        "reference.sbatch",
        "score.sbatch",
        "pretrain.sbatch",
        "eval.sbatch",
    ]
    deps = {c[-1].rsplit("/", 1)[1]: [a for a in c if a.startswith("--dependency")] for c in calls}
    assert deps == {
        "data.sbatch": [],
        "reference.sbatch": ["--dependency=afterok:101"],
        "score.sbatch": ["--dependency=afterok:101:102"],
        "pretrain.sbatch": ["--dependency=afterok:101:103"],
        "eval.sbatch": ["--dependency=afterok:101:103:104"],
    }
    assert all("--parsable" in c for c in calls)
    record = json.loads((tmp_path / "jobs" / "jobs.json").read_text())
    assert record["submissions"][-1]["jobs"]["score"] == {
        "job_id": "103",
        "array": "0-1%2",
        "tasks": [0, 1],
        "depends_on": {"data": "101", "reference": "102"},
    }
    assert result["submitted"]["eval"]["job_id"] == "105" and [s["name"] for s in record["stages"]] == list(
        result["submitted"]
    )

    # resubmit while data still runs and reference waits: nothing is queued twice, later stages wait for them
    squeue = fake_output(
        tmp_path,
        "squeue",
        "101|101|RUNNING|None\n102|102|PENDING|Dependency\n103|103_[0-1%2]|PENDING|Dependency\n"
        "104|104|PENDING|Dependency\n105|105|PENDING|Dependency\n",
    )
    again = submit_pipeline(path, tmp_path / "jobs", sbatch=fake_sbatch(tmp_path), squeue=squeue)
    assert again["submitted"] == {} and again["reused"] == {
        "data": "101",
        "reference": "102",
        "score": "103",
        "pretrain": "104",
        "eval": "105",
    }


def test_multinode_deepspeed_launcher(tmp_path):
    from deepspeed.launcher.runner import parse_args

    path = write_pipeline(
        tmp_path / "p.yaml",
        tiny_pipeline(
            tmp_path / "w",
            pretrain_slurm={
                "nodes": 4,
                "gpus_per_node": 8,
                "cpus_per_task": 32,
                "master_port": 29555,
                "partition": "gpu",
                "mem": "256G",
            },
        ),
    )
    job = next(j for j in render_pipeline(path, tmp_path / "jobs") if j.stage == "pretrain")
    script = job.script.read_text()
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=256G",
        'NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'export MASTER_ADDR=$(echo "$NODES" | head -n 1)',
        "export MASTER_PORT=29555",
        'sed "s/$/ slots=8/"',
        'srun --nodes=4 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1',
        "export OMP_NUM_THREADS=4",
    ):
        assert line in script, line
    env = {"$SLM_HOSTFILE": "/h", "$SLURM_NODEID": "2", "$MASTER_ADDR": "node01", "$MASTER_PORT": "29555"}
    cmd = launcher_command(job)
    assert f"bash -c {shlex.quote('exec ' + cmd)}" in script
    for k, v in env.items():
        cmd = cmd.replace(k, v)
    argv = shlex.split(cmd)
    assert argv[0] == "deepspeed"
    args = parse_args(argv[1:])  # the installed launcher's own parser
    assert (args.hostfile, args.no_ssh, args.node_rank, args.master_addr, args.master_port) == (
        "/h",
        True,
        2,
        "node01",
        29555,
    )
    assert (args.num_nodes, args.num_gpus, args.no_python, args.no_local_rank, args.user_script) == (
        4,
        8,
        True,
        True,
        "slm",
    )
    assert args.user_args == ["pretrain", "--config", str(job.config)]


def test_torchrun_launcher_and_cpu_ranks(tmp_path):
    from torch.distributed.run import get_args_parser

    path = write_pipeline(
        tmp_path / "p.yaml",
        tiny_pipeline(
            tmp_path / "w",
            pretrain_slurm={"nodes": 2, "launcher": "torchrun", "cpus_per_task": 8, "cpu_ranks_per_node": 4},
        ),
    )
    jobs = {j.stage: j for j in render_pipeline(path, tmp_path / "jobs")}
    cmd = (
        launcher_command(jobs["pretrain"])
        .replace("$SLURM_JOB_ID", "77")
        .replace("$MASTER_ADDR", "node01")
        .replace("$MASTER_PORT", "29600")
    )
    argv = shlex.split(cmd)
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "2",
        "4",
        "c10d",
        "node01:29600",
        "77",
    )
    assert (
        args.no_python
        and args.training_script == "slm"
        and args.training_script_args == ["pretrain", "--config", str(jobs["pretrain"].config)]
    )
    script = jobs["pretrain"].script.read_text()
    assert "export OMP_NUM_THREADS=2" in script and "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    # CPU-only deepspeed: one slot per CPU rank, --num_gpus counts the CPU ranks
    ref = launcher_command(jobs["reference"])  # torchrun from the pipeline's reference stage
    assert "--nnodes=1 --nproc_per_node=1" in ref
    path = write_pipeline(
        tmp_path / "q.yaml", tiny_pipeline(tmp_path / "w", pretrain_slurm={"cpu_ranks_per_node": 2, "cpus_per_task": 2})
    )
    job = next(j for j in render_pipeline(path, tmp_path / "jobs2") if j.stage == "pretrain")
    assert "--num_nodes=1 --num_gpus=2" in launcher_command(job) and 'sed "s/$/ slots=2/"' in job.script.read_text()
    assert "--gpus-per-node" not in job.script.read_text()


@pytest.mark.parametrize(
    "slurm, where, message",
    [
        ({"array_concurency": 2}, "stages", "stage 'score' slurm: key 'array_concurency': unknown key"),
        ({"time": "2 hours"}, "stages", "stage 'score' slurm: key 'time'"),
        ({"launcher": "mpirun"}, "stages", "stage 'score' slurm: key 'launcher'"),
        ({"nodes": 0}, "stages", "stage 'score' slurm: key 'nodes'"),
        ({"extra_sbatch": ["qos high"]}, "stages", "stage 'score' slurm: key 'extra_sbatch'"),
        (
            {"partion": "gpu"},
            "top",
            "stage 'data' slurm: key 'partion': unknown key",
        ),  # top-level defaults reach every stage
    ],
)
def test_resource_errors_name_stage_and_key(tmp_path, slurm, where, message):
    pipeline = tiny_pipeline(
        tmp_path / "w", score_slurm=slurm if where == "stages" else None, top_slurm=slurm if where == "top" else None
    )
    path = write_pipeline(tmp_path / "p.yaml", pipeline)
    with pytest.raises(SlmError) as e:
        render_pipeline(path, tmp_path / "jobs")
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "jobs").exists()  # nothing written for a bad config


def test_stage_slurm_overrides_pipeline_defaults(tmp_path):
    pipeline = tiny_pipeline(
        tmp_path / "w",
        top_slurm={
            "partition": "cpu",
            "account": "proj",
            "time": "1-00:00:00",
            "extra_sbatch": ["#SBATCH --qos=low"],
            "env_setup": ["module load python"],
        },
    )
    pipeline["stages"][3]["slurm"] = {"partition": "gpu", "gpus_per_node": 4}
    jobs = {
        j.stage: j.script.read_text()
        for j in render_pipeline(write_pipeline(tmp_path / "p.yaml", pipeline), tmp_path / "jobs")
    }
    assert "#SBATCH --partition=cpu" in jobs["data"] and "#SBATCH --partition=gpu" in jobs["pretrain"]
    assert all(
        "#SBATCH --account=proj" in s and "#SBATCH --time=1-00:00:00" in s and "#SBATCH --qos=low" in s
        for s in jobs.values()
    )
    assert "module load python" in jobs["eval"] and "export PATH=" not in jobs["eval"]


# ----------------------------------------------------------------------------- resubmits and status


def test_unfinished_parts_from_sidecars_and_sizes(tmp_path):
    shards = tmp_path / "shards"
    assert unfinished_parts(shards, 3) == [0, 1, 2]  # nothing scored yet: every part
    # 8 shards, 4 parts: part p owns shards k with k % 4 == p; shard 1 is truncated, 3 and 7 missing
    fake_shards(shards, 8, whole=[0, 2, 4, 5, 6], truncated=[1])
    assert whole_shards(shards) == {0, 2, 4, 5, 6}
    assert unfinished_parts(shards, 4) == [1, 3]
    assert unfinished_parts(shards, 2) == [1]


def test_resubmit_submits_only_unfinished_array_tasks(tmp_path):
    pipeline = tiny_pipeline(tmp_path / "w", score_slurm={"array_parts": 4, "array_concurrency": 2})
    path = write_pipeline(tmp_path / "p.yaml", pipeline)
    mark_complete(path, "data", "reference")
    fake_shards(tmp_path / "w" / "shards", 8, whole=[0, 2, 4, 5, 6], truncated=[1])
    # the first submission's jobs are gone from the queue (squeue no longer knows them)
    atomic_write_json(
        tmp_path / "jobs" / "jobs.json", {"submissions": [{"jobs": {"score": {"job_id": "7", "array": "0-3%2"}}}]}
    )
    squeue = fake_command(tmp_path, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    sacct = fake_command(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')
    result = submit_pipeline(path, tmp_path / "jobs", sbatch=fake_sbatch(tmp_path), squeue=squeue, sacct=sacct)
    assert result["skipped"] == {"data": "complete", "reference": "complete"}
    assert result["submitted"]["score"] == {"job_id": "101", "array": "1,3%2", "tasks": [1, 3], "depends_on": {}}
    assert "#SBATCH --array=1,3%2\n" in (tmp_path / "jobs" / "score.sbatch").read_text()
    calls = {c[-1].rsplit("/", 1)[1]: c for c in sbatch_calls(tmp_path)}
    assert set(calls) == {"score.sbatch", "pretrain.sbatch", "eval.sbatch"}
    assert not any(a.startswith("--dependency") for a in calls["score.sbatch"])  # only on jobs actually submitted
    assert (
        "--dependency=afterok:101" in calls["pretrain.sbatch"]
        and "--dependency=afterok:101:102" in calls["eval.sbatch"]
    )

    # every shard whole but the stage never closed: task 0 alone closes it
    fake_shards(tmp_path / "w2" / "shards", 8, whole=list(range(8)))
    again = submit_pipeline(
        path,
        tmp_path / "jobs",
        ["work_dir=" + str(tmp_path / "w2")],
        sbatch=fake_sbatch(tmp_path),
        squeue=squeue,
        sacct=sacct,
    )
    assert again["submitted"]["score"]["array"] == "0%2"


def test_resubmit_redoes_finished_stages_whose_input_was_rebuilt(tmp_path, monkeypatch, capsys):
    w = tmp_path / "w"
    path = write_pipeline(tmp_path / "p.yaml", tiny_pipeline(w))
    # every earlier job has left the queue (squeue no longer knows them)
    squeue = fake_command(tmp_path, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    sacct = fake_command(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')

    def submit() -> dict:
        return submit_pipeline(path, tmp_path / "jobs", sbatch=fake_sbatch(tmp_path), squeue=squeue, sacct=sacct)

    mark_complete(path, "data", "reference", "score", "pretrain", "eval")
    (w / "pretrain" / "weights.bin").write_text("the old model")
    assert submit()["submitted"] == {}

    # the shards rebuilt on their own (`slm score --force`): pretrain and eval, which read them, are cleared and
    # submitted again (eval after pretrain); data, reference and the shards themselves stay
    mark_complete(path, "score")
    result = submit()
    assert set(result["skipped"]) == {"data", "reference", "score"}
    assert list(result["submitted"]) == ["pretrain", "eval"] and result["submitted"]["pretrain"]["depends_on"] == {}
    assert result["submitted"]["eval"]["depends_on"] == {"pretrain": result["submitted"]["pretrain"]["job_id"]}
    assert result["redone"]["pretrain"] == f"{w / 'shards'} was rebuilt"
    assert not (w / "pretrain" / "weights.bin").exists() and not (w / "pretrain" / "stage.json").exists()

    # the reference's output cleared (a crashed --force): every finished stage after it waits for its new run;
    # `slm jobs submit` says why each one runs again
    mark_complete(path, "pretrain", "eval")
    (w / "reference" / "stage.json").unlink()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert cli.run_cli(["jobs", "submit", str(path), "--out", str(tmp_path / "jobs")]) == 0
    said = capsys.readouterr().out
    result = json.loads((tmp_path / "jobs" / "jobs.json").read_text())["submissions"][-1]
    pretrain_line = next(line for line in said.splitlines() if line.startswith("pretrain "))
    assert pretrain_line.endswith(
        f"after score ({result['jobs']['score']['job_id']}); its finished output was cleared: score runs again"
    )
    assert [line.split()[0] for line in said.splitlines() if " submitted job " in line] == [
        "reference",
        "score",
        "pretrain",
        "eval",
    ]
    assert result["redone"] == {
        "score": "reference runs again",
        "pretrain": "score runs again",
        "eval": "score runs again; pretrain runs again",
    }
    assert result["jobs"]["score"]["tasks"] == [0, 1]  # every part: its shards were cleared
    assert not (w / "shards" / "stage.json").exists()


def test_status_without_accounting(tmp_path):
    path = write_pipeline(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "w"))
    submit_pipeline(
        path, tmp_path / "jobs", sbatch=fake_sbatch(tmp_path)
    )  # data 101, reference 102, score 103, pretrain 104, eval 105
    mark_complete(path, "data")
    fake_shards(tmp_path / "w" / "shards", 4, whole=[0, 2])
    squeue = fake_output(
        tmp_path,
        "squeue",
        "102|102|COMPLETING|None\n103|103_0|COMPLETED|None\n103|103_1|CANCELLED|None\n"
        "104|104|PENDING|DependencyNeverSatisfied\n",
    )
    sacct = fake_command(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')
    rows = {r["stage"]: r for r in pipeline_status(tmp_path / "jobs", squeue=squeue, sacct=sacct)}
    assert [r for r in rows] == ["data", "reference", "score", "pretrain", "eval"]
    assert (rows["data"]["state"], rows["data"]["source"], rows["data"]["output"]) == (
        "COMPLETED",
        "stage.json",
        "complete",
    )  # squeue forgot it
    assert rows["reference"]["state"] == "RUNNING"
    assert rows["score"]["state"] == "CANCELLED" and rows["score"]["tasks"] == {"COMPLETED": 1, "CANCELLED": 1}
    assert rows["score"]["output"] == "2/4 shards whole"
    assert rows["pretrain"]["state"] == "PENDING" and rows["eval"]["state"] == "UNKNOWN"
    # with accounting, sacct answers for jobs squeue no longer lists
    sacct = fake_output(tmp_path, "sacct", "101|COMPLETED\n105_[0-3%2]|PENDING\n105_4|CANCELLED by 0\n")
    states = query_jobs(["101", "105"], squeue=squeue, sacct=sacct)
    assert states["101"]["state"] == "COMPLETED" and states["105"]["tasks"] == {"PENDING": 4, "CANCELLED": 1}
    assert [normalize_state(s) for s in ("TIMEOUT", "OUT_OF_MEMORY", "COMPLETING", "REQUEUED", "BOGUS")] == [
        "FAILED",
        "FAILED",
        "RUNNING",
        "PENDING",
        "UNKNOWN",
    ]


def test_status_cli_needs_a_submission(tmp_path):
    with pytest.raises(SlmError, match="submit a pipeline first"):
        pipeline_status(tmp_path)


def test_stoppable_stages_ask_for_the_signal_and_requeue(tmp_path):
    """Training and scoring: --signal=B:USR1@SECONDS (signal_seconds), --requeue with appended logs, the stop file
    and its trap; other stages requeue without a signal; signal_seconds null and requeue false turn each off."""
    pipeline = tiny_pipeline(tmp_path / "w", pretrain_slurm={"signal_seconds": 120, "cpus_per_task": 2})
    render_pipeline(write_pipeline(tmp_path / "p.yaml", pipeline), tmp_path / "jobs")
    scripts = {p.stem: p.read_text() for p in (tmp_path / "jobs").glob("*.sbatch")}
    for stage in ("reference", "score", "pretrain"):
        script = scripts[stage]
        assert "#SBATCH --requeue\n#SBATCH --open-mode=append\n" in script
        assert f'export SLM_STOP_FILE="{tmp_path}/jobs/logs/stop-{stage}-$SLURM_JOB_ID"' in script
        assert "trap 'slm_stop SIGUSR1; slm_requeue=1' USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "#SBATCH --signal=B:USR1@120\n" in scripts["pretrain"]
    for stage in ("reference", "score"):  # the default: 300 s ahead of the limit
        assert "#SBATCH --signal=B:USR1@300\n" in scripts[stage]
    for stage in ("data", "eval"):
        assert "--signal" not in scripts[stage] and "SLM_STOP_FILE" not in scripts[stage]
        assert "#SBATCH --requeue\n" in scripts[stage]

    pipeline["stages"][3]["slurm"] = {"signal_seconds": None, "requeue": False}
    render_pipeline(write_pipeline(tmp_path / "q.yaml", pipeline), tmp_path / "jobs2")
    script = (tmp_path / "jobs2" / "pretrain.sbatch").read_text()
    assert "--signal" not in script and "#SBATCH --no-requeue\n" in script and "--requeue" not in script
    assert "scontrol requeue" not in script and "run slm jobs submit again to continue" in script


@pytest.mark.parametrize("sig, stage_exit", [(signal.SIGUSR1, 3), (signal.SIGUSR1, 0), (signal.SIGTERM, 3)])
def test_signalled_script_stops_the_stage_and_requeues_itself(tmp_path, sig, stage_exit):
    """The rendered scoring script run by bash as Slurm would (SLURM_JOB_ID set), with a stand-in `slm` that waits
    for the stop file and a stand-in `scontrol`: a signal to the batch shell reaches the stage through the stop file.
    After SIGUSR1 (ahead of the time limit) a stage that stopped (exit 3) is requeued and the script exits 0; one that
    finished anyway (0) is not. After SIGTERM (preemption, scancel) the script exits 3 and leaves requeueing to Slurm:
    a cancel stays a cancel."""
    log = tmp_path / "calls.log"
    fake_command(tmp_path, "scontrol", f'echo "scontrol $*" >> {log}')
    fake_command(
        tmp_path,
        "slm",
        f'echo "slm $*" >> {log}; until [ -e "$SLM_STOP_FILE" ]; do sleep 0.05; done; '
        f'echo "saw $SLM_STOP_FILE" >> {log}; exit {stage_exit}',
    )
    pipeline = tiny_pipeline(
        tmp_path / "w", score_slurm={"array_parts": 2, "env_setup": [f'export PATH="{tmp_path}/bin:$PATH"']}
    )
    render_pipeline(write_pipeline(tmp_path / "p.yaml", pipeline), tmp_path / "jobs")
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1"}
    stop = tmp_path / "jobs" / "logs" / "stop-score-77"
    stop.touch()  # left by an earlier run of this job id: a new run starts without a stop request
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "jobs" / "score.sbatch")], env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 30
    while not (log.is_file() and log.read_text().startswith("slm score")):
        assert time.time() < deadline and proc.poll() is None, "the stage did not start"
        time.sleep(0.05)
    assert not stop.exists()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("slm score --config") and calls[0].endswith("--part 1 --parts 2")
    assert calls[1] == f"saw {stop}"
    assert f"slm jobs: {signal.Signals(sig).name} at " in out and "asking the stage to stop" in out
    if sig == signal.SIGUSR1 and stage_exit == 3:
        assert calls[2:] == ["scontrol requeue 77"] and proc.returncode == 0
        assert "stopped at a safe point (exit 3); requeueing job 77" in out
    else:
        assert calls[2:] == [] and proc.returncode == stage_exit


# ----------------------------------------------------------------------------- a real Slurm cluster

WAIT_S = 480


def _sinfo_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "sinfo not found (Slurm is not installed)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if proc.returncode != 0 or not proc.stdout.strip():
        first = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[0]
        return f"sinfo failed: {first[:160]}" + ("; SLURM_CONF is not set" if "SLURM_CONF" not in os.environ else "")
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _sinfo_problem()
    if problem:
        pytest.skip(
            f"no reachable Slurm cluster ({problem}); "
            'start one with: eval "$(bash scripts/slurm/start_local_cluster.sh)"'
        )


def slm_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "slm"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "slm.cli"]
    proc = subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"slm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_for(job_ids: list[str], jobs_dir: Path, timeout: float = WAIT_S) -> dict[str, dict]:
    deadline = time.time() + timeout
    while True:
        states = query_jobs(job_ids)
        if all(states.get(j, {}).get("state") not in ("PENDING", "RUNNING") for j in job_ids):
            return states
        if time.time() > deadline:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((jobs_dir / "logs").glob("*.out"))
            )
            pytest.fail(f"jobs {job_ids} still running after {timeout:.0f} s: {states}\n{logs}")
        time.sleep(2)


def submitted_ids(jobs_dir: Path) -> list[str]:
    record = json.loads((jobs_dir / "jobs.json").read_text())
    return [j["job_id"] for j in record["submissions"][-1]["jobs"].values()]


def assert_ok(states: dict, jobs_dir: Path) -> None:
    bad = {j: s for j, s in states.items() if s["state"] != "COMPLETED"}
    if bad:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((jobs_dir / "logs").glob("*.out")))
        pytest.fail(f"jobs did not complete: {bad}\n{logs}")


@pytest.fixture(scope="module")
def cluster_run(slurm, tmp_path_factory):
    """The tiny pipeline submitted with `slm jobs submit` and waited for (about three minutes)."""
    root = tmp_path_factory.mktemp("slurm")
    write_pipeline(root / "pipeline.yaml", tiny_pipeline(root / "work"))
    started = time.time()
    out = slm_cli("jobs", "submit", "pipeline.yaml", "--out", "jobs", cwd=root).stdout
    assert "score            submitted job" in out and "--array=0-1%2" in out
    states = wait_for(submitted_ids(root / "jobs"), root / "jobs")
    print(f"tiny pipeline through Slurm: {time.time() - started:.0f} s")
    return root, states


@pytest.mark.slurm
def test_pipeline_on_slurm(cluster_run):
    from slm.shards.reader import verify_shards

    root, states = cluster_run
    assert_ok(states, root / "jobs")
    assert verify_shards(root / "work" / "shards") == []
    model = root / "work" / "pretrain" / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    rows = pipeline_status(root / "jobs")
    assert [(r["stage"], r["state"], r["output"]) for r in rows] == [
        (s, "COMPLETED", "complete") for s in ("data", "reference", "score", "pretrain", "eval")
    ]
    assert rows[2]["tasks"] == {"COMPLETED": 2}
    table = slm_cli("jobs", "status", "--out", "jobs", cwd=root).stdout
    assert "COMPLETED" in table and "pretrain" in table
    # the training jobs ran through the launchers: torchrun for reference, deepspeed (two CPU ranks) for pretrain
    logs = root / "jobs" / "logs"
    assert "dist_world_size=2" in next(logs.glob("pretrain-*.out")).read_text()
    assert "torchrun" in (root / "jobs" / "reference.sbatch").read_text()


def _check_sequences(shards: Path, corpus: Path, tokenizer_dir: Path, documents_per_shard: int, seq_len: int) -> None:
    """Every shard whole, every sequence_id present once, rows equal to packing the documents anew."""
    import numpy as np

    from slm.config import CorpusConfig
    from slm.data.corpus import load_corpus
    from slm.data.packed import iter_documents
    from slm.data.packing import pack_documents
    from slm.data.tokenizer import load_tokenizer
    from slm.shards.format import ROW_STRIDE
    from slm.shards.layout import shard_name
    from slm.shards.manifest import load_manifest
    from slm.shards.reader import open_shard, verify_shards

    assert verify_shards(shards) == []
    manifest = load_manifest(shards)
    documents = len(corpus.read_text().splitlines())
    num_shards = math.ceil(documents / documents_per_shard)
    assert manifest.num_shards == num_shards and sorted(manifest.shards) == [shard_name(k) for k in range(num_shards)]
    assert manifest.totals()["documents"] == documents
    tokenizer = load_tokenizer(tokenizer_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs = load_corpus(CorpusConfig(path=str(corpus)))
    seen: list[int] = []
    for k in range(num_shards):
        table = open_shard(shards / shard_name(k))
        ids = table.column("sequence_id").to_pylist()
        seen += ids
        lo, hi = k * documents_per_shard, min((k + 1) * documents_per_shard, documents)
        rows = list(
            pack_documents(iter_documents(docs, tokenizer, "text", None, lo, hi), seq_len, tokenizer.eos_token_id, pad)
        )
        assert ids == [k * ROW_STRIDE + i for i in range(len(rows))], (
            f"shard {k}: sequence ids {ids[:3]}... for {len(rows)} rows"
        )
        assert np.array_equal(np.array(table.column("input_ids").to_pylist()), np.array([r.input_ids for r in rows]))
    assert len(seen) == len(set(seen)) == manifest.totals()["rows"]


@pytest.mark.slurm
def test_cancelled_array_task_is_resubmitted_alone(cluster_run):
    """A second scoring stage, 1000 documents in 100 shards over 2 array tasks (about ten seconds
    of scoring each): task 1 is cancelled once it has written a shard; the resubmit hands over
    task 1 only, and the shards end whole with every sequence once."""
    root, states = cluster_run
    assert_ok(states, root / "jobs")
    corpus = root / "work" / "fine.jsonl"
    corpus.write_text((root / "work" / "data" / "train.jsonl").read_text() * 5)
    pipeline = tiny_pipeline(root / "work")
    pipeline["stages"].append(
        {
            "name": "score_fine",
            "kind": "score",
            "slurm": {"array_parts": 2, "array_concurrency": 2},
            "config": {
                **pipeline["stages"][2]["config"],
                "out_dir": "${work_dir}/shards_fine",
                "documents_per_shard": 10,
                "corpus": {"path": str(corpus), "noise_field": "noise_spans"},
            },
        }
    )
    write_pipeline(root / "pipeline_fine.yaml", pipeline)
    shards = root / "work" / "shards_fine"
    started = time.time()
    slm_cli("jobs", "submit", "pipeline_fine.yaml", "--out", "jobs", cwd=root)
    record = json.loads((root / "jobs" / "jobs.json").read_text())
    assert list(record["submissions"][-1]["jobs"]) == ["score_fine"]  # the finished stages are skipped
    assert set(record["submissions"][-1]["skipped"]) == {"data", "reference", "score", "pretrain", "eval"}
    job = record["submissions"][-1]["jobs"]["score_fine"]["job_id"]

    deadline = time.time() + WAIT_S
    while not any(k % 2 == 1 for k in whole_shards(shards)):  # task 1 has written a shard: cancel it
        assert time.time() < deadline, "array task 1 wrote no shard in time"
        time.sleep(0.1)
    subprocess.run(["scancel", f"{job}_1"], check=True, timeout=30)
    after_cancel = wait_for([job], root / "jobs")[job]
    part1 = {k for k in whole_shards(shards) if k % 2 == 1}
    assert after_cancel["tasks"] == {"COMPLETED": 1, "CANCELLED": 1}, after_cancel
    assert 0 < len(part1) < 50, f"task 1 was not cancelled midway ({len(part1)} of 50 shards whole)"
    assert unfinished_parts(shards, 2) == [1]
    row = next(r for r in pipeline_status(root / "jobs") if r["stage"] == "score_fine")
    assert row["state"] == "CANCELLED" and row["output"] == f"{50 + len(part1)}/100 shards whole"

    out = slm_cli("jobs", "submit", "pipeline_fine.yaml", "--out", "jobs", cwd=root).stdout
    record = json.loads((root / "jobs" / "jobs.json").read_text())
    assert list(record["submissions"][-1]["jobs"]) == ["score_fine"] and "--array=1%2" in out
    assert record["submissions"][-1]["jobs"]["score_fine"]["tasks"] == [1]
    assert_ok(wait_for(submitted_ids(root / "jobs"), root / "jobs"), root / "jobs")
    print(
        f"cancel + resubmit of one array task: {time.time() - started:.0f} s "
        f"({len(part1)} of task 1's 50 shards were whole at the cancel)"
    )
    assert json.loads((shards / "stage.json").read_text())["status"] == "complete"
    _check_sequences(shards, corpus, root / "work" / "reference" / "model", 10, 64)


def _job_record(job: str) -> dict[str, str]:
    """`scontrol show job` as key=value pairs (JobState, Reason, Restarts, ...)."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


@pytest.mark.slurm
def test_time_limit_signal_requeues_training_to_the_same_weights(slurm, tmp_path):
    """A reference job with a 2-minute limit and `signal_seconds: 90` (--signal=B:USR1@90): Slurm signals the batch
    shell about 30 s into each run, the stage stops after the step in progress with a whole checkpoint (exit 3), the
    script requeues the job, and each requeued run (a new limit) continues from the newest checkpoint, ending with
    the weights of an uninterrupted run (1e-6). Slurm holds a requeued job for about two minutes (BeginTime); the
    test releases it after 5 s."""
    import torch
    from safetensors.torch import load_file

    from slm.config import DemoDataConfig, ReferenceConfig
    from slm.data.demo import generate_demo
    from slm.stages import reference

    demo = generate_demo(
        DemoDataConfig(
            out_dir=str(tmp_path / "data"), hq_documents=200, train_documents=20, validation_documents=5, vocab_size=512
        ),
        progress=False,
    )
    train = {**TRAIN, "max_steps": 4000, "eval_every": 100000, "checkpoint_every": 100000, "log_every": 500}
    config = {"tokenizer": str(demo.tokenizer), "corpus": {"path": str(demo.hq)}, "model": MODEL, "train": train}
    pipeline = {
        "name": "preempt",
        "work_dir": str(tmp_path / "work"),
        "slurm": {"time": "00:02:00", "signal_seconds": 90},
        "stages": [
            {
                "name": "ref",
                "kind": "reference",
                "slurm": {"launcher": "torchrun"},
                "config": {**config, "out_dir": "${work_dir}/ref"},
            }
        ],
    }
    write_pipeline(tmp_path / "pipeline.yaml", pipeline)
    slm_cli("jobs", "submit", "pipeline.yaml", "--out", "jobs", cwd=tmp_path)
    (job,) = submitted_ids(tmp_path / "jobs")
    assert "#SBATCH --signal=B:USR1@90\n" in (tmp_path / "jobs" / "ref.sbatch").read_text()

    whole = reference.run(ReferenceConfig.model_validate({**config, "out_dir": str(tmp_path / "whole")}))

    # Slurm holds a requeued job (BeginTime) because the node revokes the old run's credential: a run released in
    # the same second as the requeue is refused ("Job credential revoked") and the job ends FAILED. So the test
    # releases a requeued job only a few seconds after it first sees it held.
    deadline, released, held_since = time.time() + 900, 0, None
    while True:
        rec = _job_record(job)
        state, restarts = rec.get("JobState"), int(rec.get("Restarts", "0"))
        if state == "PENDING" and restarts > released and rec.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since >= 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
                released, held_since = restarts, None
        if state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        assert time.time() < deadline, f"job {job} still {state} after 900 s"
        time.sleep(2)
    log = next((tmp_path / "jobs" / "logs").glob("ref-*.out")).read_text(errors="replace")  # tqdm bars
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert restarts >= 1, f"job {job} was never signalled and requeued (training ended first?):\n{log[-3000:]}"
    assert "slm jobs: SIGUSR1 at " in log  # the stage exits 3; torchrun, between it and the script, reports 1
    assert re.search(rf"stage ref stopped at a safe point \(exit \d+\); requeueing job {job} to continue", log)
    assert re.search(r"stopped by stop file \S+ after step \d+ of 4000; whole checkpoint step-\d+ written", log)
    stage = json.loads((tmp_path / "work" / "ref" / "stage.json").read_text())
    assert stage["status"] == "complete" and stage["metrics"]["resumed_from"] is not None
    a = load_file(f"{whole['outputs']['model']}/model.safetensors")
    b = load_file(str(tmp_path / "work" / "ref" / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    print(f"signalled and requeued {restarts} time(s); resumed from step {stage['metrics']['resumed_from']}")
