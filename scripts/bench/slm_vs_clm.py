"""SLM against the plain causal-LM baseline on the demo, at the same token budget.

Set-up (once, cached in --work-dir): the embedded demo pipeline's own `data`, `reference` and `score` stages,
with the recipe's sizes unchanged (`slm.pipeline.load_pipeline(None, ["work_dir=..."])`, each stage run through
`slm.stages.registry.stage_runner`). The reference model is evaluated too (held-out loss, domain accuracy).

Then, for every seed: the CLM baseline (the recipe's `pretrain_clm`: `selection.enabled: false`) and SLM at every
ratio of --ratios (the recipe's `pretrain_slm`, batch mode), with the recipe's model and training config and only
these changes, none of which alters training: `train.seed` = the seed, `train.max_steps` = --steps (default the
recipe's), a held-out evaluation every --eval-every steps (for the curves), a checkpoint every --checkpoint-every
steps, all checkpoints kept. SLM at ratio 1.0 equals CLM by construction (ratio 1 keeps every valid token:
`selection.selective_loss`, tested in tests/test_pretrain_eval.py) and is not run. Each run is `slm.stages.pretrain.run`
in-process with its own out_dir; a finished run is reused when its config is unchanged (--force redoes it).

Measured, per run:
  * held-out loss against tokens: the trainer's `heldout_loss` every --eval-every steps, plus the untrained model
    (the same seed's initialisation) at 0 tokens;
  * domain accuracy against tokens: the first --questions demo questions (greedy, exact match,
    `slm.evaluation.heldout.domain_accuracy`) at every kept DeepSpeed checkpoint (weights loaded into the exported
    architecture with `slm.analysis.token_dynamics.load_deepspeed_weights`), and of the untrained model at 0 tokens;
  * tokens are every token the model processes (the logged `tokens`: batch x seq_len per step, kept or dropped);
  * tokens to reach the CLM baseline's final held-out loss / accuracy (same seed): first crossing on the curve,
    linear interpolation between evaluations; "not reached" if the curve never gets there;
  * selection against the demo's noise tags: noise_dropped (share of noise tokens dropped: recall of the drop) and
    kept_clean (share of kept tokens that are clean: precision of the keep), as the mean of the per-step logs over
    the last 20% of steps, and with `selection_quality` on the final model (its own ratio, 32 batches of 8 rows);
  * selection overhead: mean logged `selection_ms` / mean step time; step time from the logged `tokens_per_s`
    windows that hold no evaluation, checkpoint or warm-up. Plus a direct micro-measurement on one batch:
    forward+backward with the plain causal-LM loss against forward+backward with the selective loss, interleaved,
    --micro-reps times each (plain PyTorch, no optimizer step: the overhead is a share of less than a full step,
    so pessimistic), and the selective loss alone.

Targets (from the issue; checked at ratio 0.6, reported met or not):
  * counting every token processed, SLM reaches the baseline's final held-out loss with <= 0.5x its tokens;
  * of the noise-tagged tokens >= 90% are dropped, and >= 80% of the kept tokens are clean;
  * selection adds <= 5% to step time.

    python scripts/bench/slm_vs_clm.py              # 3 seeds x (CLM + 6 ratios); prepares the demo on first use
    python scripts/bench/slm_vs_clm.py --quick      # smoke check: 20 steps, 1 seed, ratio 0.6, 20 questions
    python scripts/bench/slm_vs_clm.py --work-dir runs/bench_v2 --ratios 0.4 0.6 0.8 --steps 600 --eval-every 25 \
        --checkpoint-every 100                                         # what results/slm_vs_clm.json holds
    # the same runs in parallel: one process per seed (add --seeds N --micro-reps 0 --out/--plot elsewhere),
    # then the command above reuses every finished run and evaluation and writes the report
    python scripts/bench/slm_vs_clm.py --report-from scripts/bench/results/slm_vs_clm.json   # tables and plot again
    # real human-written text instead of the demo: this machine's manual pages and documentation mixed with junk
    # (slm.data.real_text); any pipeline with the demo's stage names works. Without questions in its eval stage
    # only held-out loss is measured (no accuracy columns); with noise spans in its score corpus the noise
    # measures and the by-kind table are made as for the demo. Writes results/slm_vs_clm_real_text.{json,png}.
    python scripts/bench/slm_vs_clm.py --pipeline pipelines/real-text.yaml --work-dir runs/bench_real --ratios 0.6 \
        --steps 600 --eval-every 25 --checkpoint-every 100
    # the other selection options, each beside the same CLM baseline (add --out/--plot elsewhere for each):
    python scripts/bench/slm_vs_clm.py --work-dir runs/bench_v2 ... --mode self_loss   # reference-free (ESLM);
        # the prepared demo and the CLM runs are reused, only the SLM arms train
    python scripts/bench/slm_vs_clm.py --work-dir runs/bench_v2 ... --references 2 --combine mean
        # a second reference (seed 1, the recipe's 900 steps) and the shards scored with both; the SLM arms train on
        # them, the CLM runs (which read no reference loss; the shards hold the same rows, checked) are reused

Cost on the shared 2-core CPU machine: preparing the demo ~6 min; at the recipe's 200 steps a run takes ~3-4 min of
training plus ~0.5 min of evaluation (3 x (1 + 3 ratios): ~32 min); at --steps 600 ~7-9 min plus ~1 min (three
per-seed processes in parallel: 33-41 min); --quick ~2 min. Also reported: what each final model keeps by kind of
noise (`slm.analysis.noise_kinds`, the demo's `noise_kinds`), as a table and the plot's third panel.
A prepared --work-dir is reused only while the recipe's and the library's config defaults are unchanged (the stages
refuse another config's output); otherwise use a fresh --work-dir or --set the old values.

torch runs with --threads threads (default 1): on the shared 2-core machine two threads per process ran a training
step about ten times slower than one (other jobs hold the cores; OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

from slm.analysis.compare import tokens_to_reach  # the same crossing `slm compare` reports

TOKENS_TARGET, NOISE_DROPPED_TARGET, KEPT_CLEAN_TARGET, OVERHEAD_TARGET = 0.5, 0.9, 0.8, 0.05
TARGET_RATIO = 0.6
LAST_SHARE = 0.2  # the logged selection precision/recall are averaged over this last share of steps
SQ_BATCH, SQ_BATCHES = 8, 32  # selection_quality on the final model (as the demo's eval stages)
MACHINE_NOTE = (
    "CPU-only machine with 2 cores shared with other engineers' jobs during the run: all timings (step time, "
    "tokens/s, selection ms, the micro-measurement) are affected by that load and are noisy; the load average at "
    "start and end is recorded. Losses, accuracies and selection quality do not depend on the load."
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- set-up


LOCK_WAIT_S = 3600


def run_when_free(runner, cfg, name: str, **kwargs) -> dict:
    """The stage, waiting while another process holds its directory (the per-seed processes started together all
    check the same prepared stages; each check takes the stage's lock for a moment, or for the whole run; and
    a mode's process may reach a seed's CLM run while another process still trains it)."""
    from slm.locks import DirectoryLocked

    started = time.time()
    while True:
        try:
            return runner(cfg, **kwargs)
        except DirectoryLocked:
            if time.time() - started > LOCK_WAIT_S:
                raise
            log(f"{name} is in use by another process; waiting")
            time.sleep(10)


def prepare(args) -> dict:
    """The pipeline's stages before its first pretraining (the demo's data, reference and score; a pipeline's own
    data, tokenizer, ...) under args.work_dir; the configs of the rest."""
    from slm.errors import SlmError
    from slm.pipeline import load_pipeline
    from slm.stages.common import STAGE_FILE
    from slm.stages.registry import stage_runner

    pipeline, stages, recipe = load_pipeline(args.pipeline, [f"work_dir={args.work_dir}", *args.overrides])
    by_name = {s.name: s for s in stages}
    missing = {"reference", "score", "pretrain_slm", "pretrain_clm", "eval_reference"} - set(by_name)
    if missing:
        raise SystemExit(f"{recipe}: the benchmark needs stages named {sorted(missing)} (as the demo's)")
    first_pretrain = next(i for i, s in enumerate(stages) if s.kind == "pretrain")
    timings = {}
    for name in (s.name for s in stages[:first_pretrain]):
        existed = (Path(by_name[name].cfg.out_dir) / STAGE_FILE).is_file()
        t = time.time()
        try:
            record = run_when_free(stage_runner(by_name[name].kind), by_name[name].cfg, f"prepare: {name}")
        except SlmError as e:
            if "another config" not in str(e):
                raise
            raise SystemExit(
                f"{e}\nThe recipe or the library's config defaults changed "
                f"since the demo was prepared in {args.work_dir}: "
                f"use a fresh --work-dir, or --set the old values (compare {by_name[name].cfg.out_dir}/stage.json)"
            ) from None
        timings[name] = round(time.time() - t, 1)
        log(f"prepare: {name} {'reused' if existed else 'ran'} ({timings[name]} s)")
        if record.get("status", "complete") != "complete":
            raise SystemExit(f"stage {name} did not complete: {record}")
    slm_cfg, clm_cfg = by_name["pretrain_slm"].cfg, by_name["pretrain_clm"].cfg
    score_cfg = by_name["score"].cfg
    if args.references > 1:  # more references of the recipe's kind (seeds 1, 2, ...) and their combined scores
        ref_cfg, paths = by_name["reference"].cfg, [str(Path(by_name["reference"].cfg.out_dir) / "model")]
        for seed in range(1, args.references):
            cfg = ref_cfg.model_copy(
                update={
                    "out_dir": f"{ref_cfg.out_dir}_seed{seed}",
                    "train": ref_cfg.train.model_copy(update={"seed": seed}),
                }
            )
            t = time.time()
            run_when_free(stage_runner("reference"), cfg, f"prepare: reference_seed{seed}")
            timings[f"reference_seed{seed}"] = round(time.time() - t, 1)
            log(f"prepare: reference_seed{seed} ({timings[f'reference_seed{seed}']} s)")
            paths.append(str(Path(cfg.out_dir) / "model"))
        score_cfg = score_cfg.model_copy(
            update={
                "reference": paths,
                "combine": args.combine,
                "out_dir": f"{score_cfg.out_dir}_{args.references}refs_{args.combine}",
            }
        )
        t = time.time()
        run_when_free(stage_runner("score"), score_cfg, "prepare: score_references")
        timings["score_references"] = round(time.time() - t, 1)
        log(f"prepare: score with {args.references} references, {args.combine} ({timings['score_references']} s)")
        # only SLM reads ref_loss: CLM stays on the single-reference shards (the same rows, `check_same_rows`)
        check_same_rows(clm_cfg.shards, score_cfg.out_dir)
        slm_cfg = slm_cfg.model_copy(update={"shards": score_cfg.out_dir})
    a, b = slm_cfg.model_dump(mode="json"), clm_cfg.model_dump(mode="json")
    for d in (a, b):
        for key in ("out_dir", "selection", *(["shards"] if args.references > 1 else [])):
            d.pop(key)
    if a != b:  # "same model and training config" is the recipe's promise; check it instead of assuming it
        raise SystemExit(f"{recipe}: pretrain_slm and pretrain_clm differ beyond out_dir and selection: {a} vs {b}")
    return {
        "recipe": str(recipe),
        "name": pipeline.name,
        "pretrain": slm_cfg,
        "pretrain_clm": clm_cfg,
        "eval": by_name["eval_reference"].cfg,
        "reference": by_name["reference"].cfg,
        "score": score_cfg,
        "stage_seconds": timings,
        # what the data stages built (real_text_data's corpus depends on the machine's installed files)
        "data_manifests": {
            s.name: json.loads(m.read_text())
            for s in stages[:first_pretrain]
            if s.kind.endswith("_data") and (m := Path(s.cfg.out_dir) / "manifest.json").is_file()
        },
    }


def check_same_rows(shards_a: str, shards_b: str) -> None:
    """Two scorings of one corpus hold the same token rows in the same order (they differ only in ref_loss)."""
    from slm.shards import ShardSet

    a, b = ShardSet(shards_a, verify="size"), ShardSet(shards_b, verify="size")  # each sha256 checked on load
    if a.names != b.names or any(a.table(n).column("input_ids") != b.table(n).column("input_ids") for n in a.names):
        raise SystemExit(f"{shards_a} and {shards_b} hold different token rows: not scorings of one corpus")


def run_config(base, out_dir: Path, seed: int, ratio: float | None, args):
    """The recipe's pretrain config with only seed, steps, evaluation/checkpoint cadence and selection changed."""
    from slm.config import PretrainConfig

    d = base.model_dump(mode="json")
    d["out_dir"] = str(out_dir)
    d["train"].update(
        seed=seed,
        max_steps=args.steps,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=10_000,
    )
    mode = {"mode": args.mode} if getattr(args, "mode", None) else {}
    d["selection"] = (
        {"enabled": False} if ratio is None else {**d["selection"], "enabled": True, "ratio": ratio, **mode}
    )
    return PretrainConfig.model_validate(d)


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    def __init__(self, prep: dict, args):
        from slm.data.packed import packed_corpus
        from slm.data.tokenizer import load_tokenizer
        from slm.evaluation.heldout import read_questions
        from slm.shards import ShardSet

        self.args, self.prep = args, prep
        base = prep["pretrain"]
        self.mode = args.mode or base.selection.mode  # the SLM runs' selection rule, final models measured by it
        self.shards = ShardSet(base.shards)
        self.tokenizer_dir = base.tokenizer or self.shards.metadata.tokenizer_path
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.train = base.train
        self.max_new_tokens = prep["eval"].max_new_tokens
        # domain accuracy needs the pipeline's questions (the demo's); without them only held-out loss is measured
        questions = prep["eval"].questions
        self.questions = read_questions(questions)[: args.questions] if questions else []
        # the same packed validation rows the trainer evaluates on (same corpus, tokenizer, seq_len)
        self._codes = None  # noise kind codes of the rows `kinds` reads, made on first use
        self.heldout_rows = packed_corpus(
            base.validation,
            self.tokenizer,
            self.tokenizer_dir,
            base.train.seq_len,
            Path(args.work_dir) / "bench" / "heldout",
        )

    def heldout(self, model) -> float:
        from slm.training.loop import heldout_loss

        return heldout_loss(
            model,
            self.heldout_rows,
            self.train.micro_batch_size,
            self.train.eval_batches,
            next(model.parameters()).device,
        )

    def accuracy(self, model) -> float | None:
        from slm.evaluation.heldout import domain_accuracy

        if not self.questions:
            return None
        return domain_accuracy(model, self.tokenizer, self.questions, self.max_new_tokens, progress=False)["accuracy"]

    def cached(self, path: Path, key: dict, compute):
        import json

        if path.is_file() and not self.args.force:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["value"]
        value = compute()
        _util.write_json(path, {"key": key, "value": value})
        return value

    def reference(self) -> dict:
        from slm.models import load_pretrained

        ref_dir = Path(self.prep["reference"].out_dir) / "model"
        key = {
            "model": _stage_fp(ref_dir.parent),
            "questions": len(self.questions),
            "max_new_tokens": self.max_new_tokens,
        }

        def compute():
            model = load_pretrained(str(ref_dir)).float().eval()
            return {
                "heldout_loss": self.heldout(model),
                "domain_accuracy": self.accuracy(model),  # None without questions
                "questions": len(self.questions),
            }

        return self.cached(Path(self.args.work_dir) / "bench" / "reference_eval.json", key, compute)

    def untrained(self, base_cfg, seed: int) -> dict:
        """The pretrain stage's initial model for `seed` (build_model with the same seed): the curves' 0-token point."""
        from slm.models import build_model

        key = {
            "model": base_cfg.model.model_dump(mode="json"),
            "seed": seed,
            "questions": len(self.questions),
            "max_new_tokens": self.max_new_tokens,
            "eval_batches": self.train.eval_batches,
        }

        def compute():
            model = build_model(base_cfg.model, vocab_size=len(self.tokenizer), seed=seed).float().eval()
            return {"heldout_loss": self.heldout(model), "domain_accuracy": self.accuracy(model)}

        return self.cached(Path(self.args.work_dir) / "bench" / f"untrained-seed{seed}.json", key, compute)

    def run_checkpoints(self, run_dir: Path, ratio: float | None) -> dict:
        """Accuracy at every kept checkpoint; selection quality of the final model (SLM runs)."""
        from slm.analysis.token_dynamics import load_deepspeed_weights
        from slm.evaluation.heldout import selection_quality
        from slm.models import load_pretrained
        from slm.training.checkpoint import MARKER, whole_checkpoints
        from slm.utils.io import read_json

        key = {
            "run": _stage_fp(run_dir),
            "questions": len(self.questions),
            "max_new_tokens": self.max_new_tokens,
            "selection_quality": [ratio, SQ_BATCH, SQ_BATCHES] + ([self.mode] if self.mode != "batch" else []),
        }

        def compute():
            model = load_pretrained(str(run_dir / "model")).float().eval()
            acc = []
            for ck in whole_checkpoints(run_dir / "checkpoints") if self.questions else []:
                load_deepspeed_weights(model, ck)
                acc.append({"step": int(read_json(ck / MARKER)["step"]), "accuracy": self.accuracy(model)})
            model = load_pretrained(str(run_dir / "model")).float().eval()  # the exported final model
            sq = (
                selection_quality(model, self.shards, ratio, SQ_BATCH, SQ_BATCHES, progress=False, mode=self.mode)
                if ratio is not None
                else None
            )
            return {"accuracy": acc, "selection_quality": sq}

        return self.cached(run_dir / "bench_eval.json", key, compute)

    def kinds(self, run_dir: Path, ratio: float | None) -> dict:
        """The final model's batch selection on the first shard rows, by kind of token (clean or each kind of noise).

        CLM is measured at TARGET_RATIO: what it would keep, and its own loss on each kind."""
        from slm.analysis.noise_kinds import noise_kind_codes
        from slm.evaluation.heldout import selection_quality
        from slm.models import load_pretrained

        ratio = TARGET_RATIO if ratio is None else ratio
        n_rows = SQ_BATCH * SQ_BATCHES
        key = {"run": _stage_fp(run_dir), "ratio": ratio, "rows": n_rows}
        key.update({"mode": self.mode} if self.mode != "batch" else {})
        if self._codes is None:
            self._codes = noise_kind_codes(self.shards, self.prep["score"].corpus, self.tokenizer, n_rows)

        def compute():
            model = load_pretrained(str(run_dir / "model")).float().eval()
            codes, names = self._codes
            return selection_quality(
                model,
                self.shards,
                ratio,
                SQ_BATCH,
                SQ_BATCHES,
                progress=False,
                noise_codes=codes,
                kind_names=names,
                mode=self.mode,
            )["by_kind"]

        return self.cached(run_dir / "bench_kinds.json", key, compute)


