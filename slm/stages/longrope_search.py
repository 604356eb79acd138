"""`slm analyze longrope-search`: LongRoPE's search of per-dimension RoPE rescale factors (slm.analysis.longrope),
as a stage: the factors as a `model.rope_scaling` file, the whole search in search.json.

Skipped when stage.json records this config, the model's files are unchanged and the factors file is still there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from slm.config import LongRopeSearchConfig
from slm.data.corpus import corpus_fingerprint
from slm.errors import SlmError
from slm.stages.common import StageRun, config_fingerprint, locked_stage, say
from slm.threads import apply_threads
from slm.utils.io import atomic_write_json, checkpoint_identity, sha256_json


def factors_path(cfg: LongRopeSearchConfig) -> Path:
    """Where the factors go: `factors_file` relative to out_dir, or as given when absolute."""
    return Path(os.path.normpath(Path(cfg.out_dir) / cfg.factors_file))


def inputs_fingerprint(cfg: LongRopeSearchConfig) -> str | None:
    """The model's identity (None while it is missing: the search names it)."""
    return sha256_json({"model": checkpoint_identity(cfg.model)}) if Path(cfg.model).is_dir() else None


@locked_stage("longrope_search")
def run(cfg: LongRopeSearchConfig, force: bool = False, progress: bool = True) -> dict:
    import torch

    from slm.analysis.longrope import save_rope_scaling, search_longrope_factors
    from slm.data.packed import packed_corpus
    from slm.data.tokenizer import load_tokenizer
    from slm.models import load_pretrained
    from slm.training.distributed import device

    out = Path(cfg.out_dir)
    stage = StageRun("longrope_search", cfg, out)
    done = stage.prepare(force, inputs_fingerprint(cfg))
    if done is not None and not factors_path(cfg).is_file():
        say(f"longrope_search: {factors_path(cfg)} is gone; searching again")
        done = stage.prepare(True)
    if done is not None:
        say(f"[green]longrope_search[/]: {out} is complete for this config and model; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.threads, "threads")
    tokenizer = load_tokenizer(cfg.model)
    rows = packed_corpus(cfg.data, tokenizer, cfg.model, cfg.target_len, out / "data")
    if len(rows) < 1:
        raise SlmError(f"data {cfg.data.path!r}: not enough text for one row of {cfg.target_len} tokens")
    ids = torch.from_numpy(rows.rows(range(min(cfg.samples, len(rows))), ("input_ids",))["input_ids"]).long()
    net = load_pretrained(cfg.model).float().to(device()).eval()
    original = cfg.original_len or net.config.max_position_embeddings
    say(f"longrope_search: {len(ids)} rows of {cfg.target_len} tokens, extending {original} -> {cfg.target_len}")
    result = search_longrope_factors(
        net,
        ids,
        original,
        cfg.target_len,
        population=cfg.population,
        generations=cfg.generations,
        mutation_prob=cfg.mutation_prob,
        seed=cfg.seed,
        progress=progress,
    )
    atomic_write_json(out / "search.json", result)
    factors = save_rope_scaling(result, factors_path(cfg))
    say(
        f"longrope_search: perplexity at {cfg.target_len}: {result['perplexity']:.3f} "
        f"(PI {result['baselines']['pi']:.3f}); wrote {factors}"
    )
    metrics = {
        "perplexity": result["perplexity"],
        "pi_perplexity": result["baselines"]["pi"],
        "baselines": result["baselines"],
        "evaluations": result["evaluations"],
        "rows": len(ids),
        "original_len": original,
        **threads,
    }
    fingerprints = {"config": config_fingerprint(cfg), "data": corpus_fingerprint(cfg.data)}
    outputs = {"factors": str(factors), "search": str(out / "search.json")}
    return stage.complete(fingerprints, metrics, started, outputs, inputs=inputs_fingerprint(cfg))
