"""Training throughput of `slm pretrain`'s step against the bare PyTorch loop (the limit) and the transformers Trainer.

Every method trains the same model on the same batches, one fresh process per (method, backbone)
(`--worker METHOD BACKBONE` re-invokes this script), fp32 on CPU with a fixed torch thread count:

  model    `slm.models.build_model(ModelConfig(backbone=B, hidden_size=128, num_layers=4, num_heads=4,
           intermediate_size=384, options=SEGMENT_OPTIONS[B]), vocab_size=2048, seed=0)` for B in llama, infini,
           megalodon, fam, beacon (the options of tests/test_pretrain_eval.py with segment/chunk/block/window 64).
  data     (W + N + P + 1) x micro-batch rows of `--seq` random token ids (numpy seed `--seed`), a random ref_loss
           per token (uniform in [0.5, 1.5] x ln(vocab), NaN at position 0) and loss_mask 1. Step k of every
           method trains on the micro-batch that slm's `DeterministicLoader` gives step k, so all see the same rows
           in the same order.
  steps    W warm-up optimizer steps (`--warmup`), then N timed steps (`--steps`); median and mean step time,
           tokens/s = micro-batch x seq / median step time.
  rounds   every method runs `--rounds` times per backbone (default 2), the order reversed in every other round
           (bare, hf_trainer, slm_zero0, slm_zero2, then slm_zero2, ..., bare), and each method's timed steps of all
           rounds are pooled: on a shared machine a load that rises during the measurement otherwise lands on the
           methods measured last (the first run of this benchmark measured slm 1.02x bare for llama, the first
           backbone, and 1.13-1.62x for the streaming ones while the load average went from 0.0 to 2.7).

Methods:
  bare        the limit, a plain PyTorch loop over the same HF model: `model(input_ids).logits` (full logits),
              `F.cross_entropy` on the shifted logits, `loss.backward()`, `clip_grad_norm_(1.0)`,
              `torch.optim.AdamW(lr, betas=(0.9, 0.95), weight_decay=0.1)`, `zero_grad(set_to_none=True)`.
  hf_trainer  `transformers.Trainer` with `TrainingArguments(use_cpu=True, per_device_train_batch_size=B,
              max_steps=W+N, optim="adamw_torch", max_grad_norm=1.0, train_sampling_strategy="sequential", no
              logging/saving/eval)` on a `datasets.Dataset` of the same rows with labels = input_ids; a step is the
              time between consecutive `on_step_end` callbacks (its data loader, collator and bookkeeping included;
              `on_step_begin` -> `on_step_end` is kept beside it).
  slm_zero0   slm's real loop: `slm.training.loop.Trainer(...).fit()` (it calls `init_distributed()` and
  slm_zero2   `deepspeed.initialize(model, parameter_groups(model, cfg.optim), deepspeed_config(cfg, world_size()))`
              itself) with ZeRO stage 0 or 2, fp32, grad_accum 1, the step loss of `slm pretrain`
              (`slm.stages.pretrain.make_step_loss`: `token_losses`, `selective_loss(mode=batch, ratio=0.6)`, `.stats`),
              over an in-memory row source that `DeterministicLoader` reads as it reads shards. Per micro-step
              fit runs: batch to device, `.long()`, step loss (under DeepSpeed's autocast), `engine.backward`,
              `engine.step`, the detached loss kept on the device (no host sync); per step: skipped-step check,
              record, tqdm; every `log_every` steps (and before a checkpoint) one read of the pending losses and
              extras, which is the non-finite guard, the metrics.jsonl lines and gate stats. A step is the time
              between consecutive `engine.step()` returns; `stop_after` ends the run before any checkpoint or export
              (those are periodic, not per step, and are not measured). Timing wrappers (perf_counter) around the
              step loss, `engine.backward`, `engine.allreduce_gradients`, `engine.step` and the inner torch AdamW's
              `step` split the step into sections; the rest of the step interval is the loop's own work (data,
              records, the interval's read, metrics).

Profile: `bare` and `slm_zero0` run P more steps (`--profile-steps`) after the timed ones under torch.profiler;
the per-step self CPU time of each op is compared and the ops where slm spends the most extra are printed, beside
the section table (forward+loss, backward, optimizer, other).

MFU = model FLOPs per token x tokens/s / peak FLOP/s, with
    FLOPs/token = 6 x N + 12 x n_layers x hidden x context
N = parameters that enter a matrix product per token: all but the input embedding table (the output projection is
counted once even when tied to it); context = seq for llama, the local attention span (segment/chunk/block/window
length) for the streaming backbones (their memory, FAM and beacon reads are not counted, so their MFU is a slight
underestimate). Peak is measured here, in its own process with the same thread count: the best of several
n x n fp32 matrix products (2 n^3 FLOPs each, `--peak-n`). On a GPU the peak is `--peak-tflops` (989 dense bf16, H100).

Target on CPU: slm step time <= 1.1x the bare loop's step time (median).

    python scripts/bench/train_throughput.py                 # every backbone, every method (long: minutes per backbone)
    python scripts/bench/train_throughput.py --quick         # smoke check: llama, tiny model, W=1 N=3
    python scripts/bench/train_throughput.py --backbones llama infini --methods bare slm_zero0 --steps 10
    python scripts/bench/train_throughput.py --device-script # print the short GPU script (llama ~1B bf16, seq 2048)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

BACKBONES = ("llama", "infini", "megalodon", "fam", "beacon")
METHODS = ("bare", "hf_trainer", "slm_zero0", "slm_zero2")
PROFILED = ("bare", "slm_zero0")
# tests/test_pretrain_eval.py SEGMENT_OPTIONS with the segment (local span / state update unit) at 64 instead of 16
SEGMENT_OPTIONS = {
    "llama": {},
    "infini": {"segment_len": 64},
    "megalodon": {"chunk_len": 64, "cema_ndim": 4, "norm_num_groups": 4},
    "fam": {"block_len": 64, "fam_len": 4},
    "beacon": {"window_len": 64, "condensing_ratio": 4},
}
SPAN_KEY = {"infini": "segment_len", "megalodon": "chunk_len", "fam": "block_len", "beacon": "window_len"}
TARGET = 1.1
H100_BF16_DENSE_TFLOPS = 989.0


# ----------------------------------------------------------------------------- shared set-up (every worker)


def model_config(args, backbone: str):
    from slm.config import ModelConfig

    options = {
        k: (args.segment if k == SPAN_KEY.get(backbone) and args.segment else v)
        for k, v in SEGMENT_OPTIONS[backbone].items()
    }
    return ModelConfig(
        backbone=backbone,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(8192, args.seq),
        tie_embeddings=args.tie,
        options=options,
    )


def build(args, backbone: str, dev):
    import torch

    from slm.models import build_model

    if dev.type == "cuda":
        with torch.device(dev):  # initialise on the GPU: a 1B model's init on the host takes long
            return build_model(model_config(args, backbone), vocab_size=args.vocab, seed=args.model_seed)
    return build_model(model_config(args, backbone), vocab_size=args.vocab, seed=args.model_seed)


def model_flops(model, args, backbone: str) -> dict:
    """FLOPs per token = 6 N + 12 L H context (see the module docstring)."""
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    tied = emb.data_ptr() == out.data_ptr()
    n = total - emb.numel() + (out.numel() if tied else 0)
    span = getattr(model.config, SPAN_KEY[backbone]) if backbone in SPAN_KEY else args.seq
    context = min(args.seq, int(span))
    per_token = 6 * n + 12 * args.layers * args.hidden * context
    return {
        "params": total,
        "matmul_params": n,
        "tied_embeddings": tied,
        "context": context,
        "flops_per_token": per_token,
    }


class ArrayRows:
    """Training rows held in memory, read by slm's DeterministicLoader as it reads a ShardSet
    (`__len__`, `rows(indices, columns)` -> dict of numpy arrays, `seq_len`)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.seq_len = arrays["input_ids"].shape[1]

    def __len__(self) -> int:
        return self.arrays["input_ids"].shape[0]

    def rows(self, indices, columns):
        return {c: self.arrays[c][indices] for c in columns}