def _stage_fp(run_dir: Path) -> str:
    import json

    record = json.loads((run_dir / "stage.json").read_text())
    return f"{record['config_fingerprint']}:{record['finished_at']}"


# ----------------------------------------------------------------------------- the runs


MODE = None  # --mode: the selection mode of the SLM runs (None: the recipe's, batch); set by main / report_from


def accuracy_text(reference: dict) -> str:
    """', domain accuracy A on N questions' for a pipeline with questions (the demo's), else ''."""
    if reference.get("domain_accuracy") is None:
        return ""
    return f", domain accuracy {reference['domain_accuracy']:.3f} on {reference['questions']} questions"


def questions_text(n: int) -> str:
    return f", {n} questions" if n else ""


def method_name(ratio: float | None) -> str:
    return "CLM" if ratio is None else f"{'SLM' if MODE in (None, 'batch') else MODE} {ratio:g}"


def analyse_run(metrics: list[dict], cfg, untrained: dict, evals: dict, record: dict) -> dict:
    """Curves, final values, selection measures and timing of one run from its metrics log."""
    tr = cfg.train
    tokens_at = {m["step"]: m["tokens"] for m in metrics}
    tokens_per_step = metrics[0]["tokens"]
    loss_curve = [(0, untrained["heldout_loss"])] + [
        (m["tokens"], m["heldout_loss"]) for m in metrics if m.get("heldout_loss") is not None
    ]
    acc_curve = (  # empty without questions
        [(0, untrained["domain_accuracy"])] + [(tokens_at[a["step"]], a["accuracy"]) for a in evals["accuracy"]]
        if untrained["domain_accuracy"] is not None
        else []
    )
    last = [m for m in metrics if m["step"] > tr.max_steps * (1 - LAST_SHARE)]

    def mean(key, rows):
        vals = [m[key] for m in rows if m.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    # step time from the tokens/s windows that hold only training steps: window (a, b] closes at step b
    # before b's evaluation/checkpoint, so events at steps a..b-1 fall inside it; the first holds the warm-up
    windows, other, a = [], [], 0
    for m in metrics:
        if m.get("tokens_per_s"):
            b = m["step"]
            events = any(e > 0 and (e % tr.eval_every == 0 or e % tr.checkpoint_every == 0) for e in range(a, b))
            (windows if a > 0 and not events else other).append(tokens_per_step / m["tokens_per_s"] * 1e3)
            a = b
    clean = bool(windows)  # else (short runs) every window, evaluations and checkpoints included: an over-estimate
    step_ms = statistics.median(windows or other) if (windows or other) else None
    sel_ms = mean("selection_ms", [m for m in metrics if m["step"] > tr.log_every])
    return {
        "steps": tr.max_steps,
        "tokens_per_step": tokens_per_step,
        "tokens": metrics[-1]["tokens"],
        "kept_tokens": round(
            sum(m.get("kept_fraction", 1.0) * m.get("valid_tokens", tokens_per_step) for m in metrics)
        ),
        "loss_curve": loss_curve,
        "accuracy_curve": acc_curve,
        "final_heldout_loss": loss_curve[-1][1],
        "final_accuracy": acc_curve[-1][1] if acc_curve else None,
        "log_noise_dropped": mean("noise_dropped", last),
        "log_kept_clean": mean("kept_clean", last),
        "log_kept_fraction": mean("kept_fraction", last),
        "final_model_selection": evals["selection_quality"],
        "selection_ms": sel_ms,
        "step_ms": step_ms,
        "step_ms_windows": len(windows or other),
        "step_ms_clean_windows": clean,
        "selection_share_of_step": sel_ms / step_ms if sel_ms is not None and step_ms else None,
        "stage_seconds": record.get("seconds"),
    }


# ----------------------------------------------------------------------------- micro-measurement


def micro_overhead(model, shards, sel_cfg, micro_batch: int, reps: int) -> dict:
    """Forward+backward with the plain causal-LM loss vs with the selective loss, same batch, interleaved."""
    import numpy as np
    import torch

    from slm.models.token_loss import token_losses, token_losses_and_entropy
    from slm.selection import selective_loss
    from slm.training.loop import causal_lm_step

    rows = shards.rows(np.arange(micro_batch), ("input_ids", "ref_loss", "loss_mask"))
    batch = {
        "input_ids": torch.from_numpy(rows["input_ids"]).long(),
        "ref_loss": torch.from_numpy(rows["ref_loss"]),
        "loss_mask": torch.from_numpy(rows["loss_mask"]),
    }
    model.train()

    def plain():
        loss, _ = causal_lm_step(model, batch)
        loss.backward()

    def losses():  # the student's losses (and, for self_entropy, entropies) as the training step computes them
        if sel_cfg.mode == "self_entropy":
            return token_losses_and_entropy(model, batch["input_ids"])
        return token_losses(model, batch["input_ids"]), None

    def selective():
        ce, entropy = losses()
        selective_loss(ce, batch["ref_loss"], sel_cfg, batch["loss_mask"], entropy=entropy).loss.backward()

    def timed(fn):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for fn in (plain, selective, plain, selective):  # warm-up
        timed(fn)
    times = {"plain": [], "selective": []}
    for i in range(reps):
        order = (
            (("plain", plain), ("selective", selective)) if i % 2 == 0 else (("selective", selective), ("plain", plain))
        )
        for name, fn in order:
            times[name].append(timed(fn))
    with torch.no_grad():
        ce, entropy = losses()
    sel_only = []
    for _ in range(max(reps, 20)):
        t = time.perf_counter()
        selective_loss(ce, batch["ref_loss"], sel_cfg, batch["loss_mask"], entropy=entropy)
        sel_only.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    p, s, o = (statistics.median(times["plain"]), statistics.median(times["selective"]), statistics.median(sel_only))
    return {
        "reps": reps,
        "batch": [micro_batch, int(batch["input_ids"].shape[1])],
        "ratio": sel_cfg.ratio,
        "plain_ms_median": p * 1e3,
        "selective_ms_median": s * 1e3,
        "overhead_median": s / p - 1,
        "selection_only_ms_median": o * 1e3,
        "selection_only_share": o / p,
        "plain_ms": [round(t * 1e3, 2) for t in times["plain"]],
        "selective_ms": [round(t * 1e3, 2) for t in times["selective"]],
    }


# ----------------------------------------------------------------------------- summary


def mean_std(vals: list[float | None]) -> tuple[float | None, float | None, int]:
    got = [v for v in vals if v is not None]
    if not got:
        return None, None, 0
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else 0.0), len(got)


