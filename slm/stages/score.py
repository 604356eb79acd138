"""`slm score`: reference loss of every token of the training corpus, into Arrow shards.

Shard k holds the documents [k*D, (k+1)*D) packed into rows (D = documents_per_shard), so a
shard's content never depends on how the work is split. Part i of n scores the shards with
k % n == i; inside a part, data-parallel ranks take every world-th of those (slm.shards.layout).
Whole shards are skipped on a rerun; a partial or damaged one is redone.
"""

from __future__ import annotations

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
from slm.models import load_pretrained
from slm.models.checks import check_seq_len, check_tokenizer_fits, check_tokenizer_matches, check_vocab
from slm.preempt import Interrupted, StopRequest
from slm.shards.format import FORMAT_VERSION, ROW_STRIDE, ShardMetadata
from slm.shards.layout import (
    DONE_DIR,
    MANIFEST,
    drop_dead_temp_files,
    is_whole,
    part_shards,
    shard_count,
    shard_documents,
    shard_name,
    whole_run_config,
)
from slm.shards.manifest import forget_shard, load_manifest, merge_manifest
from slm.shards.scoring import (
    ReferenceSet,
    check_domains,
    entering_references,
    reference_metadata,
    score_rows,
    uses_domains,
    with_entering_references,
)
from slm.shards.writer import ShardWriter
from slm.stages.common import StageRun, locked_stage, say
from slm.threads import apply_threads
from slm.training.distributed import all_reduce_sum, barrier, device, init_distributed, rank, world_size
from slm.training.ds_config import resolve_precision
from slm.utils.io import DiskFull, read_json, weights_fingerprint


def _load_scorer(path: str, what: str, dtype: torch.dtype, dev: torch.device):
    if not Path(path).is_dir():
        raise SlmError(f"{what} {path!r}: checkpoint directory not found (train it with `slm reference` first)")
    model = load_pretrained(path).to(dev, dtype=dtype)
    model.eval()
    return model


def _check_model(model, cfg: ScoreConfig, tokenizer, tokenizer_dir: str, model_dir: str, what: str) -> None:
    proven = check_tokenizer_matches(tokenizer_dir, model_dir, what)
    check_vocab(model, tokenizer, tokenizer_dir)
    if not proven:
        check_tokenizer_fits(model, tokenizer, tokenizer_dir, model_dir, what)
    if warning := check_seq_len(model.config, cfg.seq_len, "seq_len", f"{what} {model_dir!r}"):
        say(f"[yellow]score[/]: {warning}")