COLUMNS = ("input_ids", "ref_loss", "loss_mask")


def make_rows(args) -> ArrayRows:
    import numpy as np

    n_rows = (args.warmup + args.steps + args.profile_steps + 1) * args.batch
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, args.vocab, size=(n_rows, args.seq), dtype=np.int32)
    ln_v = math.log(args.vocab)
    ref = rng.uniform(0.5 * ln_v, 1.5 * ln_v, size=(n_rows, args.seq)).astype(np.float32)
    ref[:, 0] = np.nan  # no context at position 0 (the shards' alignment)
    return ArrayRows({"input_ids": ids, "ref_loss": ref, "loss_mask": np.ones((n_rows, args.seq), dtype=np.int8)})


def loader_batches(args, source: ArrayRows, n_steps: int) -> list[dict]:
    """The micro-batch of each step, in the order slm's loop trains on them (its loader, its seed)."""
    from slm.training.loader import DeterministicLoader

    loader = DeterministicLoader(source, args.batch, 1, 0, 1, args.train_seed, COLUMNS)
    return [loader.micro_batches(s)[0] for s in range(n_steps)]


def _now(dev) -> float:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)
    return time.perf_counter()


class Sections:
    """Seconds per named section, per step, from perf_counter wrappers (CPU only: on a GPU the calls are async)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, name: str, fn):
        import torch

        if not self.enabled:
            return fn

        def timed(*a, **kw):
            with torch.profiler.record_function(f"bench::{name}"):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    self.add(name, time.perf_counter() - t)

        return timed

    def close_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}


def profiled_steps(args) -> int:
    """Steps run under the profiler after the timed ones (the rows are made for them either way, so that every
    process trains on the same rows in the same order)."""
    return args.profile_steps if args.profile else 0


class StepProfiler:
    """torch.profiler over the P steps after the timed ones; per-step self CPU time of each op."""

    def __init__(self, args, first: int):
        self.steps = profiled_steps(args)
        self.first, self.last, self.prof = first, first + self.steps, None

    def after_step(self, done: int) -> None:
        """Call after optimizer step number `done` (1-based) finished."""
        import torch

        if not self.steps:
            return
        if done == self.first:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
        elif done == self.last and self.prof is not None:
            self.prof.stop()

    def table(self, top: int = 60) -> dict | None:
        if self.prof is None:
            return None
        rows = []
        for e in self.prof.key_averages():
            rows.append(
                (
                    e.key,
                    e.self_cpu_time_total / 1e3 / self.steps,
                    e.count / self.steps,
                    e.cpu_time_total / 1e3 / self.steps,
                )
            )
        rows.sort(key=lambda r: -r[1])
        return {
            "steps": self.steps,
            "unit": "ms and calls per step",
            "ops": {
                k: {"self_ms": round(s, 4), "calls": round(c, 2), "total_ms": round(t, 4)} for k, s, c, t in rows[:top]
            },
            "self_ms_all_ops": round(sum(r[1] for r in rows), 3),
        }


def timing_summary(step_seconds: list[float], args, flops: dict, peak: float | None) -> dict:
    med, mean = statistics.median(step_seconds), statistics.fmean(step_seconds)
    tokens = args.batch * args.seq
    tps = tokens / med
    return {
        "step_seconds": [round(s, 5) for s in step_seconds],
        "step_ms_median": round(med * 1e3, 3),
        "step_ms_mean": round(mean * 1e3, 3),
        "step_ms_min": round(min(step_seconds) * 1e3, 3),
        "tokens_per_step": tokens,
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_mean": round(tokens / mean, 1),
        "model_tflops_per_s": round(flops["flops_per_token"] * tps / 1e12, 6),
        "mfu": round(flops["flops_per_token"] * tps / peak, 5) if peak else None,
    }


def median_sections(sections: Sections, first: int, count: int) -> dict[str, float]:
    steps = sections.steps[first : first + count]
    names = sorted({k for s in steps for k in s})
    return {k: round(statistics.median(s.get(k, 0.0) for s in steps) * 1e3, 3) for k in names}


# ----------------------------------------------------------------------------- workers


def worker_peak(args, dev) -> dict:
    import torch

    if dev.type == "cuda":
        n, dtype = max(args.peak_n, 8192), torch.bfloat16
    else:
        n, dtype = args.peak_n, torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    times, spent = [], 0.0
    while len(times) < 3 or (spent < args.peak_seconds and len(times) < 20):
        t = _now(dev)
        a @ b
        dt = _now(dev) - t
        times.append(dt)
        spent += dt
    flops = 2 * n**3
    best = flops / min(times)
    return {
        "n": n,
        "dtype": str(dtype),
        "repeats": len(times),
        "best_flops": best,
        "median_flops": flops / statistics.median(times),
        "gflops_best": round(best / 1e9, 2),
        "gflops_median": round(flops / statistics.median(times) / 1e9, 2),
    }


def worker_bare(args, backbone: str, dev, peak) -> dict:
    import torch
    import torch.nn.functional as F

    total = args.warmup + args.steps + profiled_steps(args)
    batches = loader_batches(args, make_rows(args), total)
    model = build(args, backbone, dev)
    model = model.float().to(dev).train()
    flops = model_flops(model, args, backbone)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sec = Sections(enabled=dev.type == "cpu")
    forward = sec.wrap("forward (full logits)", lambda ids: model(input_ids=ids, use_cache=False).logits)
    cross_entropy = sec.wrap(
        "cross_entropy",
        lambda logits, ids: F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        ),
    )
    backward = sec.wrap("backward", lambda loss: loss.backward())
    clip = sec.wrap("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    adamw = sec.wrap("AdamW.step", opt.step)
    zero = sec.wrap("zero_grad", lambda: opt.zero_grad(set_to_none=True))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and args.precision == "bf16")
    prof = StepProfiler(args, args.warmup + args.steps)
    marks, losses = [_now(dev)], []
    for i in range(total):
        ids = batches[i]["input_ids"].to(dev).long()
        with autocast:
            logits = forward(ids)
            loss = cross_entropy(logits, ids)
        backward(loss)
        clip()
        adamw()
        zero()
        del logits
        marks.append(_now(dev))
        sec.close_step()
        losses.append(loss.detach())
        prof.after_step(i + 1)
    intervals = [b - a for a, b in itertools.pairwise(marks)]
    out = timing_summary(intervals[args.warmup : args.warmup + args.steps], args, flops, peak)
    out.update(
        flops=flops,
        losses=[round(float(x), 4) for x in losses],
        sections_ms=median_sections(sec, args.warmup, args.steps) if sec.enabled else None,
        profile=prof.table(),
    )
    return out


def worker_hf_trainer(args, backbone: str, dev, peak) -> dict:
    import datasets
    import numpy as np
    import torch
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    total = args.warmup + args.steps
    batches = loader_batches(args, make_rows(args), total)
    ids = np.concatenate([b["input_ids"].numpy() for b in batches]).astype(np.int64)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = build(args, backbone, dev).float().train()
    flops = model_flops(model, args, backbone)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, targs, state, control, **kw):
            self.begin.append(_now(dev))

        def on_step_end(self, targs, state, control, **kw):
            self.end.append(_now(dev))

    clock = Clock()
    out_dir = tempfile.mkdtemp(prefix="slm-bench-hf-")
    targs = TrainingArguments(
        output_dir=out_dir,
        use_cpu=dev.type == "cpu",
        per_device_train_batch_size=args.batch,
        max_steps=total,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**9,
        dataloader_num_workers=0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        learning_rate=args.lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.1,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=args.train_seed,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        bf16=dev.type == "cuda" and args.precision == "bf16",
    )
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator, callbacks=[clock])
    result = trainer.train()
    ends = clock.end
    intervals = [b - a for a, b in itertools.pairwise(ends)]  # step k = end(k-1) -> end(k), k >= 1
    timed = intervals[args.warmup - 1 : args.warmup - 1 + args.steps]
    inside = [e - b for b, e in zip(clock.begin, clock.end)][args.warmup : args.warmup + args.steps]
    out = timing_summary(timed, args, flops, peak)
    out.update(
        flops=flops,
        step_ms_begin_to_end_median=round(statistics.median(inside) * 1e3, 3),
        train_loss=round(float(result.training_loss), 4),
        torch_threads_at_end=torch.get_num_threads(),
    )
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def worker_slm(args, backbone: str, dev, peak, zero: int) -> dict:
    import torch

    from slm.config import OptimConfig, PretrainConfig, SelectionConfig, TrainConfig
    from slm.stages.pretrain import make_step_loss
    from slm.training.loop import Trainer

    total = args.warmup + args.steps + profiled_steps(args)
    source = make_rows(args)
    model = build(args, backbone, dev)
    flops = model_flops(model, args, backbone)
    out_dir = Path(tempfile.mkdtemp(prefix=f"slm-bench-train-{backbone}-z{zero}-"))
    train = TrainConfig(
        seq_len=args.seq,
        micro_batch_size=args.batch,
        grad_accum=1,
        max_steps=total + 1,
        zero_stage=zero,
        precision=args.precision,
        seed=args.train_seed,
        checkpoint_every=10**9,
        eval_every=10**9,
        optim=OptimConfig(lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0),
    )
    cfg = PretrainConfig(
        out_dir=str(out_dir),
        shards=str(out_dir),
        model=model_config(args, backbone),
        train=train,
        selection=SelectionConfig(mode="batch", ratio=0.6),
    )
    sec = Sections(enabled=dev.type == "cpu")
    step_loss = make_step_loss(cfg)  # what `slm pretrain` hands the Trainer

    def timed_step_loss(m, batch):
        t = time.perf_counter()
        with torch.profiler.record_function("bench::step_loss"):
            loss, logs = step_loss(m, batch)
        if sec.enabled:
            sel = logs.get("selection_ms", 0.0) / 1e3
            sec.add("forward + chunked CE (token_losses)", time.perf_counter() - t - sel)
            sec.add("selective_loss + stats", sel)
        return loss, logs

    # stop_after = total: the run ends after the last profiled step, before the checkpoint/export of max_steps
    trainer = Trainer(model, train, out_dir, source, COLUMNS, timed_step_loss, {}, None, stop_after=total)
    engine = trainer.engine
    inner = engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer  # ZeRO-2's DeepSpeedZeroOptimizer wraps the torch AdamW
    if isinstance(inner, torch.optim.Optimizer):
        inner.step = sec.wrap("AdamW.step (inner torch optimizer)", inner.step)
    engine.allreduce_gradients = sec.wrap("engine.allreduce_gradients", engine.allreduce_gradients)
    engine.backward = sec.wrap("engine.backward", engine.backward)
    prof = StepProfiler(args, args.warmup + args.steps)
    marks: list[float] = []
    real_step = engine.step

    def timed_step(*a, **kw):
        with torch.profiler.record_function("bench::engine.step"):
            t = time.perf_counter()
            r = real_step(*a, **kw)
            if sec.enabled:
                sec.add("engine.step", time.perf_counter() - t)
        marks.append(_now(dev))
        sec.close_step()
        prof.after_step(len(marks))
        return r

    engine.step = timed_step
    marks_start = _now(dev)
    result = trainer.fit(resume=False)
    intervals = [b - a for a, b in zip([marks_start] + marks, marks)]
    out = timing_summary(intervals[args.warmup : args.warmup + args.steps], args, flops, peak)
    sections = None
    if sec.enabled:
        sections = median_sections(sec, args.warmup, args.steps)
        # nested wrappers: split the outer sections into their own parts
        if "engine.allreduce_gradients" in sections and "engine.backward" in sections:
            sections["autograd backward (engine.backward - allreduce)"] = round(
                sections["engine.backward"] - sections["engine.allreduce_gradients"], 3
            )
        if "AdamW.step (inner torch optimizer)" in sections and "engine.step" in sections:
            sections["engine.step - AdamW (clip, scheduler, zero_grad, ZeRO copies)"] = round(
                sections["engine.step"] - sections["AdamW.step (inner torch optimizer)"], 3
            )
    hist = result.history
    out.update(
        flops=flops,
        zero_stage=zero,
        steps_run=result.step,
        losses=[round(h["loss"], 4) for h in hist],
        kept_fraction=[round(h.get("kept_fraction", float("nan")), 4) for h in hist[:3]],
        sections_ms=sections,
        profile=prof.table(),
        attn_implementation=getattr(engine.module.config, "_attn_implementation", None),
        optimizer=type(engine.optimizer).__name__,
        inner_optimizer=type(inner).__name__,
    )
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def run_worker_here(args) -> None:
    """`--worker METHOD BACKBONE`: one measurement in this (fresh) process; the result goes to --result-file."""
    import torch

    _util.set_threads(args.threads)
    method, backbone = args.worker
    dev = torch.device(args.device)
    peak = args.peak_flops
    try:
        if method == "peak":
            res = worker_peak(args, dev)
        elif method == "bare":
            res = worker_bare(args, backbone, dev, peak)
        elif method == "hf_trainer":
            res = worker_hf_trainer(args, backbone, dev, peak)
        elif method in ("slm_zero0", "slm_zero2"):
            res = worker_slm(args, backbone, dev, peak, zero=int(method[-1]))
        else:
            raise SystemExit(f"unknown method {method!r}")
        res.update(
            status="ok",
            method=method,
            backbone=backbone,
            torch_threads=torch.get_num_threads(),
            load_average_at_end=_util.load_average(),
        )
        if dev.type == "cuda":
            res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    except BaseException as e:  # noqa: BLE001  reported to the parent, which prints it
        import traceback

        res = {
            "status": "failed",
            "method": method,
            "backbone": backbone,
            "reason": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-4000:],
        }
    Path(args.result_file).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- parent

WORKER_FLAGS = (
    "threads",
    "steps",
    "warmup",
    "profile_steps",
    "batch",
    "seq",
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "intermediate",
    "vocab",
    "segment",
    "lr",
    "seed",
    "model_seed",
    "train_seed",
    "device",
    "precision",
    "peak_n",
    "peak_seconds",
    "peak_flops",
)


def worker_argv(args, method: str, backbone: str, result_file: str, profile: bool) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", method, backbone, "--result-file", result_file]
    for k in WORKER_FLAGS:
        v = getattr(args, k)
        if v is None:
            continue
        argv += [f"--{k.replace('_', '-')}", str(v)]
    argv.append("--tie" if args.tie else "--no-tie")
    argv.append("--profile" if profile else "--no-profile")
    return argv


def spawn(args, method: str, backbone: str, profile: bool = False) -> dict:
    """Run one measurement in a fresh process (this script with --worker); its log is kept on failure."""
    fd, result_file = tempfile.mkstemp(prefix="slm-bench-train-", suffix=".json")
    os.close(fd)
    log_path = result_file[:-5] + ".log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        PYTHONWARNINGS="ignore",
    )
    started = time.perf_counter()
    load_before = _util.load_average()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                worker_argv(args, method, backbone, result_file, profile),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.budget_s,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:  # subprocess.run killed the child it started
            code = None
    wall = time.perf_counter() - started
    try:
        res = json.loads(Path(result_file).read_text())
    except (OSError, json.JSONDecodeError):
        tail = "\n".join(Path(log_path).read_text(errors="replace").strip().splitlines()[-15:])
        why = (
            f"ran past the time budget of {args.budget_s:.0f} s (killed)" if code is None else f"process exited {code}"
        )
        res = {
            "status": "skipped" if code is None else "failed",
            "method": method,
            "backbone": backbone,
            "reason": why,
            "log_tail": tail,
        }
    if res.get("status") == "failed" and "log_tail" not in res:
        res["log_tail"] = "\n".join(Path(log_path).read_text(errors="replace").strip().splitlines()[-15:])
    res.update(process_seconds=round(wall, 1), load_average_before=load_before)
    for p in (result_file, log_path):
        with contextlib.suppress(OSError):
            os.unlink(p)
    return res


def measurement_order(methods: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, method) in the order they run: forward in even rounds, backward in odd ones (A B C D, D C B A, ...),
    so that a load that rises or falls during the run weighs on every method alike instead of on the last."""
    return [(r, m) for r in range(rounds) for m in (methods if r % 2 == 0 else methods[::-1])]