def best_possible(ratio: float | None, clm: dict, run: dict) -> dict:
    """The best any selection keeping `ratio` of the tokens can score: drop only noise, (1 - ratio) of the tokens.

    With noise share n of the valid tokens: noise_dropped <= min(1, (1 - ratio) / n),
    kept_clean <= min(1, (1 - n) / ratio).
    Training log: n from the CLM run of the same seed (same batches, every valid token kept, so n = 1 - its
    kept_clean).
    Final model: n of the tokens selection_quality saw, from its own measures: kept noise = (1 - kept_clean) ratio V and
    noise = kept noise / (1 - noise_dropped), so n = (1 - kept_clean) ratio / (1 - noise_dropped)."""
    if ratio is None:
        return {}

    def bounds(n):
        return (min(1.0, (1 - ratio) / n), min(1.0, (1 - n) / ratio)) if n and n > 0 else (None, None)

    n_log = 1 - clm["log_kept_clean"]
    sq = run["final_model_selection"] or {}
    n_final = (1 - sq["kept_clean"]) * ratio / (1 - sq["noise_dropped"]) if sq and sq["noise_dropped"] < 1 else None
    (ld, lc), (fd, fc) = bounds(n_log), bounds(n_final)
    return {
        "noise_share_log": n_log,
        "best_log_noise_dropped": ld,
        "best_log_kept_clean": lc,
        "noise_share_final": n_final,
        "best_final_noise_dropped": fd,
        "best_final_kept_clean": fc,
    }


