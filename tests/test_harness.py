"""lm-evaluation-harness on tiny exports of every backbone: a local loglikelihood task and a generate_until task,
batch size 1 and 4 giving the same answers; the demo's questions as a local task; `slm eval harness`."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from slm.config import ModelConfig  # noqa: E402
from slm.evaluation.harness import DEMO_TASK, run_harness, write_demo_task  # noqa: E402
from slm.models import build_model  # noqa: E402

OPTIONS = {
    "llama": {},
    "infini": {"segment_len": 8},
    "megalodon": {"chunk_len": 8, "cema_ndim": 4, "norm_num_groups": 4},
    "fam": {"block_len": 8, "fam_len": 2},
    "beacon": {"window_len": 8, "condensing_ratio": 4},
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    with open(root / "mc.jsonl", "w") as f:
        for i in range(6):
            f.write(
                json.dumps(
                    {
                        "question": f"Question: What is {i} + {i}?\nAnswer:",
                        "choices": [f" {2 * i}", f" {2 * i + 1}", " 7"],
                        "label": 0,
                    }
                )
                + "\n"
            )
    with open(root / "gen.jsonl", "w") as f:
        for i in range(5):  # prompts of different lengths: a batch of 4 is left-padded
            f.write(
                json.dumps(
                    {
                        "question": "The grass is green. "
                        * i
                        + f"The pass key is {111 * (i + 1)}. What is the pass key? "
                        "The pass key is",
                        "answer": f" {111 * (i + 1)}",
                    }
                )
                + "\n"
            )
    (root / "slm_toy_mc.yaml").write_text(f"""task: slm_toy_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / "mc.jsonl"}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    (root / "slm_toy_gen.yaml").write_text(f"""task: slm_toy_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / "gen.jsonl"}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 5, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    return root


def export(backbone, tiny_demo, directory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_demo.tokenizer)
    cfg = ModelConfig(
        backbone=backbone, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, options=OPTIONS[backbone]
    )
    build_model(cfg, vocab_size=len(tokenizer), seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def samples(out_dir):
    return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", list(OPTIONS))
def test_loglikelihood_and_generation_agree_across_batch_sizes(backbone, tiny_demo, tasks_dir, tmp_path):
    model = export(backbone, tiny_demo, tmp_path / "model")
    runs = {
        bs: run_harness(
            model, ["slm_toy_mc", "slm_toy_gen"], tmp_path / f"bs{bs}", tasks_dir, batch_size=bs, max_length=256
        )
        for bs in (1, 4)
    }
    assert runs[1] == runs[4] and {"slm_toy_mc", "slm_toy_gen"} <= set(runs[1])
    one, four = samples(tmp_path / "bs1"), samples(tmp_path / "bs4")
    assert len(one) == len(four) == 11
    for a, b in zip(one, four):
        assert (a["task"], a["doc_id"]) == (b["task"], b["doc_id"])
        if a["task"] == "slm_toy_mc":  # [[loglikelihood, is_greedy]] per choice
            for (la, _), (lb, _) in zip([r[0] for r in a["responses"]], [r[0] for r in b["responses"]]):
                assert abs(float(la) - float(lb)) < 1e-4, (backbone, a["doc_id"])
        else:
            assert a["responses"] == b["responses"], (backbone, a["doc_id"])


def test_demo_questions_task_and_cli(tiny_demo, tmp_path):
    from slm.cli import run_cli

    task_dir = tmp_path / "harness"
    write_demo_task(tiny_demo.questions, task_dir)
    model = export("infini", tiny_demo, tmp_path / "model")
    code = run_cli(
        [
            "eval",
            "harness",
            "--model",
            str(model),
            "--tasks",
            DEMO_TASK,
            "--include-path",
            str(task_dir),
            "--out",
            str(tmp_path / "out"),
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--max-length",
            "128",
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["max_length"] == 128 and "exact_match,stated_answer" in record["results"][DEMO_TASK]
    assert (
        run_cli(
            [
                "eval",
                "harness",
                "--model",
                str(model),
                "--tasks",
                "no_such_task",
                "--include-path",
                str(task_dir),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
