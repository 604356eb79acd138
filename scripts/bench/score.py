"""Throughput and peak memory of `slm score` against the loop a user would write, and against the bare forward.

Set-up (cached in --work-dir): the demo corpus from `slm.data.demo.generate_demo` and a reference model
that is a randomly initialised `llama` (nothing trained: scoring costs the same for any weights) saved
with `save_pretrained`, with the demo tokenizer saved beside it. All methods score the same corpus with
that same checkpoint, in fp32 on CPU, with the same fixed number of torch threads:

  slm    `slm.stages.score.run(ScoreConfig(...), force=True)`: load model and tokenizer, tokenise, pack into
         `--seq-len` rows, `--batch-size` rows per forward, chunked log-probs (`slm.models.token_loss`), Arrow shards
         written atomically with sha256, manifest, stage.json. Everything is timed.
  naive  the loop a user would write with transformers: load model and tokenizer, one document at a time,
         full logits, `F.cross_entropy(reduction="none")`, `.tolist()` into Python lists, then
         `datasets.Dataset.from_dict(...).save_to_disk(...)`. Everything is timed.
  bare   the limit: only the forward passes `model(input_ids=rows, use_cache=False)` (logits included) over the
         rows slm packs, batch by batch with slm's batch size; loading, tokenising and packing are untimed.

Throughput (tokens/s) comes from one process that runs the three methods in turn (`--repeats` rounds, the
order rotating, after a warm-up of each on a few documents); the ratios use each method's best round
(other jobs on a shared machine only ever add time), the median is reported beside it. Peak memory
comes from one fresh process per (method, corpus scale): the RSS high-water mark (`ru_maxrss`) when the
method returns, minus that before it started (libraries imported); the corpus grows 1x, 2x, 4x.

Targets: slm >= 3x naive tokens/s; slm seconds <= 1.25x bare-forward seconds; slm peak memory flat in corpus size.

    python scripts/bench/score.py            # full run
    python scripts/bench/score.py --quick    # smoke check, < 2 minutes
    python scripts/bench/score.py --vocab 32768   # a larger output layer: where chunked log-probs matter
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

SPEEDUP_TARGET, BARE_TARGET, FLAT_TARGET = 3.0, 1.25, 1.2
TEXT_FIELD = "text"


# ----------------------------------------------------------------------------- set-up


def prepare(args) -> dict:
    """Demo corpus, tokenizer and reference checkpoint in args.work_dir (reused when the settings match)."""
    import torch

    from slm.config import DemoDataConfig, ModelConfig
    from slm.data.demo import generate_demo
    from slm.data.tokenizer import load_tokenizer
    from slm.models import build_config, get_backbone

    work = Path(args.work_dir)
    n_docs = args.docs * max(args.scales)
    demo_key = {"train_documents": n_docs, "tokenizer_vocab": args.tokenizer_vocab, "seed": args.seed}
    demo_dir = work / "demo"
    stamp = demo_dir / "bench-settings.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == demo_key):
        shutil.rmtree(demo_dir, ignore_errors=True)
        generate_demo(
            DemoDataConfig(
                out_dir=str(demo_dir),
                seed=args.seed,
                train_documents=n_docs,
                hq_documents=200,
                validation_documents=1,
                questions=1,
                vocab_size=args.tokenizer_vocab,
            ),
            progress=False,
        )
        stamp.write_text(json.dumps(demo_key))
    tokenizer = load_tokenizer(demo_dir / "tokenizer")

    model_key = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "intermediate": args.intermediate,
        "vocab": max(args.vocab, len(tokenizer)),
        "seed": args.seed,
        "demo": demo_key,
    }
    ref_dir = work / "reference"
    stamp = ref_dir / "bench-settings.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == model_key):
        shutil.rmtree(ref_dir, ignore_errors=True)
        torch.manual_seed(args.seed)
        mcfg = ModelConfig(
            backbone="llama",
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            intermediate_size=args.intermediate,
            max_position_embeddings=8192,
        )
        config = build_config(mcfg, model_key["vocab"])
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        model = get_backbone("llama").model_cls(config)
        model.save_pretrained(str(ref_dir))
        tokenizer.save_pretrained(str(ref_dir))
        stamp.write_text(json.dumps(model_key))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ref_dir))
    n_params = None
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    corpus = demo_dir / "train.jsonl"
    # convert the jsonl to the datasets Arrow cache once, here, so that no measurement pays for it
    from slm.config import CorpusConfig
    from slm.data.corpus import load_corpus

    ds = load_corpus(CorpusConfig(path=str(corpus)))
    doc_tokens = tokenizer([ds[i][TEXT_FIELD] for i in range(n_docs)], add_special_tokens=False)["input_ids"]
    per_scale = {s: sum(len(t) for t in doc_tokens[: args.docs * s]) for s in args.scales}
    return {
        "reference": str(ref_dir),
        "corpus": str(corpus),
        "params": n_params,
        "vocab": cfg.vocab_size,
        "tokenizer_vocab": len(tokenizer),
        "doc_tokens_per_scale": per_scale,
        "longest_document_tokens": max(len(t) for t in doc_tokens),
    }


# ----------------------------------------------------------------------------- the three methods


def run_slm(env: dict, n_docs: int, out_dir: str) -> dict:
    from slm.config import CorpusConfig, ScoreConfig
    from slm.stages import score

    cfg = ScoreConfig(
        out_dir=out_dir,
        reference=env["reference"],
        corpus=CorpusConfig(path=env["corpus"], text_field=TEXT_FIELD, max_documents=n_docs),
        seq_len=env["seq_len"],
        batch_size=env["batch_size"],
        documents_per_shard=env["documents_per_shard"],
        logprob_chunk_tokens=env["logprob_chunk_tokens"],
        precision="fp32",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    record = score.run(cfg, force=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": wall, "cpu_seconds": cpu, "tokens": int(record["metrics"]["tokens"])}


def run_naive(env: dict, n_docs: int, out_dir: str) -> dict:
    """What a user writes with transformers and datasets (fp32, no_grad, one document at a time)."""
    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(env["reference"])
    model = AutoModelForCausalLM.from_pretrained(env["reference"]).eval()
    ds = datasets.load_dataset("json", data_files=env["corpus"], split="train").select(range(n_docs))
    all_ids, all_losses, tokens = [], [], 0
    with torch.no_grad():
        for example in ds:
            ids = tokenizer(example[TEXT_FIELD], return_tensors="pt").input_ids
            logits = model(ids).logits
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            all_ids.append(ids[0].tolist())
            all_losses.append([float("nan")] + loss.tolist())
            tokens += ids.shape[1]
    datasets.Dataset.from_dict({"input_ids": all_ids, "ref_loss": all_losses}).save_to_disk(out_dir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": wall, "cpu_seconds": cpu, "tokens": tokens}


def packed_rows(env: dict, n_docs: int):
    """The rows slm scores (same tokenisation and packing), as one [rows, seq_len] tensor, and the token count."""
    import numpy as np
    import torch

    from slm.config import CorpusConfig
    from slm.data.corpus import load_corpus
    from slm.data.packed import iter_documents
    from slm.data.packing import pack_documents
    from slm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(env["reference"])
    corpus = load_corpus(CorpusConfig(path=env["corpus"], text_field=TEXT_FIELD, max_documents=n_docs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = list(
        pack_documents(iter_documents(corpus, tokenizer, TEXT_FIELD), env["seq_len"], tokenizer.eos_token_id, pad)
    )
    ids = torch.from_numpy(np.array([r.input_ids for r in rows], dtype=np.int64))
    return ids, int(sum(sum(r.loss_mask) for r in rows))


def run_bare(env: dict, n_docs: int, out_dir: str, model=None, rows=None) -> dict:
    import torch

    from slm.models import load_pretrained

    model = model if model is not None else load_pretrained(env["reference"]).eval()
    ids, tokens = rows if rows is not None else packed_rows(env, n_docs)
    bs = env["batch_size"]
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, ids.shape[0], bs):
            model(input_ids=ids[start : start + bs], use_cache=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": wall, "cpu_seconds": cpu, "tokens": tokens}


METHODS = {"slm": run_slm, "naive": run_naive, "bare": run_bare}


# ----------------------------------------------------------------------------- child processes


def worker_throughput(spec: dict) -> dict:
    """One process, the three methods in turn: warm-up, then `repeats` rounds in rotating order."""
    from slm.models import load_pretrained

    env, n_docs, repeats = spec["env"], spec["docs"], spec["repeats"]
    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-score-", dir=spec["work_dir"]))
    try:
        warm = max(2, min(8, n_docs))
        for name, fn in METHODS.items():  # imports, first-call allocations, the process group of slm score
            fn(env, warm, str(tmp / f"warm-{name}"))
        # bare: the model and packed rows are prepared once, outside the timing
        bare_model, bare_rows = load_pretrained(env["reference"]).eval(), packed_rows(env, n_docs)
        order = ["bare", "slm", "naive"]
        rounds: dict[str, list[dict]] = {k: [] for k in order}
        for r in range(repeats):
            for name in order[r % 3 :] + order[: r % 3]:
                out = str(tmp / f"{name}-{r}")
                if name == "bare":
                    res = run_bare(env, n_docs, out, bare_model, bare_rows)
                else:
                    res = METHODS[name](env, n_docs, out)
                res["load_average"] = _util.load_average()
                rounds[name].append(res)
                shutil.rmtree(out, ignore_errors=True)
                gc.collect()
        return {"rounds": rounds}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def worker_memory(spec: dict) -> dict:
    """One method at one corpus scale in a fresh process: RSS high-water before and after."""
    env, name, n_docs = spec["env"], spec["method"], spec["docs"]
    if (
        name == "slm"
    ):  # the process group of `slm score` (DeepSpeed import, gloo) belongs to the process, not the corpus
        from slm.training.distributed import init_distributed

        init_distributed()
    gc.collect()
    base = _util.maxrss_mb()
    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-score-", dir=spec["work_dir"]))
    try:
        res = METHODS[name](env, n_docs, str(tmp / "out"))
    finally:
        peak = _util.maxrss_mb()
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(
        peak_rss_mb=round(peak, 1),
        baseline_rss_mb=round(base, 1),
        peak_delta_mb=round(peak - base, 1),
        load_average=_util.load_average(),
    )
    return res


# ----------------------------------------------------------------------------- parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: tiny corpus and model, scales 1 2, one round")
    p.add_argument("--docs", type=int, default=40, help="documents of the demo training corpus at scale 1x")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="corpus sizes for the memory measurement")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds of the throughput measurement (best and median reported)"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument(
        "--vocab",
        type=int,
        default=2048,
        help="the reference model's vocabulary (>= the tokenizer's; larger shows chunked log-probs)",
    )
    p.add_argument("--tokenizer-vocab", type=int, default=2048, help="vocabulary of the demo BPE tokenizer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--documents-per-shard", type=int, default=1000)
    p.add_argument("--logprob-chunk-tokens", type=int, default=8192)
    p.add_argument("--memory-methods", nargs="+", default=["slm", "naive"], choices=sorted(METHODS))
    p.add_argument("--threads", type=int, default=2, help="torch threads, fixed for every method")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget-s", type=float, default=900.0, help="time limit of one measurement process")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "slm-bench-score")
    p.add_argument("--out", type=Path, default=_util.RESULTS_DIR / "score.json")
    args = p.parse_args()
    if args.quick:
        defaults = {k: p.get_default(k) for k in ("docs", "scales", "repeats", "hidden", "intermediate")}
        quick = {"docs": 6, "scales": [1, 2], "repeats": 1, "hidden": 128, "intermediate": 344}
        for k, v in quick.items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    args.scales = sorted(set(args.scales))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # every process reads the corpus through the same datasets cache, inside the work directory
    env_extra = {"HF_DATASETS_CACHE": str(args.work_dir / "hf-datasets")}
    _util.start_workers(
        args.threads, ["torch", "transformers", "datasets", "deepspeed", "slm.models", "slm.stages.score"], env_extra
    )
    _util.set_threads(args.threads)

    from rich.console import Console

    console = Console()
    started = time.time()
    info = _util.machine_info(args.threads)
    console.print("[bold]score[/]: preparing the demo corpus and the reference model ...")
    prep = prepare(args)
    env = {
        "reference": prep["reference"],
        "corpus": prep["corpus"],
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "documents_per_shard": args.documents_per_shard,
        "logprob_chunk_tokens": args.logprob_chunk_tokens,
    }
    console.print(
        f"  reference: llama, {prep['params']:,} parameters, vocab {prep['vocab']}; corpus 1x = {args.docs} documents, "
        f"{prep['doc_tokens_per_scale'][args.scales[0]]:,} tokens; threads {args.threads}"
    )

    console.print(
        f"  throughput: one process, {args.repeats} round(s) of bare / slm / naive "
        f"over {args.docs * args.scales[0]} documents ..."
    )
    spec = {"env": env, "docs": args.docs * args.scales[0], "repeats": args.repeats, "work_dir": str(args.work_dir)}
    tp = _util.run_worker(worker_throughput, spec, args.threads, args.budget_s * 3)
    if tp.get("status") != "ok":
        console.print(f"[red]throughput measurement {tp['status']}[/]: {tp.get('reason')}\n{tp.get('traceback', '')}")
        sys.exit(1)
    throughput = {}
    for name, rounds in tp["rounds"].items():
        secs = [r["seconds"] for r in rounds]
        best, med = min(secs), statistics.median(secs)
        tokens = rounds[0]["tokens"]
        throughput[name] = {
            "tokens": tokens,
            "seconds_best": round(best, 3),
            "seconds_median": round(med, 3),
            "seconds_all": [round(s, 3) for s in secs],
            "cpu_seconds_all": [round(r["cpu_seconds"], 3) for r in rounds],
            "tokens_per_s": round(tokens / best, 1),
            "tokens_per_s_median": round(tokens / med, 1),
            "load_average": [r["load_average"] for r in rounds],
        }
        console.print(
            f"    {name:6s} {tokens:,} tokens, best {best:6.2f} s ({tokens / best:7,.0f} tok/s), median {med:6.2f} s "
            f"(rounds: {', '.join(f'{s:.2f}' for s in secs)})"
        )
    # best-of-rounds: on a shared machine other jobs only ever add time, so the fastest round is the least disturbed one
    speedup = throughput["slm"]["tokens_per_s"] / throughput["naive"]["tokens_per_s"]
    vs_bare = throughput["slm"]["seconds_best"] / throughput["bare"]["seconds_best"]
    speedup_med = throughput["slm"]["tokens_per_s_median"] / throughput["naive"]["tokens_per_s_median"]
    vs_bare_med = throughput["slm"]["seconds_median"] / throughput["bare"]["seconds_median"]

    console.print(f"  memory: one fresh process per (method, scale) for {args.memory_methods} x {args.scales} ...")
    memory: dict[str, dict[str, dict]] = {m: {} for m in args.memory_methods}
    for m in args.memory_methods:
        for s in args.scales:
            spec = {"env": env, "method": m, "docs": args.docs * s, "work_dir": str(args.work_dir)}
            r = _util.run_worker(worker_memory, spec, args.threads, args.budget_s)
            memory[m][f"{s}x"] = r
            if r.get("status") == "ok":
                console.print(
                    f"    {m:6s} {s}x: peak {r['peak_rss_mb']:8.1f} MiB "
                    f"(+{r['peak_delta_mb']:.1f} over {r['baseline_rss_mb']:.1f}), "
                    f"{r['tokens']:,} tokens, {r['tokens'] / r['seconds']:,.0f} tok/s"
                )
            else:
                console.print(f"    {m:6s} {s}x: {r['status']}: {r.get('reason')}")
    flat = {}
    lo, hi = f"{args.scales[0]}x", f"{args.scales[-1]}x"
    for m in args.memory_methods:
        a, b = memory[m].get(lo, {}), memory[m].get(hi, {})
        if a.get("status") == "ok" and b.get("status") == "ok" and lo != hi:
            ratio = b["peak_delta_mb"] / max(a["peak_delta_mb"], 1e-9)
            flat[m] = {
                "scales": [lo, hi],
                "peak_delta_ratio": round(ratio, 3),
                "flat": ratio <= FLAT_TARGET,
                "peak_rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
            }

    info["load_average_at_end"] = _util.load_average()
    public = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "benchmark": "score",
        "description": __doc__.split("\n\n")[0],
        "machine": info,
        "settings": public,
        "reference_model": {
            "backbone": "llama (random init)",
            "params": prep["params"],
            "vocab": prep["vocab"],
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "intermediate": args.intermediate,
        },
        "corpus": {
            "documents_1x": args.docs,
            "document_tokens_per_scale": prep["doc_tokens_per_scale"],
            "longest_document_tokens": prep["longest_document_tokens"],
            "tokenizer_vocab": prep["tokenizer_vocab"],
        },
        "throughput": throughput,
        "ratios": {
            "statistic": "best of the rounds (median beside it)",
            "slm_vs_naive_tokens_per_s": round(speedup, 3),
            "slm_vs_naive_pass": speedup >= SPEEDUP_TARGET,
            "slm_seconds_vs_bare_seconds": round(vs_bare, 3),
            "slm_vs_bare_pass": vs_bare <= BARE_TARGET,
            "median_slm_vs_naive_tokens_per_s": round(speedup_med, 3),
            "median_slm_seconds_vs_bare_seconds": round(vs_bare_med, 3),
        },
        "memory": memory,
        "memory_flat": {
            "definition": f"peak_delta_mb at {hi} <= {FLAT_TARGET}x that at {lo} "
            "(delta = RSS high-water after - before the method, fresh process)",
            "per_method": flat,
        },
        "targets": {
            "slm_vs_naive": f">= {SPEEDUP_TARGET}x tokens/s",
            "slm_vs_bare": f"slm seconds <= {BARE_TARGET}x bare-forward seconds",
            "memory": "flat in corpus size",
        },
        "seconds_total": round(time.time() - started, 1),
    }
    _util.write_json(args.out, report)

    headers = ["method", "tokens", "seconds (best)", "tokens/s (best)", "tokens/s (median)", "vs slm"] + [
        f"peak MiB {s}x (+Δ)" for s in args.scales
    ]
    rows = []
    for name in ("slm", "naive", "bare"):
        t = throughput[name]
        row = [
            name,
            f"{t['tokens']:,}",
            _util.fmt(t["seconds_best"], 2),
            f"{t['tokens_per_s']:,.0f}",
            f"{t['tokens_per_s_median']:,.0f}",
            f"{t['tokens_per_s'] / throughput['slm']['tokens_per_s']:.2f}x",
        ]
        for s in args.scales:
            r = memory.get(name, {}).get(f"{s}x")
            row.append(
                f"{r['peak_rss_mb']:,.0f} (+{r['peak_delta_mb']:,.0f})"
                if r and r.get("status") == "ok"
                else (r["status"] if r else "-")
            )
        rows.append(row)
    _util.print_table(
        f"slm score vs naive loop vs bare forward (llama {prep['params'] / 1e6:.1f}M params, vocab {prep['vocab']}, "
        f"{args.threads} threads)",
        headers,
        rows,
    )
    print()
    print(_util.markdown_table(headers, rows))
    print()
    print(
        f"- slm / naive tokens/s: {speedup:.2f}x best-of-{args.repeats} ({speedup_med:.2f}x median) "
        f"(target >= {SPEEDUP_TARGET}x): "
        f"{'pass' if speedup >= SPEEDUP_TARGET else 'FAIL'}"
    )
    print(
        f"- slm seconds / bare-forward seconds: {vs_bare:.2f}x best-of-{args.repeats} ({vs_bare_med:.2f}x median) "
        f"(target <= {BARE_TARGET}x): "
        f"{'pass' if vs_bare <= BARE_TARGET else 'FAIL'}"
    )
    for m, f in flat.items():
        print(
            f"- {m} peak memory {f['scales'][1]} / {f['scales'][0]} (delta over baseline): "
            f"{f['peak_delta_ratio']:.2f}x "
            f"(flat target <= {FLAT_TARGET}x): {'pass' if f['flat'] else 'FAIL'}"
        )
    print(f"\nwrote {args.out} in {report['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