def summarise(results: dict, seeds: list[int], methods: list[float | None]) -> dict:
    summary = {}
    for ratio in methods:
        name = method_name(ratio)
        per_seed = []
        for seed in seeds:
            r, base = results[(ratio, seed)], results[(None, seed)]
            budget = base["tokens"]
            tl = tokens_to_reach(r["loss_curve"], base["final_heldout_loss"], True)
            measured = base["final_accuracy"] is not None
            # no better than the untrained model: nothing to reach
            trivial = measured and base["final_accuracy"] <= r["accuracy_curve"][0][1]
            ta = (
                tokens_to_reach(r["accuracy_curve"], base["final_accuracy"], False)
                if measured and not trivial
                else None
            )
            per_seed.append(
                {
                    "seed": seed,
                    "final_heldout_loss": r["final_heldout_loss"],
                    "final_accuracy": r["final_accuracy"],
                    "clm_final_heldout_loss": base["final_heldout_loss"],
                    "clm_final_accuracy": base["final_accuracy"],
                    "tokens_to_clm_loss": tl,
                    "tokens_to_clm_loss_x_budget": tl / budget if tl is not None else None,
                    "tokens_to_clm_accuracy": ta,
                    "tokens_to_clm_accuracy_x_budget": ta / budget if ta is not None else None,
                    "clm_accuracy_at_or_below_untrained": trivial,
                    "log_noise_dropped": r["log_noise_dropped"],
                    "log_kept_clean": r["log_kept_clean"],
                    "final_noise_dropped": (r["final_model_selection"] or {}).get("noise_dropped"),
                    "final_kept_clean": (r["final_model_selection"] or {}).get("kept_clean"),
                    "selection_ms": r["selection_ms"],
                    "step_ms": r["step_ms"],
                    "selection_share_of_step": r["selection_share_of_step"],
                    "step_ms_vs_clm": r["step_ms"] / base["step_ms"] - 1 if r["step_ms"] and base["step_ms"] else None,
                    "tokens": r["tokens"],
                    "kept_tokens": r["kept_tokens"],
                    **best_possible(ratio, base, r),
                }
            )
        agg = {}
        for k in per_seed[0]:
            if k == "seed" or isinstance(per_seed[0][k], bool):
                continue
            m, s, n = mean_std([p[k] for p in per_seed])
            agg[k] = {"mean": m, "std": s, "n": n}
        summary[name] = {
            "ratio": ratio,
            "per_seed": per_seed,
            "mean": agg,
            "seeds": len(seeds),
            "accuracy_target_trivial": any(p["clm_accuracy_at_or_below_untrained"] for p in per_seed),
        }
    return summary


