"""`run_ruler`: generate every sample, decode greedily, score, write results.json and plots.

Files in `out_dir`:
- `predictions.jsonl`: a header line with the run's fingerprint (model files, tokenizer,
  template set, generation budget, precision), then one line per decoded sample (task, length,
  index, depth, prompt tokens, prediction, answers, score), appended as it goes. With `resume`,
  a rerun with the same fingerprint keeps the file, reuses the rows whose prompt is unchanged
  (same sha256) and appends the rest; otherwise the file starts afresh.
- `results.json` (written atomically at the end): per task x length score with interval and
  per-depth scores, the average per length, the effective length, and the config.
- `heatmap_<task>.png` (depth x length) per task and `average.png`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from slm.config import dump_config
from slm.errors import SlmError, describe
from slm.evaluation.ruler.config import RulerConfig
from slm.evaluation.ruler.decode import clean_prediction, greedy_generate, stop_token_ids
from slm.evaluation.ruler.report import aggregate, plot_average, plot_heatmap
from slm.evaluation.ruler.scoring import effective_length, score_sample
from slm.evaluation.ruler.sizing import encode_prompt
from slm.evaluation.ruler.tasks import generate_sample
from slm.evaluation.ruler.templates import get_templates
from slm.utils.io import atomic_write_json, atomic_write_text, checkpoint_identity, sha256_json

FORMAT = "slm.ruler/1"

# RULER's generation budgets (tokens_to_generate) for template_set=ruler; pass key as Landmark
RULER_MAX_NEW_TOKENS = {
    "passkey": 16,
    "niah_single": 128,
    "niah_multikey": 128,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "variable_tracking": 30,
    "common_words": 120,
    "frequent_words": 50,
}


def max_new_tokens_for(cfg: RulerConfig, task: str, answer_tokens: int) -> int:
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    if cfg.template_set == "ruler":
        return RULER_MAX_NEW_TOKENS[task]
    return answer_tokens + 4


def _resolve_device(cfg: RulerConfig):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[precision], precision


def _load_previous(path: Path, fingerprint: str) -> dict[tuple, dict]:
    """Rows of an earlier run with the same fingerprint, keyed by (task, length, index)."""
    if not path.is_file():
        return {}
    rows: dict[tuple, dict] = {}
    with path.open() as f:
        lines = f.read().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        return {}
    if header.get("fingerprint") != fingerprint:
        return {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        rows[(row["task"], row["length"], row["index"])] = row
    return rows


def _check_paths(cfg: RulerConfig) -> tuple[Path, Path]:
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise SlmError(f"model {cfg.model!r}: directory not found")
    if not (model_dir / "config.json").is_file():
        raise SlmError(f"model {cfg.model!r}: not a Hugging Face checkpoint directory (no config.json)")
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else model_dir
    if not tok_dir.is_dir():
        raise SlmError(f"tokenizer {str(tok_dir)!r}: directory not found")
    return model_dir, tok_dir


def run_ruler(cfg: RulerConfig, progress: bool = True) -> dict:
    """Evaluate `cfg.model` on the RULER-style tasks; write results into `cfg.out_dir`; return them."""
    from tqdm.auto import tqdm

    from slm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from slm.models.registry import load_pretrained

    t0 = time.time()
    model_dir, tok_dir = _check_paths(cfg)
    tokenizer = load_tokenizer(tok_dir)
    templates = get_templates(cfg.template_set, cfg.compact, cfg.options)
    gen_kwargs = dict(tokenizer=tokenizer, templates=templates, options=cfg.options, depths=cfg.depths, seed=cfg.seed)

    # fail fast: a length too short for a task shows up before the model is loaded
    first = {
        (task, length): generate_sample(task, length, 0, **gen_kwargs) for task in cfg.tasks for length in cfg.lengths
    }

    device, dtype, precision = _resolve_device(cfg)
    try:
        model = load_pretrained(str(model_dir), dtype=dtype)
    except SlmError:
        raise
    except Exception as e:  # a broken or foreign checkpoint: say which, in one line
        raise SlmError(f"model {cfg.model!r}: could not be loaded ({describe(e)})") from None
    model = model.to(device).eval()
    stops = set(stop_token_ids(tokenizer, newline=cfg.stop_at_newline))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # e.g. Llama 3's <|eot_id|>
    stops.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    fingerprint = sha256_json(
        {
            "format": FORMAT,
            "model": checkpoint_identity(model_dir),
            "tokenizer": tokenizer_fingerprint(tok_dir),
            "max_new_tokens": cfg.max_new_tokens,
            "stop_at_newline": cfg.stop_at_newline,
            "template_set": cfg.template_set,
            "precision": precision,
        }
    )
    previous = _load_previous(pred_path, fingerprint) if cfg.resume else {}
    if not previous:  # start the log afresh; otherwise keep it and append (the last row of a key wins)
        atomic_write_text(pred_path, json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n")

    rows: list[dict] = []
    reused = 0
    total = len(cfg.tasks) * len(cfg.lengths) * cfg.samples_per_length
    bar = tqdm(total=total, desc="ruler", unit="sample", disable=not progress, dynamic_ncols=True)
    with pred_path.open("a") as log:
        if previous and not pred_path.read_bytes().endswith(b"\n"):
            log.write("\n")  # end a line cut short by a crash
        for task in cfg.tasks:
            for length in cfg.lengths:
                bar.set_postfix_str(f"{task} {length}")
                for index in range(cfg.samples_per_length):
                    s = first.pop((task, length)) if index == 0 else generate_sample(task, length, index, **gen_kwargs)
                    prompt_sha = hashlib.sha256(s.prompt.encode()).hexdigest()
                    old = previous.get((task, length, index))
                    if old is not None and old.get("prompt_sha256") == prompt_sha:
                        rows.append(old)
                        reused += 1
                    else:
                        ids = encode_prompt(tokenizer, s.prompt)
                        new = greedy_generate(
                            model, ids, max_new_tokens_for(cfg, task, s.answer_tokens), cfg.chunk_len, stops
                        )
                        raw = tokenizer.decode(new, skip_special_tokens=True)
                        prediction = clean_prediction(raw, first_line=cfg.stop_at_newline)
                        row = {
                            "task": task,
                            "length": length,
                            "index": index,
                            "depth": s.depth,
                            "needle_depth": s.needle_depth,
                            "prompt_tokens": len(ids),
                            "answer_tokens": s.answer_tokens,
                            "generated_tokens": len(new),
                            "prediction": prediction,
                            "raw": raw,
                            "answers": s.answers,
                            "metric": s.metric,
                            "score": score_sample(prediction, s.answers, s.metric),
                            "prompt_sha256": prompt_sha,
                        }
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        rows.append(row)
                    bar.update(1)
        os.fsync(log.fileno())
    bar.close()

    agg = aggregate(rows, cfg.tasks, cfg.lengths, cfg.ci, cfg.confidence)
    average = {int(k): v for k, v in agg["average"].items()}
    eff = effective_length(average, cfg.threshold, cfg.relative_threshold)
    plots = {}
    for task in cfg.tasks:
        plots[task] = plot_heatmap(task, agg["scores"][task], cfg.lengths, out_dir / f"heatmap_{task}.png").name
    plots["average"] = plot_average(agg["average"], cfg.lengths, eff, out_dir / "average.png").name

    results = {
        "format": FORMAT,
        "model": str(model_dir),
        "tokenizer": str(tok_dir),
        "template_set": cfg.template_set,
        "tasks": cfg.tasks,
        "lengths": cfg.lengths,
        "scores": agg["scores"],
        "average": agg["average"],
        "effective_length": eff,
        "ci_method": cfg.ci,
        "confidence": cfg.confidence,
        "samples": len(rows),
        "reused_predictions": reused,
        "device": device,
        "precision": precision,
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "plots": plots,
        "predictions": pred_path.name,
        "seconds": round(time.time() - t0, 3),
        "config": dump_config(cfg),
    }
    atomic_write_json(out_dir / "results.json", results)
    return results
