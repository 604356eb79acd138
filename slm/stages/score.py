"""`slm score`: reference loss of every token of the training corpus, into Arrow shards.

Shard k holds the documents [k*D, (k+1)*D) packed into rows (D = documents_per_shard), so a
shard's content never depends on how the work is split. Part i of n scores the shards with
k % n == i; inside a part, data-parallel ranks take every world-th of those. Whole shards are
skipped on a rerun; a partial or damaged one is redone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import slm
from slm.config import ScoreConfig
from slm.data.corpus import corpus_fingerprint, load_corpus
from slm.data.packed import iter_documents
from slm.data.packing import pack_documents
from slm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from slm.errors import SlmError
from slm.io import read_json, sha256_file
from slm.models import load_pretrained
from slm.models.checks import check_vocab
from slm.scoring import score_rows, weights_fingerprint
from slm.shards.format import ROW_STRIDE, FORMAT_VERSION, ShardMetadata, shard_name
from slm.shards.manifest import DONE_DIR, MANIFEST, forget_shard, load_manifest, merge_manifest
from slm.shards.writer import ShardWriter
from slm.stages.common import StageRun, say
from slm.training.distributed import all_reduce_sum, barrier, device, init_distributed, rank, world_size
from slm.training.ds_config import resolve_precision


def _load_scorer(path: str, what: str, dtype: torch.dtype, dev: torch.device):
    if not Path(path).is_dir():
        raise SlmError(f"{what} {path!r}: checkpoint directory not found (train it with `slm reference` first)")
    model = load_pretrained(path).to(dev, dtype=dtype)
    model.eval()
    return model


def _check_tokenizer_matches(tokenizer_dir: str, model_dir: str, what: str) -> None:
    """The shards' tokenizer must be the one the model was trained with (when the model ships one)."""
    if (Path(model_dir) / "tokenizer.json").is_file() or (Path(model_dir) / "tokenizer_config.json").is_file():
        mine, theirs = tokenizer_fingerprint(tokenizer_dir), tokenizer_fingerprint(model_dir)
        if mine != theirs:
            raise SlmError(
                f"tokenizer {tokenizer_dir!r} (sha256 {mine[:12]}) is not the tokenizer of {what} {model_dir!r} (sha256 {theirs[:12]})"
            )


def _whole(directory: Path, name: str) -> bool:
    entry = directory / DONE_DIR / f"{name}.json"
    shard = directory / name
    if not (entry.is_file() and shard.is_file()):
        return False
    rec = read_json(entry)
    return shard.stat().st_size == rec["bytes"] and sha256_file(shard) == rec["sha256"]


def my_shards(num_shards: int, part: int, parts: int, rank_: int, world: int) -> list[int]:
    """The shards this (part, rank) scores: k % parts == part, then every world-th of those."""
    of_part = [k for k in range(num_shards) if k % parts == part]
    return of_part[rank_::world]


def run(cfg: ScoreConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    # the config without part/parts: every part of one scoring run shares one stage.json, and the
    # shards do not depend on the split (`slm run` and a `slm jobs` array agree on the record)
    stage = StageRun("score", cfg.model_copy(update={"part": 0, "parts": 1}), out)
    if (done := stage.prepare(force)) is not None:
        say(f"[green]score[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    init_distributed()
    dev = device()
    dtype = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    tokenizer_dir = cfg.tokenizer or cfg.reference
    reference = _load_scorer(cfg.reference, "reference model", dtype, dev)
    tokenizer = load_tokenizer(tokenizer_dir)
    _check_tokenizer_matches(tokenizer_dir, cfg.reference, "reference model")
    check_vocab(reference, tokenizer, tokenizer_dir)
    base = None
    if cfg.base_model:
        base = _load_scorer(cfg.base_model, "base model", dtype, dev)
        _check_tokenizer_matches(tokenizer_dir, cfg.base_model, "base model")
        check_vocab(base, tokenizer, tokenizer_dir)

    corpus = load_corpus(cfg.corpus)
    meta = ShardMetadata(
        format_version=FORMAT_VERSION,
        tokenizer_name=Path(tokenizer_dir).name,
        tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir),
        vocab_size=len(tokenizer),
        seq_len=cfg.seq_len,
        reference_model=str(cfg.reference),
        reference_sha256=weights_fingerprint(cfg.reference),
        corpus_fingerprint=corpus_fingerprint(cfg.corpus),
        slm_version=slm.__version__,
        documents_per_shard=cfg.documents_per_shard,
        base_model=cfg.base_model,
        base_sha256=weights_fingerprint(cfg.base_model) if cfg.base_model else None,
        tokenizer_path=str(Path(tokenizer_dir).resolve()),
    )
    if (out / MANIFEST).is_file():
        existing = load_manifest(out).metadata
        for key in ("tokenizer_sha256", "vocab_size", "seq_len", "reference_sha256", "corpus_fingerprint", "documents_per_shard", "base_sha256"):
            if getattr(existing, key) != getattr(meta, key):
                raise SlmError(f"{out}: holds shards with another {key} ({getattr(existing, key)!s:.16} vs {getattr(meta, key)!s:.16} now); use --force or another out_dir")

    num_shards = math.ceil(len(corpus) / cfg.documents_per_shard)
    todo = my_shards(num_shards, cfg.part, cfg.parts, rank(), world_size())
    writer = ShardWriter(out, meta, with_base=base is not None, with_noise=cfg.corpus.noise_field is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(desc=f"score part {cfg.part}/{cfg.parts} rank {rank()}", unit="tok", unit_scale=True, dynamic_ncols=True)
    skipped = 0
    for k in todo:
        name = shard_name(k)
        if _whole(out, name):
            skipped += 1
            continue
        forget_shard(out, name)
        lo, hi = k * cfg.documents_per_shard, min((k + 1) * cfg.documents_per_shard, len(corpus))
        docs = iter_documents(corpus, tokenizer, cfg.corpus.text_field, cfg.corpus.noise_field, lo, hi)
        rows = pack_documents(docs, cfg.seq_len, tokenizer.eos_token_id, pad_id, whole=cfg.corpus.packing == "whole")
        batches = score_rows(rows, reference, cfg.batch_size, cfg.logprob_chunk_tokens, k * ROW_STRIDE, base, dev, bar.update)
        writer.write(k, batches, extra={"documents": hi - lo, "part": cfg.part})
    bar.close()
    scored_now = int(all_reduce_sum(len(todo) - skipped))
    barrier()
    manifest = merge_manifest(out, meta, num_shards)
    totals = manifest.totals()
    if totals["nan_tokens"]:
        say(f"[yellow]score[/]: {totals['nan_tokens']} token losses were NaN; they are kept as NaN and excluded from selection")
    if not manifest.complete:
        say(f"score: part {cfg.part}/{cfg.parts} done ({len(todo) - skipped} shards scored, {skipped} already whole); {len(manifest.shards)} of {num_shards} shards whole")
        return {"status": "partial", "shards_whole": len(manifest.shards), "num_shards": num_shards}
    fingerprints = {"tokenizer": meta.tokenizer_sha256, "reference": meta.reference_sha256, "data": meta.corpus_fingerprint}
    metrics = {"num_shards": num_shards, "scored_now": scored_now, **totals}
    return stage.complete(fingerprints, metrics, started, {"shards": str(out), "manifest": str(out / MANIFEST)})