def ms(agg: dict, key: str, digits: int = 3, pct: bool = False) -> str:
    a = agg[key]
    if a["mean"] is None:
        return "-"
    f = (lambda v: f"{100 * v:.{max(digits - 2, 0)}f}%") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(a['mean'])} ± {f(a['std'])}" if a["n"] > 1 else f(a["mean"])


def reach(agg: dict, key: str, seeds: int) -> str:
    a, x = agg[key], agg[key + "_x_budget"]
    if a["n"] == 0:
        return "not reached"
    text = f"{a['mean'] / 1e3:.0f}K ({x['mean']:.2f}x" + (f" ± {x['std']:.2f}" if x["n"] > 1 else "") + ")"
    return text + (f", reached {a['n']}/{seeds}" if a["n"] < seeds else "")


def table_rows(summary: dict, seeds: int) -> tuple[list[str], list[list]]:
    headers = [
        "method",
        "final held-out loss",
        "final accuracy",
        "tokens to CLM final loss (x CLM budget)",
        "tokens to CLM final accuracy (x budget)",
        "noise dropped (log / final model)",
        "kept clean (log / final model)",
        "best possible at this ratio: dropped / clean (log; final model)",
        "selection ms / step ms (share)",
    ]
    rows = []
    for name, s in summary.items():
        a = s["mean"]
        sel = (
            "-"
            if a["selection_ms"]["mean"] is None
            else (
                f"{a['selection_ms']['mean']:.2f} / {a['step_ms']['mean']:.0f} "
                f"({100 * a['selection_share_of_step']['mean']:.2f}%)"
            )
        )
        nd = ms(a, "log_noise_dropped", 3, True) + (
            f" / {ms(a, 'final_noise_dropped', 3, True)}" if s["ratio"] is not None else ""
        )
        kc = ms(a, "log_kept_clean", 3, True) + (
            f" / {ms(a, 'final_kept_clean', 3, True)}" if s["ratio"] is not None else ""
        )
        acc = reach(a, "tokens_to_clm_accuracy", seeds)
        if s["accuracy_target_trivial"]:
            acc = (
                "n/a (CLM final accuracy <= untrained"
                + (f" in some seeds; {acc}" if a["tokens_to_clm_accuracy"]["n"] else "")
                + ")"
            )
        best = "-"
        if s["ratio"] is not None:
            best = (
                f"{100 * a['best_log_noise_dropped']['mean']:.1f}% / {100 * a['best_log_kept_clean']['mean']:.1f}%; "
                f"{100 * a['best_final_noise_dropped']['mean']:.1f}% / {100 * a['best_final_kept_clean']['mean']:.1f}%"
            )
        rows.append(
            [
                name,
                ms(a, "final_heldout_loss"),
                ms(a, "final_accuracy"),
                reach(a, "tokens_to_clm_loss", seeds),
                acc,
                nd,
                kc,
                best,
                sel,
            ]
        )
    rows.append(
        [
            "SLM 1",
            "= CLM",
            "= CLM",
            "identical to CLM by construction",
            "(ratio 1 keeps every valid token)",
            "not run",
            "",
            "",
            "",
        ]
    )
    if not any(s["mean"]["final_accuracy"]["n"] for s in summary.values()):  # no questions: no accuracy columns
        keep = [i for i, h in enumerate(headers) if "accuracy" not in h]
        headers, rows = [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]
    return headers, rows