def pooled(earlier: dict | None, new: dict, args) -> dict:
    """One method's result over its rounds so far: the first round's (profile, sections, losses), with the timed
    steps of every round pooled into its step-time figures and each round's median kept beside them."""
    if earlier is None or new.get("status") != "ok":
        if new.get("status") == "ok":
            new["round_step_ms_median"] = [new["step_ms_median"]]
        return new if earlier is None else {**earlier, "failed_round": new}
    steps = earlier["step_seconds"] + new["step_seconds"]
    out = {**earlier, **timing_summary(steps, args, earlier["flops"], args.peak_flops)}
    out["round_step_ms_median"] = earlier["round_step_ms_median"] + [new["step_ms_median"]]
    out["process_seconds"] = round(earlier["process_seconds"] + new["process_seconds"], 1)
    return out


def section_comparison(slm: dict, bare: dict) -> list[list]:
    """Rows: category, bare ms, slm ms, extra ms, share of the extra, what it holds."""
    s, b = slm.get("sections_ms") or {}, bare.get("sections_ms") or {}
    if not (s and b):
        return []
    s_step, b_step = slm["step_ms_median"], bare["step_ms_median"]
    cats = [
        (
            "forward + loss",
            b.get("forward (full logits)", 0) + b.get("cross_entropy", 0),
            s.get("forward + chunked CE (token_losses)", 0) + s.get("selective_loss + stats", 0),
            (
                f"slm: token_losses {s.get('forward + chunked CE (token_losses)', 0):.1f} "
                f"+ selection {s.get('selective_loss + stats', 0):.1f}"
            ),
        ),
        (
            "backward",
            b.get("backward", 0),
            s.get("engine.backward", 0),
            (
                f"slm: autograd {s.get('autograd backward (engine.backward - allreduce)', 0):.1f} "
                f"+ allreduce_gradients {s.get('engine.allreduce_gradients', 0):.1f}"
            ),
        ),
        (
            "optimizer",
            b.get("clip_grad_norm_", 0) + b.get("AdamW.step", 0) + b.get("zero_grad", 0),
            s.get("engine.step", 0),
            (
                f"AdamW: bare {b.get('AdamW.step', 0):.1f}, slm {s.get('AdamW.step (inner torch optimizer)', 0):.1f}; "
                f"rest of engine.step {s.get('engine.step - AdamW (clip, scheduler, zero_grad, ZeRO copies)', 0):.1f} "
                f"vs bare clip+zero_grad {b.get('clip_grad_norm_', 0) + b.get('zero_grad', 0):.1f}"
            ),
        ),
    ]
    b_known, s_known = sum(c[1] for c in cats), sum(c[2] for c in cats)
    cats.append(
        (
            "other (loop: data, records, interval read, metrics, tqdm)",
            b_step - b_known,
            s_step - s_known,
            "step interval minus the sections",
        )
    )
    extra = s_step - b_step
    rows = []
    for name, bv, sv, note in cats:
        share = f"{(sv - bv) / extra * 100:.0f}%" if abs(extra) > 1e-9 else "-"
        rows.append([name, f"{bv:.1f}", f"{sv:.1f}", f"{sv - bv:+.1f}", share, note])
    rows.append(["step (median)", f"{b_step:.1f}", f"{s_step:.1f}", f"{extra:+.1f}", "100%", ""])
    return rows