def _disk_full(e: DiskFull, out: Path, shards_left: int) -> SlmError:
    """A full disk while scoring: the bytes the shards left to score need (from the whole shards' mean size)."""
    sizes = [read_json(p)["bytes"] for p in (out / DONE_DIR).glob("*.json")]
    per_shard = max(sum(sizes) // len(sizes), e.written) if sizes else e.written
    return SlmError(
        f"{e.path}: no space left on the device ({e.free} bytes free); "
        f"the {shards_left} shard(s) left to score need about "
        f"{per_shard * shards_left} bytes ({per_shard} each{'' if sizes else ' at least'}); "
        f"free space or choose another out_dir, then rerun: whole shards are kept, nothing partial is listed"
    )


def _stop_if_asked(stop: StopRequest, out: Path, name: str, partial: bool) -> None:
    """On a stop request (slm.preempt), `Interrupted` (exit 3) before `name` or, when `partial`, while writing it:
    the writer's atomic_open removes the shard's temp file, so no partial shard exists or is listed."""
    if (why := stop.reason()) is None:
        return
    whole = len(list((out / DONE_DIR).glob("*.json")))
    where = f"while scoring {name} (abandoned: its partial file removed, never listed)" if partial else f"before {name}"
    raise Interrupted(
        f"{out}: stopped by {why} {where}; the {whole} whole shard(s) are kept; rerun the same command (or let Slurm "
        f"requeue the job) to score the rest"
    )


def _until_stopped(batches, stop: StopRequest, out: Path, name: str):
    """`batches`, checking for a stop request before each one is written."""
    for batch in batches:
        _stop_if_asked(stop, out, name, partial=True)
        yield batch


@locked_stage("score")
def run(cfg: ScoreConfig, force: bool = False) -> dict:
    out = Path(cfg.out_dir)
    stage = StageRun("score", whole_run_config(cfg), out)  # every part of one scoring run shares one stage.json
    if (done := stage.prepare(force)) is not None:
        say(f"[green]score[/]: {out} is complete for this config; skipping (use --force to redo)")
        return done
    started = time.time()
    threads = apply_threads(cfg.threads, "threads")  # before any torch work
    init_distributed()
    dev = device()
    dtype = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    specs = cfg.references  # one or several; with several, ref_loss is their combination (slm.shards.scoring)
    tokenizer_dir = cfg.tokenizer or specs[0].path
    references = [_load_scorer(spec.path, "reference model", dtype, dev) for spec in specs]
    tokenizer = load_tokenizer(tokenizer_dir)
    for spec, reference in zip(specs, references):
        _check_model(reference, cfg, tokenizer, tokenizer_dir, spec.path, "reference model")
    base = None
    if cfg.base_model:
        base = _load_scorer(cfg.base_model, "base model", dtype, dev)
        _check_model(base, cfg, tokenizer, tokenizer_dir, cfg.base_model, "base model")

    corpus = load_corpus(cfg.corpus)
    by_domain = uses_domains(specs, cfg.combine)
    if by_domain:  # every document's domain has a reference, before any scoring
        check_domains(corpus, specs, cfg.domain_field, f"corpus.path {cfg.corpus.path!r}")
    meta = ShardMetadata(
        format_version=FORMAT_VERSION,
        tokenizer_name=Path(tokenizer_dir).name,
        tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir),
        vocab_size=len(tokenizer),
        seq_len=cfg.seq_len,
        corpus_fingerprint=corpus_fingerprint(cfg.corpus),
        slm_version=slm.__version__,
        documents_per_shard=cfg.documents_per_shard,
        base_model=cfg.base_model,
        base_sha256=weights_fingerprint(cfg.base_model) if cfg.base_model else None,
        tokenizer_path=str(Path(tokenizer_dir).resolve()),
        **reference_metadata(specs, references, cfg.combine, cfg.domain_field),
    )
    scorer = ReferenceSet(references, cfg.combine)
    if (out / MANIFEST).is_file():
        existing = load_manifest(out).metadata
        for key in (
            "tokenizer_sha256",
            "vocab_size",
            "seq_len",
            "reference_sha256",
            "corpus_fingerprint",
            "documents_per_shard",
            "base_sha256",
        ):
            if getattr(existing, key) != getattr(meta, key):
                raise SlmError(
                    f"{out}: holds shards with another {key} "
                    f"({getattr(existing, key)!s:.16} vs {getattr(meta, key)!s:.16} now); "
                    "use --force or another out_dir"
                )

    num_shards = shard_count(len(corpus), cfg.documents_per_shard)
    todo = part_shards(num_shards, cfg.part, cfg.parts, rank(), world_size())
    drop_dead_temp_files(out, [shard_name(k) for k in todo])
    merge_manifest(out, meta, num_shards)  # from the start, the manifest says which shards are whole so far
    writer = ShardWriter(out, meta, with_base=base is not None, with_noise=cfg.corpus.noise_field is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(desc=f"score part {cfg.part}/{cfg.parts} rank {rank()}", unit="tok", unit_scale=True, dynamic_ncols=True)
    skipped = 0
    with StopRequest() as stop, bar:  # the bar closes before an error is printed
        for i, k in enumerate(todo):
            name = shard_name(k)
            if is_whole(out, name):
                skipped += 1
                continue
            _stop_if_asked(stop, out, name, partial=False)
            forget_shard(out, name)
            lo, hi = shard_documents(k, cfg.documents_per_shard, len(corpus))
            docs = iter_documents(corpus, tokenizer, cfg.corpus.text_field, cfg.corpus.noise_field, lo, hi)
            rows = pack_documents(docs, cfg.seq_len, tokenizer.eos_token_id, pad_id, cfg.corpus.packing)
            if by_domain:
                enters = entering_references(specs, corpus[lo:hi][cfg.domain_field])
                rows = with_entering_references(rows, lo, enters)
            batches = score_rows(
                rows, scorer, cfg.batch_size, cfg.logprob_chunk_tokens, k * ROW_STRIDE, base, dev, bar.update
            )
            try:
                writer.write(
                    k, _until_stopped(batches, stop, out, name), extra={"documents": hi - lo, "part": cfg.part}
                )
                merge_manifest(out, meta, num_shards)  # list each whole shard as it lands
            except DiskFull as e:
                raise _disk_full(e, out, shards_left=len(todo) - i) from None
    scored_now = int(all_reduce_sum(len(todo) - skipped))
    barrier()
    manifest = merge_manifest(out, meta, num_shards)
    totals = manifest.totals()
    if totals["nan_tokens"]:
        say(
            f"[yellow]score[/]: {totals['nan_tokens']} token losses were NaN; "
            "they are kept as NaN and excluded from selection"
        )
    if not manifest.complete:
        say(
            f"score: part {cfg.part}/{cfg.parts} done ({len(todo) - skipped} shards scored, {skipped} already whole); "
            f"{len(manifest.shards)} of {num_shards} shards whole"
        )
        return {"status": "partial", "shards_whole": len(manifest.shards), "num_shards": num_shards}
    fingerprints = {
        "tokenizer": meta.tokenizer_sha256,
        "reference": meta.reference_sha256,
        "data": meta.corpus_fingerprint,
    }
    metrics = {"num_shards": num_shards, "scored_now": scored_now, **totals, **threads}
    return stage.complete(fingerprints, metrics, started, {"shards": str(out), "manifest": str(out / MANIFEST)})