def kinds_rows(results: dict, seeds: list[int], methods: list) -> tuple[list[str], list[list]]:
    """What each method's final model keeps and how well it predicts each kind of token (mean over seeds)."""
    slm_ratios = [r for r in methods if r is not None]
    names = list(results[(None, seeds[0])].get("by_kind") or {})

    def avg(ratio, kind, key):
        return statistics.fmean(results[(ratio, s)]["by_kind"][kind][key] for s in seeds)

    headers = [
        "kind of token",
        "share of tokens",
        "reference loss",
        "CLM loss",
        *(f"{method_name(r)} loss" for r in slm_ratios),
        *(f"kept by {method_name(r)}" for r in slm_ratios),
    ]
    rows = [
        [
            kind,
            f"{100 * avg(None, kind, 'share'):.1f}%",
            f"{avg(None, kind, 'ref_loss'):.2f}",
            *(f"{avg(r, kind, 'model_loss'):.2f}" for r in methods),
            *(f"{100 * avg(r, kind, 'kept'):.1f}%" for r in slm_ratios),
        ]
        for kind in names
    ]
    return headers, rows


def targets(summary: dict, micro: dict | None) -> list[dict]:
    name = method_name(TARGET_RATIO)
    if name not in summary:
        return []
    s = summary[name]
    a, seeds = s["mean"], s["seeds"]
    out = []
    tl = a["tokens_to_clm_loss_x_budget"]
    out.append(
        {
            "target": f"{method_name(TARGET_RATIO)} reaches the CLM final held-out loss with <= {TOKENS_TARGET:g}x "
            "the tokens",
            "measured": "not reached" if tl["n"] == 0 else f"{tl['mean']:.3f}x (reached in {tl['n']}/{seeds} seeds)",
            "met": tl["n"] == seeds and tl["mean"] <= TOKENS_TARGET,
        }
    )
    nd = a["log_noise_dropped"]["mean"], a["final_noise_dropped"]["mean"]
    out.append(
        {
            "target": f"noise-tagged tokens dropped >= {NOISE_DROPPED_TARGET:.0%}",
            "measured": f"{nd[0]:.3f} (training log, last {LAST_SHARE:.0%} of steps) / {nd[1]:.3f} (final model); "
            f"best possible at ratio {TARGET_RATIO:g} "
            f"with {a['noise_share_log']['mean']:.1%} / {a['noise_share_final']['mean']:.1%} "
            f"noise tokens: {a['best_log_noise_dropped']['mean']:.3f} / {a['best_final_noise_dropped']['mean']:.3f}",
            "met": min(nd) >= NOISE_DROPPED_TARGET,
        }
    )
    kc = a["log_kept_clean"]["mean"], a["final_kept_clean"]["mean"]
    out.append(
        {
            "target": f"kept tokens clean >= {KEPT_CLEAN_TARGET:.0%}",
            "measured": f"{kc[0]:.3f} (training log) / {kc[1]:.3f} (final model); best possible: "
            f"{a['best_log_kept_clean']['mean']:.3f} / {a['best_final_kept_clean']['mean']:.3f}",
            "met": min(kc) >= KEPT_CLEAN_TARGET,
        }
    )
    share = a["selection_share_of_step"]["mean"]
    measured = "-" if share is None else f"{100 * share:.2f}% (logged selection ms / step ms)"
    met = share is not None and share <= OVERHEAD_TARGET
    if micro:
        measured += (
            f"; micro: fwd+bwd {100 * micro['overhead_median']:+.2f}% (median of {micro['reps']} interleaved), "
            f"selective loss alone {100 * micro['selection_only_share']:.2f}% of a plain fwd+bwd"
        )
        met = met and micro["overhead_median"] <= OVERHEAD_TARGET
    out.append({"target": f"selection adds <= {OVERHEAD_TARGET:.0%} to step time", "measured": measured, "met": met})
    return out


# ----------------------------------------------------------------------------- plot


