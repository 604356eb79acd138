"""`slm reference`: train a causal LM on high-quality text (from sizes or from a checkpoint)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from slm.config import ReferenceConfig
from slm.data.corpus import corpus_fingerprint
from slm.data.packed import packed_corpus
from slm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from slm.models import build_model
from slm.models.checks import check_vocab
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.threads import apply_threads
from slm.training.distributed import rank
from slm.training.loop import Trainer, causal_lm_step
from slm.utils.plots import plot_learning_curves


@locked_stage("reference")
def run(cfg: ReferenceConfig, force: bool = False, resume: bool = True, stop_after: int | None = None) -> dict:
    return train_causal_lm("reference", cfg, force, resume, stop_after)


def train_causal_lm(kind: str, cfg: ReferenceConfig, force: bool, resume: bool, stop_after: int | None) -> dict:
    """Train (or continue) a causal LM on `cfg.corpus`: the body of the `reference` and `finetune` stages."""
    out = Path(cfg.out_dir)
    stage = StageRun(kind, cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]{kind}[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.train.threads, "train.threads")  # before any torch work
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.train.seed)
    check_vocab(model, tokenizer, cfg.tokenizer)
    seq_len = cfg.train.seq_len
    train_rows = packed_corpus(cfg.corpus, tokenizer, cfg.tokenizer, seq_len, out / "data")
    heldout = packed_corpus(cfg.validation, tokenizer, cfg.tokenizer, seq_len, out / "data") if cfg.validation else None
    fingerprints = {
        "config": config_fingerprint(cfg),
        "tokenizer": tokenizer_fingerprint(cfg.tokenizer),
        "data": corpus_fingerprint(cfg.corpus),
    }
    say(
        f"{kind}: {cfg.model.backbone if cfg.model.init_from is None else type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_rows)} rows of {seq_len} tokens"
    )
    step_loss = causal_lm_step
    completions = cfg.corpus.completion_field is not None  # log completion_loss (prompt/completion corpora)
    if cfg.train.prompt_loss_weight != 1.0 or completions:
        step_loss = partial(
            causal_lm_step, prompt_loss_weight=cfg.train.prompt_loss_weight, completion_loss=completions
        )
    trainer = Trainer(
        model, cfg.train, out, train_rows, ("input_ids", "loss_mask"), step_loss, fingerprints, heldout, stop_after
    )
    result = trainer.fit(resume=resume)
    if result.step < cfg.train.max_steps:  # stopped early on purpose (tests)
        return {"status": "stopped", "step": result.step}
    if result.final_heldout is not None:
        say(f"{kind}: {result.heldout_summary()}")
    model_dir = trainer.export(out / "model", tokenizer)
    if rank() == 0:
        plot_learning_curves({kind: result.history}, out / "learning_curve.png")
    metrics = {
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        **result.heldout_metrics(),
        "resumed_from": result.resumed_from,
        **threads,
    }
    return stage.complete(
        fingerprints, metrics, started, {"model": str(model_dir), "metrics": str(out / "metrics.jsonl")}
    )
