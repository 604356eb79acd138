"""`slm eval`: held-out loss, domain accuracy and (on the demo) selection quality; JSON and a table."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from slm.analysis.noise_kinds import noise_kind_codes
from slm.config import EvalConfig
from slm.data.packed import packed_corpus
from slm.data.tokenizer import load_tokenizer
from slm.evaluation.heldout import domain_accuracy, read_questions, selection_quality
from slm.models import load_pretrained
from slm.shards import ShardSet
from slm.stages.common import STAGE_FILE, StageRun, config_fingerprint, console, locked_stage, say
from slm.threads import apply_threads
from slm.training.distributed import device
from slm.training.loop import heldout_eval, heldout_sample
from slm.utils.io import atomic_write_json, read_json, weights_fingerprint


@locked_stage("eval")
def run(cfg: EvalConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("eval", cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]eval[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.threads, "threads")  # before any torch work
    shards = ShardSet(cfg.shards, verify=cfg.verify_shards) if cfg.shards else None  # refuse bad shards before any work
    dev = device()
    model = load_pretrained(cfg.model).to(dev).eval()
    tokenizer = load_tokenizer(cfg.model)
    metrics: dict = {}
    if cfg.validation:
        rows = packed_corpus(cfg.validation, tokenizer, cfg.model, cfg.seq_len, out / "data")
        # the whole file, or with max_batches a fixed sample spread across its documents (as training's eval points)
        indices = None if cfg.max_batches is None else heldout_sample(rows, cfg.max_batches * cfg.batch_size, 0)
        held = heldout_eval(model, rows, cfg.batch_size, dev, indices)
        metrics.update(heldout_loss=held.loss, heldout_rows=held.rows, heldout_tokens=held.tokens)
        metrics["heldout_of_rows"] = len(rows)
    if cfg.questions:
        acc = domain_accuracy(model, tokenizer, read_questions(cfg.questions), cfg.max_new_tokens)
        metrics["domain_accuracy"] = acc["accuracy"]
        atomic_write_json(out / "answers.json", acc["samples"])
    if shards is not None:
        codes, kinds = None, None
        if cfg.noise_corpus:
            n_rows = len(shards) if cfg.max_batches is None else min(len(shards), cfg.max_batches * cfg.batch_size)
            codes, kinds = noise_kind_codes(shards, cfg.noise_corpus, tokenizer, n_rows)
        metrics["selection"] = selection_quality(
            model,
            shards,
            cfg.selection_ratio,
            cfg.batch_size,
            cfg.max_batches,
            noise_codes=codes,
            kind_names=kinds,
            mode=trained_selection_mode(cfg.model),
        )
    atomic_write_json(out / "results.json", {"model": cfg.model, **metrics})
    metrics.update(threads)  # stage.json only: how it ran, not a result
    print_results(cfg.model, metrics)
    fingerprints = {"config": config_fingerprint(cfg), "model": weights_fingerprint(cfg.model)}
    return stage.complete(fingerprints, metrics, started, {"results": str(out / "results.json")})


def trained_selection_mode(model_dir: str) -> str:
    """The selection mode that selection quality measures `model_dir` with: that of the pretrain run whose `model/`
    it is (the run's stage.json beside it), so an eval measures the selection its run trained with, at
    `selection_ratio`; batch (RHO-1's default) for any other model, and for static, which scores by the shards'
    base loss rather than the model."""
    record_file = Path(model_dir).parent / STAGE_FILE
    if not record_file.is_file():
        return "batch"
    record = read_json(record_file)
    mode = ((record.get("config") or {}).get("selection") or {}).get("mode", "batch")
    if record.get("kind") != "pretrain" or mode == "static":
        return "batch"
    return mode


def print_results(model: str, metrics: dict) -> None:
    table = Table(title=f"eval: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "by_kind":
                    table.add_row(f"{key}.{k}", f"{v:.4f}" if isinstance(v, float) else str(v))
        else:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if by_kind := metrics.get("selection", {}).get("by_kind"):
        console.print(kinds_table(by_kind, metrics["selection"]["ratio"]))


def kinds_table(by_kind: dict, ratio: float) -> Table:
    """What the selection keeps, by kind of token: clean, or each kind of noise."""
    table = Table(title=f"selection at ratio {ratio:g}, by kind of token")
    for col in ("kind", "share of tokens", "kept", "reference loss", "model loss", "excess loss"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for name, k in by_kind.items():
        table.add_row(
            name,
            f"{k['share']:.1%}",
            f"{k['kept']:.1%}",
            f"{k['ref_loss']:.2f}",
            f"{k['model_loss']:.2f}",
            f"{k['excess']:+.2f}",
        )
    return table