def profile_diff(slm: dict, bare: dict, top: int = 12) -> list[list]:
    ps, pb = (slm.get("profile") or {}).get("ops"), (bare.get("profile") or {}).get("ops")
    if not (ps and pb):
        return []
    names = set(ps) | set(pb)
    rows = []
    for n in names:
        if n.startswith("bench::"):
            continue
        a, b = ps.get(n, {}), pb.get(n, {})
        rows.append((a.get("self_ms", 0.0) - b.get("self_ms", 0.0), n, a, b))
    rows.sort(key=lambda r: -r[0])
    return [
        [
            n,
            f"{b.get('self_ms', 0):.2f}",
            f"{b.get('calls', 0):g}",
            f"{a.get('self_ms', 0):.2f}",
            f"{a.get('calls', 0):g}",
            f"{d:+.2f}",
        ]
        for d, n, a, b in rows[:top]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke check: llama only, tiny model, W=1, N=3, 1 profiled step"
    )
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=20, help="N timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="W warm-up optimizer steps (>= 1)")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure every method this many times per backbone, alternating the order (pooled steps)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=3,
        help="P steps under torch.profiler after the timed ones (bare, slm_zero0; 0: none)",
    )
    p.add_argument("--batch", type=int, default=8, help="micro-batch (rows)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--segment", type=int, default=None, help="the streaming backbones' segment length (default 64)")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True, help="tie input and output embeddings")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234, help="seed of the token ids and ref_loss")
    p.add_argument("--model-seed", type=int, default=0, help="build_model's seed")
    p.add_argument("--train-seed", type=int, default=0, help="TrainConfig.seed (the loader's order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a lent GPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak measurement")
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="use this peak instead of measuring it (GPU: 989 dense bf16 on an H100)",
    )
    p.add_argument("--peak-flops", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=900.0, help="time limit of one measurement process")
    p.add_argument("--out", type=Path, default=_util.RESULTS_DIR / "train_throughput.json")
    p.add_argument("--device-script", action="store_true", help="print the short GPU script (does not run it)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "BACKBONE"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        return run_worker_here(args)
    if args.device_script:
        print(device_script())
        return
    if args.quick:
        d = {
            k: p.get_default(k)
            for k in (
                "backbones",
                "steps",
                "warmup",
                "profile_steps",
                "hidden",
                "layers",
                "heads",
                "intermediate",
                "peak_n",
                "peak_seconds",
                "budget_s",
                "out",
            )
        }
        quick = {
            "backbones": ["llama"],
            "steps": 3,
            "warmup": 1,
            "profile_steps": 1,
            "hidden": 64,
            "layers": 2,
            "heads": 2,
            "intermediate": 192,
            "peak_n": 1024,
            "peak_seconds": 0.5,
            "budget_s": 300.0,
            "out": _util.RESULTS_DIR / "train_throughput_quick.json",
        }
        for k, v in quick.items():
            if getattr(args, k) == d[k]:
                setattr(args, k, v)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's interval includes the set-up)")

    from rich.console import Console

    console = Console()
    started = time.time()
    _util.set_threads(args.threads)
    info = _util.machine_info(args.threads)
    console.print(
        f"[bold]train_throughput[/]: backbones {args.backbones}, methods {args.methods}, "
        f"micro-batch {args.batch} x seq {args.seq}, W={args.warmup} N={args.steps} P={args.profile_steps}, "
        f"{args.threads} thread(s), {args.device} {args.precision}"
    )
    if args.peak_tflops:
        peak = {"source": "given", "flops": args.peak_tflops * 1e12}
    else:
        r = spawn(args, "peak", "-")
        if r.get("status") != "ok":
            console.print(
                f"[red]peak measurement {r['status']}[/]: {r.get('reason')}\n"
                f"{r.get('traceback', r.get('log_tail', ''))}"
            )
            sys.exit(1)
        peak = {
            "source": (
                f"measured: best of {r['repeats']} {r['n']}x{r['n']} {r['dtype']} matmuls, {args.threads} thread(s)"
            ),
            "flops": r["best_flops"],
            "median_flops": r["median_flops"],
        }
    args.peak_flops = peak["flops"]
    console.print(f"  peak: {peak['flops'] / 1e9:,.1f} GFLOP/s ({peak['source']})")

    public = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "result_file")
    }
    results: dict[str, dict[str, dict]] = {b: {} for b in args.backbones}
    report = {
        "benchmark": "train_throughput",
        "description": __doc__.split("\n\n")[0],
        "machine": info,
        "settings": public,
        "peak": peak,
        "segment_options": {b: SEGMENT_OPTIONS[b] for b in args.backbones},
        "results": results,
    }

    for backbone in args.backbones:
        for rnd, method in measurement_order(args.methods, args.rounds):
            r = spawn(args, method, backbone, profile=rnd == 0 and method in PROFILED and args.profile_steps > 0)
            results[backbone][method] = pooled(results[backbone].get(method), r, args)
            if r.get("status") == "ok":
                console.print(
                    f"  {backbone:10s} {method:11s} {rnd + 1}/{args.rounds} step {r['step_ms_median']:9.1f} ms median "
                    f"({r['step_ms_mean']:.1f} mean), "
                    f"{r['tokens_per_s']:9,.0f} tok/s, MFU {r['mfu'] * 100:5.1f}%  ({r['process_seconds']:.0f} s)"
                )
            else:
                console.print(
                    f"  {backbone:10s} {method:11s} [red]{r['status']}[/]: {r.get('reason')}\n"
                    f"{r.get('traceback', r.get('log_tail', ''))}"
                )
            report["seconds_total"] = round(time.time() - started, 1)
            _util.write_json(args.out, report)  # after every measurement: a later failure keeps the earlier ones

    # ---- summary
    verdict, comparisons, diffs = {}, {}, {}
    headers = ["backbone", "params", "method", "step ms (median)", "step ms (mean)", "tokens/s", "time vs bare", "MFU"]
    rows = []
    for backbone in args.backbones:
        res = results[backbone]
        bare = res.get("bare", {})
        for method in args.methods:
            r = res[method]
            if r.get("status") != "ok":
                rows.append([backbone, "", method, r["status"], "", "", "", ""])
                continue
            ratio = r["step_ms_median"] / bare["step_ms_median"] if bare.get("status") == "ok" else None
            rows.append(
                [
                    backbone,
                    f"{r['flops']['params'] / 1e6:.2f}M",
                    method,
                    f"{r['step_ms_median']:.1f}",
                    f"{r['step_ms_mean']:.1f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{ratio:.3f}x" if ratio else "-",
                    f"{r['mfu'] * 100:.2f}%",
                ]
            )
        if bare.get("status") == "ok":
            v = {}
            for m in ("slm_zero0", "slm_zero2", "hf_trainer"):
                if res.get(m, {}).get("status") == "ok":
                    ratio = res[m]["step_ms_median"] / bare["step_ms_median"]
                    v[m] = {
                        "step_time_vs_bare": round(ratio, 4),
                        "mean_step_time_vs_bare": round(res[m]["step_ms_mean"] / bare["step_ms_mean"], 4),
                    }
                    if m.startswith("slm"):
                        v[m]["pass"] = ratio <= TARGET
            verdict[backbone] = v
            s0 = res.get("slm_zero0", {})
            if s0.get("status") == "ok":
                comparisons[backbone] = section_comparison(s0, bare)
                diffs[backbone] = profile_diff(s0, bare)
    # one row per backbone: the README table
    sum_headers = (
        ["backbone", "params", "GFLOP/token"]
        + [f"{m} tok/s" for m in args.methods]
        + [f"{m} / bare" for m in args.methods if m != "bare"]
        + [f"MFU {m}" for m in args.methods]
    )
    sum_rows = []
    for backbone in args.backbones:
        res = results[backbone]
        ok = {m: r for m, r in res.items() if r.get("status") == "ok"}
        any_ok = next(iter(ok.values()), None)
        row = [
            backbone,
            f"{any_ok['flops']['params'] / 1e6:.2f}M" if any_ok else "-",
            f"{any_ok['flops']['flops_per_token'] / 1e9:.4f}" if any_ok else "-",
        ]
        row += [f"{ok[m]['tokens_per_s']:,.0f}" if m in ok else res[m]["status"] for m in args.methods]
        row += [
            f"{ok[m]['step_ms_median'] / ok['bare']['step_ms_median']:.3f}x" if m in ok and "bare" in ok else "-"
            for m in args.methods
            if m != "bare"
        ]
        row += [f"{ok[m]['mfu'] * 100:.2f}%" if m in ok else "-" for m in args.methods]
        sum_rows.append(row)
    report["summary_table"] = {"headers": sum_headers, "rows": sum_rows}
    report["targets"] = {"definition": f"slm step time (median) <= {TARGET}x the bare loop's", "per_backbone": verdict}
    sec_headers = ["section", "bare ms", "slm_zero0 ms", "extra ms", "share of extra", "detail"]
    prof_headers = [
        "op (torch.profiler)",
        "bare self ms/step",
        "bare calls",
        "slm_zero0 self ms/step",
        "slm calls",
        "extra ms/step",
    ]
    report["section_comparison"] = {b: {"headers": sec_headers, "rows": r} for b, r in comparisons.items()}
    report["profile_top_differences"] = {b: {"headers": prof_headers, "rows": r} for b, r in diffs.items()}
    info["load_average_at_end"] = _util.load_average()
    report["seconds_total"] = round(time.time() - started, 1)
    _util.write_json(args.out, report)

    title = (
        f"training step: slm vs bare loop vs HF Trainer ({args.device} {args.precision}, {args.threads} thread(s), "
        f"micro-batch {args.batch} x {args.seq}, peak {peak['flops'] / 1e9:,.1f} GFLOP/s)"
    )
    _util.print_table(title, headers, rows)
    print()
    print(_util.markdown_table(headers, rows))
    print()
    print(_util.markdown_table(sum_headers, sum_rows))
    print()
    for backbone, v in verdict.items():
        for m in ("slm_zero0", "slm_zero2"):
            if m in v:
                print(
                    f"- {backbone} {m}: step time {v[m]['step_time_vs_bare']:.3f}x bare "
                    f"(mean {v[m]['mean_step_time_vs_bare']:.3f}x) "
                    f"(target <= {TARGET}x): {'pass' if v[m]['pass'] else 'FAIL'}"
                )
    for backbone, comparison in comparisons.items():
        if comparison:
            print(f"\n{backbone}: where slm_zero0's extra time goes (median ms per step, perf_counter sections)\n")
            print(_util.markdown_table(sec_headers, comparison))
        if diffs[backbone]:
            print(
                f"\n{backbone}: ops with the most extra self CPU time in slm_zero0 "
                f"(torch.profiler, {args.profile_steps} step(s))\n"
            )
            print(_util.markdown_table(prof_headers, diffs[backbone]))
    print(f"\nwrote {args.out} in {report['seconds_total']:.0f} s")


