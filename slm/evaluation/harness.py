"""lm-evaluation-harness (`lm_eval`, EleutherAI) on any slm export: the standard harness, through its own
Hugging Face model class (`hf`), with local task YAMLs from `include_path`.

slm exports load in lm-eval's HF model because `slm` is imported here (its backbones are registered with
transformers) and because each export also carries its code (`trust_remote_code`). `max_length` is passed
explicitly: otherwise lm-eval cuts inputs to `max_position_embeddings` (or 2048), which for a streaming
backbone is no limit at all. lm-eval scores loglikelihoods on right-padded batches without an attention mask
(exact for any causal model: a pad after the last real token changes no earlier logit) and generates with left
padding, which every slm backbone takes (see slm.models.causal_lm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm.errors import SlmError
from slm.utils.io import atomic_write_json


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SlmError(
            "slm eval harness needs lm-evaluation-harness: pip install 'slm[harness]' (or pip install 'lm-eval[hf]')"
        ) from None


def run_harness(
    model_dir: str | Path,
    tasks: list[str],
    out_dir: str | Path,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on `model_dir`; write `results.json` (metrics) and `samples.jsonl`
    (every request's arguments and the model's answers) into out_dir, and return the metrics per task."""
    import slm.models  # noqa: F401  (registers the backbones with transformers)

    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SlmError(f"--model {model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    if include_path is not None and not Path(include_path).is_dir():
        raise SlmError(f"--include-path {include_path}: not a directory of task YAML files")
    if max_length is None:
        max_length = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SlmError(
            f"--tasks: unknown task(s) {unknown}; give lm-eval task names or local YAMLs with --include-path"
        )
    results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "max_length": max_length, "dtype": dtype, "trust_remote_code": True},
        tasks=tasks,
        batch_size=batch_size,
        device=device,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = json.loads(json.dumps(results["results"], default=str))
    atomic_write_json(
        out / "results.json",
        {
            "model": str(model_dir),
            "tasks": tasks,
            "batch_size": batch_size,
            "max_length": max_length,
            "limit": limit,
            "results": metrics,
        },
    )
    with open(out / "samples.jsonl", "w") as f:
        for task, samples in results.get("samples", {}).items():
            for s in samples:
                f.write(
                    json.dumps(
                        {
                            "task": task,
                            "doc_id": s["doc_id"],
                            "arguments": s["arguments"],
                            "responses": s["resps"],
                            "filtered": s["filtered_resps"],
                        },
                        default=str,
                    )
                    + "\n"
                )
    return metrics


# -------------------------------------------------------------------------- the demo's questions as a local task

DEMO_TASK = "slm_demo_questions"


def write_demo_task(questions: Path, directory: Path) -> Path:
    """An lm-eval task YAML for the demo's held-out questions (`questions.jsonl`: question, answer): greedy
    generation of the worked answer (16 tokens, as the demo's `slm eval`), scored as the demo scores it: the
    number after "The answer is" must equal the answer."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{DEMO_TASK}.yaml"
    path.write_text(f"""# Written by `slm data demo`: the demo's domain questions as an lm-evaluation-harness task.
#   slm eval harness --model MODEL --tasks {DEMO_TASK} --include-path {directory}
task: {DEMO_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions.resolve()}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: stated_answer
    filter:
      - function: regex
        regex_pattern: "The answer is (-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return path
