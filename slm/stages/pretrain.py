"""`slm pretrain`: train any registered backbone on token-score shards with the selective loss.

`selection.enabled: false` gives the plain causal-LM baseline with everything else identical.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from slm.config import PretrainConfig
from slm.data.corpus import corpus_fingerprint
from slm.data.packed import packed_corpus
from slm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from slm.errors import SlmError
from slm.models import build_model
from slm.models.checks import check_seq_len, check_vocab
from slm.models.token_loss import token_losses, token_losses_and_entropy
from slm.selection import REFERENCE_FREE, selective_loss
from slm.shards import ShardSet
from slm.shards.checks import check_shards_match, check_something_to_learn
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.threads import apply_threads
from slm.training.distributed import rank
from slm.training.loop import Trainer
from slm.utils.io import sha256_json
from slm.utils.plots import plot_learning_curves


def make_step_loss(cfg: PretrainConfig):
    with_entropy = cfg.selection.enabled and cfg.selection.mode == "self_entropy"

    def step_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
        model = model.module if hasattr(model, "module") else model
        entropy = None
        if with_entropy:  # from the same chunks of logits as the loss
            ce, entropy = token_losses_and_entropy(model, batch["input_ids"])
        else:
            ce = token_losses(model, batch["input_ids"])
        t0 = time.perf_counter()
        sel = selective_loss(
            ce, batch.get("ref_loss"), cfg.selection, batch["loss_mask"], batch.get("base_loss"), entropy
        )
        logs = {**sel.stats(ce), "selection_ms": (time.perf_counter() - t0) * 1e3}
        if "noise" in batch:
            logs.update(sel.noise_measures(batch["noise"]))
        return sel.loss, logs

    return step_loss


def _train_rows(cfg: PretrainConfig, out: Path):
    """The rows to train on, their columns, tokenizer and fingerprints: the shards', or a packed corpus'."""
    if cfg.corpus is not None:  # reference-free: no shards, no reference (PretrainConfig checked the mode)
        tokenizer = load_tokenizer(cfg.tokenizer)
        rows = packed_corpus(cfg.corpus, tokenizer, cfg.tokenizer, cfg.train.seq_len, out / "data")
        fingerprints = {
            "tokenizer": tokenizer_fingerprint(cfg.tokenizer),
            "data": corpus_fingerprint(cfg.corpus),
            "reference": "",
        }
        return rows, ["input_ids", "loss_mask"], tokenizer, cfg.tokenizer, fingerprints
    shards = ShardSet(cfg.shards, verify=cfg.verify_shards)
    tokenizer_dir = cfg.tokenizer or shards.metadata.tokenizer_path
    if not tokenizer_dir:
        raise SlmError(f"{cfg.shards}: shards record no tokenizer path; set tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    check_shards_match(shards, cfg, tokenizer_dir, len(tokenizer))
    check_something_to_learn(shards, cfg)
    # the reference-free modes read no reference loss
    columns = ["input_ids", "loss_mask"] + ([] if cfg.selection.mode in REFERENCE_FREE else ["ref_loss"])
    columns += [c for c in ("base_loss", "noise") if c in shards.columns]
    fingerprints = {
        "tokenizer": shards.metadata.tokenizer_sha256,
        "data": sha256_json({n: e["sha256"] for n, e in shards.manifest.shards.items()}),
        "reference": shards.metadata.reference_sha256,
    }
    return shards, columns, tokenizer, tokenizer_dir, fingerprints


@locked_stage("pretrain")
def run(cfg: PretrainConfig, force: bool = False, resume: bool = True, stop_after: int | None = None) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("pretrain", cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]pretrain[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.train.threads, "train.threads")  # before any torch work
    rows, columns, tokenizer, tokenizer_dir, data_fingerprints = _train_rows(cfg, out)
    model = build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.train.seed)
    check_vocab(model, tokenizer, tokenizer_dir)
    if warning := check_seq_len(model.config, cfg.train.seq_len, "train.seq_len", f"the {cfg.model.backbone} model"):
        say(f"[yellow]pretrain[/]: {warning}")
    heldout = (
        packed_corpus(cfg.validation, tokenizer, tokenizer_dir, cfg.train.seq_len, out / "data")
        if cfg.validation
        else None
    )
    fingerprints = {"config": config_fingerprint(cfg), **data_fingerprints}
    what = (
        f"selective (mode={cfg.selection.mode}, ratio={cfg.selection.ratio})"
        if cfg.selection.enabled
        else "plain causal LM (baseline)"
    )
    say(
        f"pretrain: {cfg.model.backbone if cfg.model.init_from is None else type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{what}, {len(rows)} rows" + (f" of {cfg.corpus.path} (no shards)" if cfg.corpus is not None else "")
    )
    trainer = Trainer(
        model, cfg.train, out, rows, tuple(columns), make_step_loss(cfg), fingerprints, heldout, stop_after
    )
    result = trainer.fit(resume=resume)
    if result.step < cfg.train.max_steps:
        return {"status": "stopped", "step": result.step}
    if result.final_heldout is not None:
        say(f"pretrain: {result.heldout_summary()}")
    model_dir = trainer.export(out / "model", tokenizer)
    if rank() == 0:
        plot_learning_curves({out.name: result.history}, out / "learning_curve.png")
    last = result.history[-1]
    metrics = {
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        **result.heldout_metrics(),
        "resumed_from": result.resumed_from,
        **{k: last[k] for k in ("kept_fraction", "noise_dropped", "kept_clean") if k in last},
        **threads,
    }
    return stage.complete(
        fingerprints, metrics, started, {"model": str(model_dir), "metrics": str(out / "metrics.jsonl")}
    )