# ----------------------------------------------------------------------------- GPU script


def device_script(batch: int = 4, steps: int = 10, warmup: int = 3, timeout_s: int = 75) -> str:
    """The short script for a lent H100: llama ~1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5632,
    vocab 32000, untied) in bf16 at seq 2048 through slm's step (ZeRO 0 and 2) and the bare loop, then the streaming
    backbones through slm's step; tokens/s and MFU against 989 TFLOP/s dense bf16. Printed, not run."""
    flags = (
        f"--device cuda --precision bf16 --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 5632 "
        f"--vocab 32000 --no-tie --seq 2048 --batch {batch} --warmup {warmup} --steps {steps} --profile-steps 0 "
        f"--peak-tflops {H100_BF16_DENSE_TFLOPS:g} --threads 8 --budget-s {timeout_s}"
    )
    return f"""\
# slm training throughput on one H100 (issue 17): llama ~1B bf16, seq 2048, micro-batch {batch}, W={warmup} N={steps}.
# The device image has torch and tensorboard but no deepspeed, pydantic or datasets, and transformers 5.17: carry wheels
# in .whl (here, in the repo root; `echo /.whl/ >> .git/info/exclude` first):
#   pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # pure Python, built from the sdist
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
#     --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \\
#     typing-inspection==0.4.2 hjson==3.1.0 transformers==5.25.0 huggingface-hub==2.4.0 datasets==5.2.0 \\
#     dill==0.4.1 multiprocess==0.70.19
# then run the lines below with carry [".whl"] and timeout_s 580: at most 7 measurements of {timeout_s} s each
# (most take well under a minute: imports, init on the GPU, DeepSpeed set-up, {warmup}+{steps} steps); each JSON is
# written as it goes.
set -o pipefail; export PYTHONUNBUFFERED=1 OUT=${{OUT:-/tmp/out}}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/gpu.txt
B=scripts/bench/train_throughput.py
python3 $B {flags} --backbones llama --methods bare slm_zero0 slm_zero2 \\
  --out $OUT/train_gpu_llama.json 2>&1 | tee $OUT/llama.log
python3 $B {flags} --backbones infini megalodon fam beacon --methods slm_zero0 \\
  --out $OUT/train_gpu_streaming.json 2>&1 | tee $OUT/streaming.log
"""


if __name__ == "__main__":
    main()