def plot(results: dict, seeds: list[int], methods: list[float | None], path: Path, subtitle: str, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with_kinds = all(results[k].get("by_kind") for k in results)
    with_accuracy = all(results[k]["accuracy_curve"] for k in results)
    panels = ["loss_curve"] + ["accuracy_curve"] * with_accuracy + ["kinds"] * with_kinds
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    axes = axes[0]
    curve_axes = dict(zip(panels, axes))
    cmap = plt.get_cmap("viridis")
    ratios = [r for r in methods if r is not None]
    for ratio in methods:
        color = "black" if ratio is None else cmap(0.1 + 0.8 * (ratios.index(ratio) / max(len(ratios) - 1, 1)))
        for key in ("loss_curve", "accuracy_curve")[: 1 + with_accuracy]:
            ax = curve_axes[key]
            curves = [results[(ratio, s)][key] for s in seeds]
            xs = np.array([x for x, _ in curves[0]], dtype=float)
            ys = np.array([[y for _, y in c] for c in curves], dtype=float)
            ax.plot(
                xs / 1e3,
                ys.mean(0),
                marker="o",
                ms=3,
                color=color,
                lw=2 if ratio in (None, TARGET_RATIO) else 1.2,
                label=method_name(ratio),
            )
            if len(seeds) > 1:
                ax.fill_between(xs / 1e3, ys.min(0), ys.max(0), color=color, alpha=0.15)
    clm_loss = statistics.fmean(results[(None, s)]["final_heldout_loss"] for s in seeds)
    axes[0].axhline(clm_loss, color="black", ls=":", lw=1)
    axes[0].set_ylabel("held-out loss (nats/token)")
    if with_accuracy:
        clm_acc = statistics.fmean(results[(None, s)]["final_accuracy"] for s in seeds)
        curve_axes["accuracy_curve"].axhline(clm_acc, color="black", ls=":", lw=1)
        curve_axes["accuracy_curve"].set_ylabel("domain accuracy (exact match)")
        curve_axes["accuracy_curve"].set_title("accuracy at checkpoints; dotted: CLM final", fontsize=9)
    lo = min(min(y for _, y in results[(r, s)]["loss_curve"][1:]) for r in methods for s in seeds)
    hi = max(max(y for _, y in results[(r, s)]["loss_curve"][1:]) for r in methods for s in seeds)
    hi = min(
        hi, lo + 3 * (clm_loss - lo) + 0.15
    )  # zoom on the end of training, where the methods differ; the early drop is off the top
    axes[0].set_ylim(lo - 0.05 * (hi - lo), hi)
    for ax in axes[: 1 + with_accuracy]:
        ax.set_xlabel("tokens processed (K)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("held-out loss (mean over seeds, min-max shaded; zoomed); dotted: CLM final", fontsize=9)
    if with_kinds:  # kept share of each kind of token by every SLM ratio (mean over seeds)
        kinds = list(results[(None, seeds[0])]["by_kind"])
        width = 0.8 / max(len(ratios), 1)
        for i, ratio in enumerate(ratios):
            kept = [statistics.fmean(results[(ratio, s)]["by_kind"][k]["kept"] for s in seeds) for k in kinds]
            curve_axes["kinds"].bar(
                np.arange(len(kinds)) + (i - (len(ratios) - 1) / 2) * width,
                kept,
                width,
                color=cmap(0.1 + 0.8 * (i / max(len(ratios) - 1, 1))),
                label=method_name(ratio),
            )
        curve_axes["kinds"].set_xticks(np.arange(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        curve_axes["kinds"].set_ylabel("share of the kind's tokens kept")
        curve_axes["kinds"].set_ylim(0, 1)
        curve_axes["kinds"].grid(alpha=0.3, axis="y")
        curve_axes["kinds"].legend(fontsize=8)
        curve_axes["kinds"].set_title("what the final models keep, by kind of token", fontsize=9)
    fig.suptitle(f"SLM vs CLM on {corpus} ({subtitle})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, seeds: list[int], methods: list, micro: dict | None, reference: dict, subtitle: str, console):
    """Summary, targets and the tables (rich on the console, markdown returned)."""
    from rich.table import Table

    summary = summarise(results, seeds, methods)
    headers, rows = table_rows(summary, len(seeds))
    goals = targets(summary, micro)
    table = Table(title=f"slm_vs_clm: {subtitle}")
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*(str(c) for c in r))
    console.print(table)
    md = _util.markdown_table(headers, rows)
    if all(results[k].get("by_kind") for k in results):
        k_headers, k_rows = kinds_rows(results, seeds, methods)
        table = Table(
            title=f"final models by kind of token ({SQ_BATCHES} batches of {SQ_BATCH} rows; "
            "CLM's kept share not shown: it keeps all)"
        )
        for h in k_headers:
            table.add_column(h, justify="left" if h == k_headers[0] else "right")
        for r in k_rows:
            table.add_row(*r)
        console.print(table)
        md += "\n\n" + _util.markdown_table(k_headers, k_rows)
    console.print(f"reference model: held-out loss {reference['heldout_loss']:.3f}{accuracy_text(reference)}")
    if micro:
        console.print(
            f"micro-measurement (batch {micro['batch']}, ratio {micro['ratio']:g}, {micro['reps']} interleaved reps): "
            f"plain fwd+bwd {micro['plain_ms_median']:.1f} ms, "
            f"with the selective loss {micro['selective_ms_median']:.1f} ms ({100 * micro['overhead_median']:+.2f}%); "
            f"selective loss alone {micro['selection_only_ms_median']:.2f} ms"
        )
    for g in goals:
        console.print(
            f"[{'green' if g['met'] else 'red'}]{'MET' if g['met'] else 'NOT MET'}[/] {g['target']}: {g['measured']}"
        )
    print("\n" + md + "\n")
    return summary, goals, md


def report_from(path: Path, args, console) -> None:
    """Recompute summary, targets, tables and plot from a saved JSON (nothing is trained or measured)."""
    import json

    saved = json.loads(path.read_text())
    st = saved["settings"]
    global MODE
    MODE = st.get("mode")  # absent in results saved before --mode: batch
    results = {}
    for r in saved["runs"]:
        r = {
            **r,
            "loss_curve": [tuple(x) for x in r["loss_curve"]],
            "accuracy_curve": [tuple(x) for x in r["accuracy_curve"]],
        }
        results[(r["ratio"], r["seed"])] = r
    methods = [None, *st["ratios"]]
    subtitle = (
        f"{st['steps']} steps = {st['tokens_budget'] / 1e3:.0f}K tokens, "
        f"seeds {st['seeds']}{questions_text(st['questions'])}" + (", QUICK smoke check" if st["quick"] else "")
    )
    summary, goals, md = report(
        results, st["seeds"], methods, saved.get("micro_measurement"), saved["reference"], subtitle, console
    )
    plot(results, st["seeds"], methods, args.plot, subtitle, st.get("corpus", "the demo"))
    saved.update(summary=summary, targets=goals, markdown=md, plot=str(args.plot))
    saved.setdefault("report_regenerated", []).append(
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "from": str(path),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    )
    _util.write_json(args.out, saved)
    console.print(f"wrote {args.out} and {args.plot} (report recomputed from {path}; measurements unchanged)")


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke check: 20 steps, seed 0, ratio 0.6, 20 questions, 4 micro reps"
    )
    p.add_argument(
        "--work-dir", default="runs/bench_slm_vs_clm", help="prepared demo (data, reference, shards) and the runs"
    )
    p.add_argument(
        "--pipeline",
        type=Path,
        default=None,
        help="a pipeline YAML with the demo's stage names (reference, score, pretrain_slm, pretrain_clm, "
        "eval_reference); default: the embedded demo. Its stages before pretraining are prepared in --work-dir",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--questions", type=int, default=100, help="the first N demo questions for domain accuracy")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's max_steps)")
    p.add_argument("--eval-every", type=int, default=20, help="held-out loss every N steps (the loss curve)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint (and accuracy) every N steps")
    p.add_argument(
        "--micro-reps", type=int, default=20, help="interleaved repetitions of the fwd+bwd micro-measurement"
    )
    p.add_argument(
        "--mode",
        choices=["batch", "self_loss", "self_entropy"],
        default=None,
        help="selection mode of the SLM runs (default: the recipe's, batch = RHO-1); self_loss / self_entropy: "
        "reference-free (ESLM). The CLM runs do not depend on it: run once per mode in one --work-dir to compare",
    )
    p.add_argument(
        "--references",
        type=int,
        default=1,
        help="score with this many references (the recipe's and more of its kind with train.seed 1, 2, ...), "
        "ref_loss their --combine; the SLM runs train on those shards (under runs/<tag>-<N>refs-<combine>), the CLM "
        "runs, which read no ref_loss, are the single-reference ones (the same rows, checked)",
    )
    p.add_argument("--combine", choices=["max", "mean"], default="mean", help="with --references > 1")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed)")
    p.add_argument("--force", action="store_true", help="redo the runs and evaluations (not the prepared demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the demo pipeline, as `slm run --set` (e.g. stages.score.logprob_chunk_tokens=8192)",
    )
    p.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="recompute the tables, targets and plot from a saved result JSON (no training, no measurement)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default results/slm_vs_clm.json; --quick: slm_vs_clm_quick.json)"
    )
    p.add_argument(
        "--plot", type=Path, default=None, help="PNG (default results/slm_vs_clm.png; --quick: slm_vs_clm_quick.png)"
    )
    args = p.parse_args()
    global MODE
    MODE = args.mode
    if args.quick:
        args.seeds = args.seeds if args.seeds != p.get_default("seeds") else [0]
        args.ratios = args.ratios if args.ratios != p.get_default("ratios") else [TARGET_RATIO]
        args.steps = args.steps or 20
        args.eval_every = min(args.eval_every, 10)
        args.checkpoint_every = min(args.checkpoint_every, 10)
        args.questions = min(args.questions, 20)
        args.micro_reps = min(args.micro_reps, 4)
    suffix = (f"_{args.pipeline.stem.replace('-', '_')}" if args.pipeline else "") + ("_quick" if args.quick else "")
    args.out = args.out or _util.RESULTS_DIR / f"slm_vs_clm{suffix}.json"
    args.plot = args.plot or _util.RESULTS_DIR / f"slm_vs_clm{suffix}.png"
    ratios = sorted(set(args.ratios))
    if any(not 0 < r <= 1 for r in ratios):
        p.error("--ratios must lie in (0, 1]")
    dropped_one = 1.0 in ratios
    ratios = [r for r in ratios if r < 1.0]  # ratio 1 is the CLM baseline by construction

    os.environ.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
    )
    import warnings

    warnings.filterwarnings("ignore")
    _util.set_threads(args.threads)
    from rich.console import Console

    from slm.training.metrics import read_metrics

    console = Console(width=max(Console().width, 200))
    if args.report_from:
        report_from(args.report_from, args, console)
        return
    started = time.time()
    info = _util.machine_info(args.threads)
    info["machine_note"] = MACHINE_NOTE
    work = Path(args.work_dir)
    prep = prepare(args)
    corpus = "the demo" if args.pipeline is None else f"{prep['name']} ({args.pipeline})"
    base = prep["pretrain"]
    args.steps = args.steps or base.train.max_steps
    ev = Evaluator(prep, args)
    reference = ev.reference()
    log(
        f"reference (trained on the high-quality corpus): held-out loss {reference['heldout_loss']:.3f}"
        + accuracy_text(reference)
    )

    from slm.stages import pretrain

    methods: list[float | None] = [None, *ratios]
    single_reference_tag = f"steps{args.steps}-eval{args.eval_every}-ckpt{args.checkpoint_every}"
    tag = single_reference_tag + (f"-{args.references}refs-{args.combine}" if args.references > 1 else "")
    runs_dir = work / ("quick" if args.quick else "runs") / tag
    # CLM reads no reference loss: with --references it is the single-reference run (the same rows), reused
    clm_runs_dir = runs_dir.with_name(single_reference_tag)
    results, run_seconds, total = {}, [], len(args.seeds) * len(methods)
    for seed in args.seeds:
        untrained = ev.untrained(base, seed)
        for ratio in methods:
            slm = "slm" if args.mode in (None, "batch") else args.mode
            name = f"{'clm' if ratio is None else f'{slm}{ratio:g}'}-seed{seed}"
            if ratio is None:
                cfg = run_config(prep["pretrain_clm"], clm_runs_dir / name, seed, ratio, args)
            else:
                cfg = run_config(base, runs_dir / name, seed, ratio, args)
            t = time.time()
            record = run_when_free(pretrain.run, cfg, name, force=args.force)
            trained = time.time() - t
            evals = ev.run_checkpoints(Path(cfg.out_dir), ratio)
            r = analyse_run(read_metrics(Path(cfg.out_dir) / "metrics.jsonl"), cfg, untrained, evals, record)
            r.update(
                method=method_name(ratio),
                seed=seed,
                ratio=ratio,
                out_dir=cfg.out_dir,
                by_kind=ev.kinds(Path(cfg.out_dir), ratio),
            )
            results[(ratio, seed)] = r
            run_seconds.append(time.time() - t)
            done = len(results)
            eta = statistics.fmean(run_seconds) * (total - done)
            log(
                f"{done}/{total} {name}: held-out {r['final_heldout_loss']:.4f}, "
                + (f"acc {r['final_accuracy']:.3f}, " if r["final_accuracy"] is not None else "")
                + f"noise dropped {r['log_noise_dropped']:.3f}, kept clean {r['log_kept_clean']:.3f}, "
                f"train {trained:.0f} s + eval {time.time() - t - trained:.0f} s; ETA {eta / 60:.0f} min"
            )

    micro = None
    if args.micro_reps > 0:
        from slm.config import SelectionConfig
        from slm.models import load_pretrained

        clm_dir = Path(results[(None, args.seeds[0])]["out_dir"])
        sel_cfg = SelectionConfig.model_validate(
            {**base.selection.model_dump(), "enabled": True, "ratio": TARGET_RATIO, "mode": ev.mode}
        )
        micro = ev.cached(
            clm_dir.parent / ("bench_micro.json" if ev.mode == "batch" else f"bench_micro_{ev.mode}.json"),
            {"model": _stage_fp(clm_dir), "reps": args.micro_reps, "ratio": TARGET_RATIO, "mode": ev.mode},
            lambda: micro_overhead(
                load_pretrained(str(clm_dir / "model")).float(),
                ev.shards,
                sel_cfg,
                base.train.micro_batch_size,
                args.micro_reps,
            ),
        )
        log(
            f"micro: plain fwd+bwd {micro['plain_ms_median']:.1f} ms, selective {micro['selective_ms_median']:.1f} ms "
            f"({100 * micro['overhead_median']:+.2f}%), selective loss alone {micro['selection_only_ms_median']:.2f} ms"
        )

    budget = results[(None, args.seeds[0])]["tokens"]
    subtitle = f"{args.steps} steps = {budget / 1e3:.0f}K tokens, seeds {args.seeds}{questions_text(len(ev.questions))}"
    subtitle += ", QUICK smoke check" if args.quick else ""
    summary, goals, md = report(results, args.seeds, methods, micro, reference, subtitle, console)
    if dropped_one:
        console.print("ratio 1.0 was not run: it is the CLM baseline by construction")

    plot(results, args.seeds, methods, args.plot, subtitle, corpus)
    info["load_average_at_end"] = _util.load_average()
    out = {
        "benchmark": "slm_vs_clm",
        "description": __doc__.split("\n\n")[0],
        "machine": info,
        "settings": {
            "quick": args.quick,
            "mode": ev.mode,
            "references": args.references,
            "combine": args.combine if args.references > 1 else None,
            "seeds": args.seeds,
            "ratios": ratios,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every,
            "questions": len(ev.questions),
            "threads": args.threads,
            "work_dir": str(work),
            "recipe": prep["recipe"],
            "corpus": corpus,
            "pipeline_overrides": args.overrides,
            "tokens_budget": budget,
            "pretrain_config": {k: v for k, v in base.model_dump(mode="json").items() if k != "out_dir"},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "prepare_stage_seconds": prep["stage_seconds"],
        "data_manifests": prep["data_manifests"],
        "reference": reference,
        "summary": summary,
        "targets": goals,
        "micro_measurement": micro,
        "runs": [{k: v for k, v in r.items()} for r in results.values()],
        "markdown": md,
        "seconds": round(time.time() - started, 1),
        "plot": str(args.plot),
    }
    _util.write_json(args.out, out)
    console.print(f"wrote {args.out} and {args.plot} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
