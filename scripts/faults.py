"""Fault matrix: kill -9 the reference, scoring and pretraining stages at seeded random moments, rerun each time,
and check that the end results equal an uninterrupted run; then score onto a full disk.

    python scripts/faults.py [--kills 3] [--seed 0] [--work DIR] [--json PATH]

1. Baseline: `slm data demo`, then `slm reference`, `slm score` and `slm pretrain` (tiny sizes, 1200 steps with
   checkpoints every 100, 20 shards of 10 documents) as real processes, each timed; the chain is then moved aside.
2. Faults: the same chain in the same directory (so the shards' metadata, which names paths, is the same). Each
   stage is started `--kills` times and sent SIGKILL at a seeded random point of its work: once its progress
   (steps logged, shards whole) reaches a target drawn from the work left (targets increase from round to round;
   the last may fall in the export), plus a random 0-0.3 s (mid-step, mid-checkpoint, mid-shard), then run to
   the end. Every rerun uses the stage's own resume: newest whole checkpoint, whole shards, the dead process's
   directory lock taken over.
3. Compare: reference and pretrain weights (max |difference|, must be <= 1e-6), every shard's sha256 (must be
   equal), `slm shards verify` clean and no temp file left (a rerun removes what a killed writer left), each
   stage.json complete. A mismatch is any of these that fails.
4. Full disk: score into a tmpfs (root only) sized for about half of the shards: the stage must exit 2 with one
   line naming the disk, and the manifest must list only whole shards (each as verified), with no temp file left.

Prints a table and writes JSON (default scripts/bench/results/faults.json). Exit 0 when every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
MODEL = {"backbone": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
TRAIN = {
    "seq_len": 64,
    "micro_batch_size": 4,
    "max_steps": 1200,
    "checkpoint_every": 100,
    "keep_checkpoints": 2,
    "eval_every": 100000,
    "log_every": 1,
    "optim": {"lr": 3e-3, "warmup_steps": 10},
}
STAGES = ("reference", "score", "pretrain")


def configs(data: Path, work: Path) -> dict[str, dict]:
    """The three stage configs of one chain under `work` (each reads the previous stage's output)."""
    model = {**MODEL, "max_position_embeddings": 64}
    return {
        "reference": {
            "out_dir": str(work / "reference"),
            "tokenizer": str(data / "tokenizer"),
            "corpus": {"path": str(data / "hq.jsonl")},
            "model": model,
            "train": TRAIN,
        },
        "score": {
            "out_dir": str(work / "shards"),
            "reference": str(work / "reference" / "model"),
            "seq_len": 64,
            "batch_size": 8,
            "documents_per_shard": 10,
            "corpus": {"path": str(data / "train.jsonl"), "noise_field": "noise_spans"},
        },
        "pretrain": {
            "out_dir": str(work / "pretrain"),
            "shards": str(work / "shards"),
            "model": model,
            "train": TRAIN,
            "selection": {"mode": "batch", "ratio": 0.6},
        },
    }


LOG = Path(os.devnull)  # main() points it at WORK/stages.log


def slm(*args: str) -> subprocess.Popen:
    """`slm ARGS` in a child process, its output appended to LOG (a pipe nobody reads would fill and block it)."""
    with open(LOG, "a") as log:
        log.write(f"\n=== slm {' '.join(args)}\n")
        log.flush()
        return subprocess.Popen([sys.executable, "-m", "slm.cli", *args], env=ENV, stdout=log, stderr=log)


def last_line() -> str:
    lines = [line for line in Path(LOG).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_stage(stage: str, config: Path) -> tuple[int, float, str]:
    started = time.time()
    proc = slm(stage, "--config", str(config))
    proc.wait()
    return proc.returncode, time.time() - started, last_line()


def write_configs(cfgs: dict[str, dict], where: Path) -> dict[str, Path]:
    where.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, cfg in cfgs.items():
        paths[stage] = where / f"{stage}.yaml"
        paths[stage].write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return paths


def weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def shard_shas(directory: Path) -> dict[str, str]:
    from slm.shards.manifest import load_manifest

    return {name: entry["sha256"] for name, entry in load_manifest(directory).shards.items()}


def progress(stage: str, cfg: dict) -> int:
    """Work done so far: the last step in metrics.jsonl (training) or the number of whole shards (scoring)."""
    out = Path(cfg["out_dir"])
    if stage == "score":
        return len(list((out / ".done").glob("*.json")))
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line cut by an earlier kill
            step = max(step, int(json.loads(line)["step"]))
    return step


def kill_at(proc: subprocess.Popen, done, target: int, delay: float, timeout: float = 600) -> str:
    """SIGKILL `proc` `delay` s after `done()` reaches `target`; 'killed', or how it ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and done() < target and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        time.sleep(delay)
    if proc.poll() is not None:
        return f"finished first (exit {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed"


def base_sha_names(directory: Path) -> list[str]:
    return sorted(shard_shas(directory))


def full_disk(data: Path, work: Path, baseline_shards: Path, config: dict) -> dict:
    """Score onto a tmpfs that holds about half of the shards; what the failure leaves behind."""
    from slm.shards.manifest import load_manifest
    from slm.shards.reader import leftover_temp_files, verify_shards

    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    total = sum(p.stat().st_size for p in baseline_shards.glob("shard-*.arrow"))
    size_kb = max(64, total // 2 // 1024)
    mount = work / "tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        return {"skipped": f"mount failed: {proc.stderr.decode().strip()[:200]}"}
    try:
        out = mount / "shards"
        cfg_path = write_configs({"score": {**config, "out_dir": str(out)}}, work / "configs-full")["score"]
        rc, seconds, last = run_stage("score", cfg_path)
        manifest = load_manifest(out) if (out / "manifest.json").is_file() else None
        listed = sorted(manifest.shards) if manifest else []
        on_disk = sorted(p.name for p in out.glob("shard-*.arrow"))
        problems = verify_shards(out) if manifest else ["no manifest"]
        # the only problem allowed: not all shards whole
        bad = [p for p in problems if not p.endswith("shards whole")]
        return {
            "tmpfs_kb": size_kb,
            "exit_code": rc,
            "error": last,
            "shards_listed": len(listed),
            "shards_on_disk": len(on_disk),
            "unlisted_on_disk": sorted(set(on_disk) - set(listed)),
            "verify_problems_other_than_incomplete": bad,
            "temp_files_left": [str(p) for p in leftover_temp_files(out)],
            "ok": rc == 2
            and "no space left on the device" in last
            and "\n" not in last
            and not bad
            and set(on_disk) <= set(listed)
            and not leftover_temp_files(out),
        }
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per stage before it is let finish")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--json", type=Path, default=ROOT / "scripts" / "bench" / "results" / "faults.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    global LOG
    LOG = work / "stages.log"
    rng = random.Random(args.seed)
    started = time.time()
    data = work / "data"
    proc = slm("data", "demo", "--set", f"out_dir={data}", "--set", "hq_documents=200", "--set", "train_documents=200")
    if proc.wait() != 0:
        print(f"slm data demo failed: {last_line()}", file=sys.stderr)
        return 1

    chain = work / "chain"
    cfgs = configs(data, chain)
    paths = write_configs(cfgs, work / "configs")
    base_seconds = {}
    for stage in STAGES:
        rc, seconds, last = run_stage(stage, paths[stage])
        if rc != 0:
            print(f"baseline {stage} failed (exit {rc}): {last}", file=sys.stderr)
            return 1
        base_seconds[stage] = seconds
        print(f"baseline {stage}: {seconds:.1f} s", flush=True)
    chain.rename(work / "baseline")

    kills: list[dict] = []
    for stage in STAGES:
        total = TRAIN["max_steps"] if stage != "score" else len(base_sha_names(work / "baseline" / "shards"))
        done_before = 0
        for i in range(args.kills):
            # a target in the work left, spread over the rounds (the last round may reach the end: the export)
            lo = done_before + 1
            hi = max(lo, done_before + (total - done_before) * (i + 1) // args.kills)
            target = rng.randint(lo, hi)
            delay = rng.uniform(0.0, 0.3)
            proc = slm(stage, "--config", str(paths[stage]))
            outcome = kill_at(proc, lambda stage=stage: progress(stage, cfgs[stage]), target, delay)
            done_before = progress(stage, cfgs[stage])
            kills.append(
                {"stage": stage, "round": i + 1, "target": target, "delay_s": round(delay, 3), "outcome": outcome}
            )
            print(f"  {stage} kill {i + 1}: at progress {target}/{total} + {delay:.2f} s -> {outcome}", flush=True)
        rc, seconds, last = run_stage(stage, paths[stage])
        kills.append({"stage": stage, "round": "final", "exit_code": rc, "seconds": round(seconds, 1), "last": last})
        print(f"  {stage} final run: exit {rc} in {seconds:.1f} s", flush=True)
        if rc != 0:
            print(f"  {stage}: {last}", file=sys.stderr)
    fault_cfgs = cfgs

    from slm.shards.reader import leftover_temp_files, verify_shards

    checks = {}
    for stage in ("reference", "pretrain"):
        diff = weights_diff(work / "baseline" / stage, chain / stage)
        checks[f"{stage} weights max |diff|"] = {"value": diff, "ok": diff <= 1e-6}
    base_sha, fault_sha = shard_shas(work / "baseline" / "shards"), shard_shas(chain / "shards")
    differing = sorted(n for n in base_sha.keys() | fault_sha.keys() if base_sha.get(n) != fault_sha.get(n))
    checks["shard sha256 equal"] = {"value": f"{len(base_sha) - len(differing)}/{len(base_sha)}", "ok": not differing}
    problems = verify_shards(chain / "shards") + [str(p) for p in leftover_temp_files(chain / "shards")]
    checks["shards verify clean"] = {"value": problems[:3] or "clean", "ok": not problems}
    for stage, cfg in fault_cfgs.items():
        stage_file = Path(cfg["out_dir"]) / "stage.json"
        status = json.loads(stage_file.read_text()).get("status") if stage_file.is_file() else "missing"
        checks[f"{stage} stage.json"] = {"value": status, "ok": status == "complete"}
    checks["full disk"] = full_disk(data, work, work / "baseline" / "shards", fault_cfgs["score"])
    disk_ok = checks["full disk"].get("ok", True)  # a skipped check is reported, not failed

    landed = sum(k.get("outcome") == "killed" for k in kills)
    mismatches = sum(not c["ok"] for name, c in checks.items() if name != "full disk")
    result = {
        "seed": args.seed,
        "kills_per_stage": args.kills,
        "kills_landed": landed,
        "kills_attempted": sum(k["round"] != "final" for k in kills),
        "mismatches": mismatches,
        "baseline_seconds": {k: round(v, 1) for k, v in base_seconds.items()},
        "kills": kills,
        "checks": checks,
        "seconds": round(time.time() - started, 1),
    }
    print(f"\n{'check':<32} {'result':<40} ok")
    for name, c in checks.items():
        shown = c.get("value", c.get("error", c.get("skipped", "")))
        print(f"{name:<32} {str(shown)[:40]:<40} {c.get('ok', 'skipped')}")
    print(f"\nkills landed {landed} of {result['kills_attempted']}, mismatches {mismatches}, {result['seconds']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if mismatches == 0 and disk_ok else 1


if __name__ == "__main__":
    sys.exit(main())
