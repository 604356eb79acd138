"""`slm data tokenizer`: train a byte-level BPE on the user's own corpus into a transformers tokenizer directory."""

from __future__ import annotations

import time
from pathlib import Path

from slm.config import TokenizerConfig
from slm.data.corpus import corpus_fingerprint
from slm.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_corpus_tokenizer
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say


@locked_stage("tokenizer")
def run(cfg: TokenizerConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("tokenizer", cfg, out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]tokenizer[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    paths = ", ".join(str(c.path) for c in cfg.corpora)
    say(f"tokenizer: training a byte-level BPE of {cfg.vocab_size} tokens on {paths}")
    train_corpus_tokenizer(cfg.corpora, cfg.vocab_size, out)
    tokenizer = load_tokenizer(out)  # what every later stage does with it: AutoTokenizer, EOS checked
    metrics = {"vocab_size": len(tokenizer), "requested_vocab_size": cfg.vocab_size}
    if len(tokenizer) < cfg.vocab_size:
        say(
            f"[yellow]tokenizer[/]: the corpus supports only {len(tokenizer)} tokens (no pair of symbols left to "
            f"merge); vocab_size {cfg.vocab_size} was an upper bound"
        )
    say(f"tokenizer: wrote {out} ({len(tokenizer)} tokens, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r})")
    fingerprints = {
        "config": config_fingerprint(cfg),
        "tokenizer": tokenizer_fingerprint(out),
        "data": [corpus_fingerprint(c) for c in cfg.corpora],
    }
    return stage.complete(fingerprints, metrics, started, {"tokenizer": str(out)})
