"""Long-context benchmark: peak memory and time per token of a streaming forward pass, per backbone.

For every backbone in `slm.models.BACKBONES` (plain `llama` with its KV cache; `infini`, `megalodon`,
`fam`, `beacon` with their bounded recurrent state), at approximately equal parameter count, a random
token sequence of 1K, 4K, 16K and 64K tokens is fed in chunks of `--chunk` tokens with the state carried
from chunk to chunk (`past_key_values` / `cache`, as slm.evaluation.ruler.decode does), under
torch.inference_mode. Each (backbone, length) runs in a fresh process that measures

  * peak memory: ru_maxrss at the end minus ru_maxrss after model construction and a tiny warm-up
    (the high-water mark the forward pass added), and the absolute peak;
  * time per token: wall seconds / tokens (and process CPU seconds / tokens, steadier on a shared machine),
    the median of several passes for the short lengths (`--min-seconds`), one pass for the long ones;
  * the bytes of the carried state at the end (logical and the storages it keeps alive).

Targets (reported pass/fail) for the streaming backbones: peak memory at 64K <= 1.5x that at 4K, and
time per token at 64K <= 1.3x that at 4K. Plain llama's KV cache grows with the length; it runs until
a length exceeds the time or memory budget (projected from the previous lengths, or killed past it),
and the rest are reported as skipped with the reason.

A consistency check (`--check-len`, in its own process per backbone) compares the logits of one
whole-sequence forward with streaming in `--chunk` chunks and in odd-sized chunks.

    python scripts/bench/long_context.py            # 1K, 4K, 16K, 64K
    python scripts/bench/long_context.py --quick    # smoke check, < 2 minutes
    python scripts/bench/long_context.py --lengths 1024 4096 --backbones infini beacon
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

STREAMING = ("infini", "megalodon", "fam", "beacon")
# the backbone option naming its segment (local attention span / state update unit)
SEGMENT_KEY = {"infini": "segment_len", "megalodon": "chunk_len", "fam": "block_len", "beacon": "window_len"}
MEM_TARGET, TIME_TARGET = 1.5, 1.3


# ----------------------------------------------------------------------------- models


def model_config(backbone: str, args, intermediate_size: int):
    """The HF config of `backbone` at the benchmark sizes, through the slm registry."""
    from slm.config import ModelConfig
    from slm.models import build_config

    options = {}
    if backbone in SEGMENT_KEY and args.segment:
        options[SEGMENT_KEY[backbone]] = args.segment
    options.update(parse_sets(args.set).get(backbone, {}))
    cfg = ModelConfig(
        backbone=backbone,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max(max(args.lengths), args.check_len, 4096),
        tie_embeddings=True,
        options=options,
    )
    return build_config(cfg, args.vocab)


def parse_sets(items: list[str] | None) -> dict[str, dict]:
    """["beacon.max_beacon_windows=64", ...] -> {"beacon": {"max_beacon_windows": 64}} (values parsed as JSON
    when they parse)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        name, _, option = key.partition(".")
        if not (name and option and _):
            raise SystemExit(f"--set {item!r}: expected BACKBONE.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[option] = parsed
    return out


def build(backbone: str, config):
    from slm.models import get_backbone

    return get_backbone(backbone).model_cls(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters count once


def matched_sizes(args) -> dict[str, dict]:
    """intermediate_size per backbone so that its parameter count is closest to llama's at --intermediate."""
    import torch

    torch.manual_seed(0)
    target = n_params(build("llama", model_config("llama", args, args.intermediate)))
    sizes = {}
    for name in args.backbones:
        if name == "llama" or not args.match_params:
            i = args.intermediate
        else:
            a = n_params(build(name, model_config(name, args, args.intermediate)))
            b = n_params(build(name, model_config(name, args, args.intermediate + 64)))
            slope = (b - a) / 64  # params per unit of intermediate_size (3 * hidden * layers for SwiGLU)
            i = max(8, round(args.intermediate + (target - a) / slope))
        config = model_config(name, args, i)
        count = n_params(build(name, config))
        segment = getattr(config, SEGMENT_KEY[name], None) if name in SEGMENT_KEY else None
        sizes[name] = {
            "intermediate_size": i,
            "params": count,
            "params_vs_llama": round(count / target, 4),
            "segment": segment,
            "segment_key": SEGMENT_KEY.get(name),
        }
    return sizes


# ----------------------------------------------------------------------------- child process


def _stream(model, ids, chunk: int, full_logits: bool = False):
    """Feed ids [1, T] in chunks with the cache carried; returns (cache, per-chunk seconds, logits)."""
    import torch

    from slm.evaluation.ruler.decode import _returned_cache, cache_argument

    kw = cache_argument(model)
    cache, seconds, pieces, last = None, [], [], None
    for start in range(0, ids.shape[1], chunk):
        t = time.perf_counter()
        out = model(input_ids=ids[:, start : start + chunk], use_cache=True, **{kw: cache})
        seconds.append(time.perf_counter() - t)
        cache = _returned_cache(out)
        out_t = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
        if full_logits:
            pieces.append(out_t.float().clone())
        else:
            last = out_t[:, -1].float().clone()
        del out, out_t
    if full_logits:
        return cache, seconds, torch.cat(pieces, 1)
    return cache, seconds, last


def worker_measure(spec: dict) -> dict:
    import torch

    import slm.models  # noqa: F401  registers the backbones

    args = argparse.Namespace(**spec["args"])
    torch.manual_seed(0)
    model = build(spec["backbone"], model_config(spec["backbone"], args, spec["intermediate_size"])).eval()
    if args.decoder_only:
        model = model.get_decoder()
    L, chunk = spec["length"], args.chunk
    ids = torch.randint(0, args.vocab, (1, L), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _stream(model, ids[:, :128], 64)  # warm-up: first-call allocations and kernel selection, ~nothing kept
    gc.collect()
    _util.malloc_trim()
    base_hw, base_rss = _util.maxrss_mb(), _util.rss_mb()
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        cache, seconds, last = _stream(model, ids, chunk)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_hw = _util.maxrss_mb()  # memory: from this first pass only
    finite, absmax = bool(torch.isfinite(last).all()), round(float(last.abs().max()), 4)
    state = _util.tensor_bytes(cache)
    # live memory: RSS with the state still referenced, after handing freed heap back to the OS
    # (separates memory the forward still holds from allocator retention / fragmentation)
    del last
    gc.collect()
    _util.malloc_trim()
    live = _util.rss_mb() - base_rss
    del cache
    # time: short lengths are streamed again (fresh state each pass) until --min-seconds of passes;
    # the median pass counts
    walls, cpus = [wall], [cpu]
    while sum(walls) < args.min_seconds and len(walls) < args.max_passes:
        gc.collect()
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            _stream(model, ids, chunk)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    n = len(seconds)
    tail = seconds[max(1, n - 4) :] if n > 1 else seconds
    head = seconds[1:5] if n > 5 else seconds
    return {
        "backbone": spec["backbone"],
        "length": L,
        "chunk": chunk,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "passes": len(walls),
        "seconds_all_passes": [round(w, 3) for w in walls],
        "us_per_token": round(wall / L * 1e6, 2),
        "cpu_us_per_token": round(cpu / L * 1e6, 2),
        "peak_rss_mb": round(peak_hw, 1),
        "baseline_rss_mb": round(base_hw, 1),
        "rss_after_build_mb": round(base_rss, 1),
        "peak_delta_mb": round(peak_hw - base_hw, 1),
        "live_after_trim_mb": round(live, 1),
        "state_mb": round(state["logical"] / 2**20, 3),
        "state_storage_mb": round(state["storage"] / 2**20, 3),
        # seconds per chunk early in the stream vs at its end: growth here is per-token time growing with position
        "chunk_seconds_early": round(sum(head) / len(head), 4),
        "chunk_seconds_late": round(sum(tail) / len(tail), 4),
        "last_output_finite": finite,
        "last_output_absmax": absmax,
        "load_average": _util.load_average(),
    }


def worker_check(spec: dict) -> dict:
    """Whole-sequence forward vs streaming in --chunk chunks vs streaming in odd-sized chunks."""
    import torch

    import slm.models  # noqa: F401

    args = argparse.Namespace(**spec["args"])
    torch.manual_seed(0)
    model = build(spec["backbone"], model_config(spec["backbone"], args, spec["intermediate_size"])).eval()
    L = spec["length"]
    ids = torch.randint(0, args.vocab, (1, L), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = model(input_ids=ids, use_cache=False).logits.float()
        _, _, chunked = _stream(model, ids, args.chunk, full_logits=True)
        odd = 331  # a chunk size that is no multiple of any segment length
        _, _, odd_chunked = _stream(model, ids, odd, full_logits=True)
    scale = float(whole.abs().max())

    def diff(a):
        d = (a - whole).abs()
        per_pos = d.amax(-1)[0]
        return {
            "max_abs": float(d.max()),
            "first_bad_position": int((per_pos > args.check_tol * max(scale, 1.0)).nonzero()[0])
            if bool((per_pos > args.check_tol * max(scale, 1.0)).any())
            else None,
            "finite": bool(torch.isfinite(a).all()),
        }

    res = {
        "backbone": spec["backbone"],
        "length": L,
        "logit_absmax": scale,
        f"chunk_{args.chunk}": diff(chunked),
        f"chunk_{odd}": diff(odd_chunked),
        "whole_finite": bool(torch.isfinite(whole).all()),
    }
    res["ok"] = (
        all(v["first_bad_position"] is None and v["finite"] for k, v in res.items() if k.startswith("chunk_"))
        and res["whole_finite"]
    )
    return res


# ----------------------------------------------------------------------------- parent


def project_seconds(done: list[dict], length: int) -> float | None:
    """Wall seconds projected for `length` from the measured lengths: power law through the last two points
    (exponent clamped to [1, 2]), or quadratic from one point."""
    ok = [r for r in done if r.get("status") == "ok"]
    if not ok:
        return None
    last = ok[-1]
    if len(ok) >= 2:
        prev = ok[-2]
        p = math.log(last["seconds"] / prev["seconds"]) / math.log(last["length"] / prev["length"])
        p = min(2.0, max(1.0, p))
    else:
        p = 2.0
    return last["seconds"] * (length / last["length"]) ** p


def target_lengths(lengths: list[int]) -> tuple[int, int]:
    """The pair the targets compare: 4K (else the second shortest, or the shortest of two) and the longest."""
    ls = sorted(lengths)
    lo = 4096 if 4096 in ls[:-1] else (ls[1] if len(ls) > 2 else ls[0])
    return lo, ls[-1]


def targets(results: dict, backbones: list[str], lengths: list[int]) -> dict:
    out = {}
    lo, hi = target_lengths(lengths)
    for name in backbones:
        if name not in STREAMING:
            continue
        a, b = results[name].get(str(lo)), results[name].get(str(hi))
        if not (a and b and a.get("status") == "ok" and b.get("status") == "ok") or lo == hi:
            out[name] = {"status": "not measured", "lengths": [lo, hi]}
            continue
        mem = b["peak_delta_mb"] / max(a["peak_delta_mb"], 1e-9)
        tpt = b["us_per_token"] / a["us_per_token"]
        cpu = b["cpu_us_per_token"] / a["cpu_us_per_token"]
        out[name] = {
            "lengths": [lo, hi],
            "memory_ratio": round(mem, 3),
            "memory_pass": mem <= MEM_TARGET,
            "time_ratio": round(tpt, 3),
            "time_pass": tpt <= TIME_TARGET,
            "cpu_time_ratio": round(cpu, 3),
            "state_mb": [a["state_mb"], b["state_mb"]],
        }
    return out


def plot(results: dict, backbones: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in backbones:
        pts = sorted((int(k), v) for k, v in results[name].items() if v.get("status") == "ok")
        if not pts:
            continue
        xs = [p[0] for p in pts]
        style = "--o" if name == "llama" else "-o"
        ax1.plot(xs, [p[1]["peak_delta_mb"] for p in pts], style, label=name)
        ax2.plot(xs, [p[1]["us_per_token"] for p in pts], style, label=name)
    lengths = sorted({int(k) for name in backbones for k in results[name]})
    for ax, ylabel in (
        (ax1, "peak memory added by the forward (MiB, RSS high-water)"),
        (ax2, "time per token (µs, wall)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [human(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens, streamed in chunks)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def human(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke check: lengths 1K 4K, short budgets, small consistency check"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--backbones", nargs="+", default=None, help="default: every registered backbone")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per forward call (a multiple of the segment length)")
    p.add_argument(
        "--segment",
        type=int,
        default=None,
        help="segment/window/block/chunk length of the streaming backbones (default: each backbone's own, 64)",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--intermediate", type=int, default=384, help="llama's MLP width; the others are matched to its parameter count"
    )
    p.add_argument(
        "--no-match-params", dest="match_params", action="store_false", help="same intermediate_size everywhere instead"
    )
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument(
        "--set",
        action="append",
        metavar="BACKBONE.KEY=VALUE",
        help="a backbone config option, e.g. beacon.max_beacon_windows=64 (repeatable)",
    )
    p.add_argument(
        "--decoder-only", action="store_true", help="time the decoder (hidden states) without the output projection"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads in every measurement (fixed)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=65536,
        metavar="BYTES",
        help="glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) in the measurement processes "
        "(default 64 KiB: large tensors are returned to the OS when freed, so the RSS high-water measures the model, "
        "not heap retention; 0: glibc's dynamic default)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=4.0,
        help="stream short lengths again until this many seconds of passes (median pass reported)",
    )
    p.add_argument("--max-passes", type=int, default=7, help="at most this many passes per measurement")
    p.add_argument("--budget-s", type=float, default=300.0, help="time budget of one (backbone, length) measurement")
    p.add_argument("--mem-budget-mb", type=float, default=8192.0, help="RSS budget of one measurement")
    p.add_argument(
        "--check-len", type=int, default=8192, help="length of the whole-vs-streamed consistency check (0: skip)"
    )
    p.add_argument(
        "--check-tol", type=float, default=1e-3, help="relative tolerance (of the largest |logit|) of the check"
    )
    p.add_argument("--out", type=Path, default=_util.RESULTS_DIR / "long_context.json")
    p.add_argument("--plot", type=Path, default=_util.RESULTS_DIR / "long_context.png")
    args = p.parse_args()

    if args.quick:
        if args.lengths == p.get_default("lengths"):
            args.lengths = [1024, 4096]
        args.budget_s = min(args.budget_s, 60.0)
        args.check_len = min(args.check_len, 1024)
        args.min_seconds = min(args.min_seconds, 1.0)
    args.lengths = sorted(set(args.lengths))
    env_extra = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    _util.start_workers(args.threads, ["torch", "transformers", "slm.models", "slm.evaluation.ruler.decode"], env_extra)
    import slm.models

    args.backbones = args.backbones or list(slm.models.BACKBONES)
    unknown = sorted(set(args.backbones) - set(slm.models.BACKBONES))
    if unknown:
        p.error(f"unknown backbone(s) {unknown}; registered: {sorted(slm.models.BACKBONES)}")

    from rich.console import Console

    console = Console()
    started = time.time()
    info = _util.machine_info(args.threads)
    sizes = matched_sizes(args)
    console.print(
        f"[bold]long_context[/]: lengths {args.lengths}, chunk {args.chunk}, threads {args.threads}, "
        f"backbones {args.backbones}"
    )
    for name, s in sizes.items():
        console.print(
            f"  {name:10s} params {s['params']:,} ({s['params_vs_llama']:.3f}x llama), "
            f"intermediate_size {s['intermediate_size']}"
            + (f", {s['segment_key']}={s['segment']}" if s["segment"] else "")
        )
    public_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    results: dict[str, dict[str, dict]] = {name: {} for name in args.backbones}
    for name in args.backbones:
        stop_reason = None
        for L in args.lengths:
            if stop_reason:
                results[name][str(L)] = {"status": "skipped", "reason": stop_reason}
                console.print(f"  {name:10s} {human(L):>5s}: skipped ({stop_reason})")
                continue
            projected = project_seconds(list(results[name].values()), L)
            if projected is not None and projected > args.budget_s:
                reason = f"projected {projected:.0f} s from the shorter lengths, past the {args.budget_s:.0f} s budget"
                results[name][str(L)] = {
                    "status": "skipped",
                    "reason": reason,
                    "projected_seconds": round(projected, 1),
                }
                console.print(f"  {name:10s} {human(L):>5s}: skipped ({reason})")
                stop_reason = "a shorter length was already past the budget"
                continue
            spec = {
                "kind": "measure",
                "backbone": name,
                "length": L,
                "threads": args.threads,
                "intermediate_size": sizes[name]["intermediate_size"],
                "args": public_args,
            }
            # the child also builds the model: allow a little beyond the budget
            r = _util.run_worker(worker_measure, spec, args.threads, args.budget_s + 30, args.mem_budget_mb)
            results[name][str(L)] = r
            if r["status"] == "ok":
                console.print(
                    f"  {name:10s} {human(L):>5s}: {r['us_per_token']:8.1f} µs/token, "
                    f"peak +{r['peak_delta_mb']:7.1f} MiB, state {r['state_mb']:.2f} MiB, {r['seconds']:.1f} s"
                )
            else:
                console.print(f"  {name:10s} {human(L):>5s}: {r['status']} ({r['reason']})")
                stop_reason = f"{human(L)} was {r['status']}: {r['reason']}" if r["status"] == "skipped" else None

    checks = {}
    if args.check_len:
        for name in args.backbones:
            spec = {
                "kind": "check",
                "backbone": name,
                "length": args.check_len,
                "threads": args.threads,
                "intermediate_size": sizes[name]["intermediate_size"],
                "args": public_args,
            }
            checks[name] = _util.run_worker(worker_check, spec, args.threads, args.budget_s + 30, args.mem_budget_mb)
            c = checks[name]
            if c.get("status") == "ok":
                console.print(
                    f"  check {name:10s} {human(args.check_len)}: whole vs chunked "
                    + ", ".join(f"{k}: max|Δ| {v['max_abs']:.2e}" for k, v in c.items() if k.startswith("chunk_"))
                    + ("" if c["ok"] else "  [red]MISMATCH[/]")
                )
            else:
                console.print(f"  check {name}: {c['status']} ({c['reason']})")

    verdict = targets(results, args.backbones, args.lengths)
    info["load_average_at_end"] = _util.load_average()
    report = {
        "benchmark": "long_context",
        "description": "streaming forward (chunks with carried state) under torch.inference_mode; "
        "one fresh process per (backbone, length); "
        "peak_delta_mb = ru_maxrss after the forward minus ru_maxrss after model construction and a 128-token warm-up",
        "machine": info,
        "settings": public_args,
        "models": sizes,
        "model_configs": {
            name: model_config(name, args, sizes[name]["intermediate_size"]).to_dict() for name in args.backbones
        },
        "results": results,
        "targets": {
            "definition": f"streaming backbones: peak_delta_mb(long) <= {MEM_TARGET}x peak_delta_mb(4K), "
            f"us_per_token(long) <= {TIME_TARGET}x us_per_token(4K)",
            "per_backbone": verdict,
        },
        "consistency_check": checks,
        "seconds_total": round(time.time() - started, 1),
    }
    _util.write_json(args.out, report)
    title = (
        f"slm backbones, streaming forward on CPU ({args.threads} thread(s)), "
        f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, chunk {args.chunk}; shared machine"
    )
    plot(results, args.backbones, args.plot, title)

    lo, hi = target_lengths(args.lengths)
    headers = (
        ["backbone", "params"]
        + [f"{human(L)} µs/tok" for L in args.lengths]
        + [f"{human(L)} peak +MiB" for L in args.lengths]
        + [f"mem {human(hi)}/{human(lo)}", f"time {human(hi)}/{human(lo)}"]
    )
    rows = []
    for name in args.backbones:
        row = [name, f"{sizes[name]['params'] / 1e6:.3f}M"]
        for key in ("us_per_token", "peak_delta_mb"):
            for L in args.lengths:
                r = results[name][str(L)]
                row.append(_util.fmt(r[key]) if r.get("status") == "ok" else r["status"])
        v = verdict.get(name)
        if v and "memory_ratio" in v:
            row += [
                f"{v['memory_ratio']:.2f}x {'pass' if v['memory_pass'] else 'FAIL'}",
                f"{v['time_ratio']:.2f}x {'pass' if v['time_pass'] else 'FAIL'}",
            ]
        else:
            row += ["n/a (KV cache grows)", "n/a"] if name not in STREAMING else ["not measured", "not measured"]
        rows.append(row)
    _util.print_table("long context: streaming forward (summary)", headers, rows)
    dh = [
        "backbone",
        "length",
        "µs/token (wall)",
        "µs/token (CPU)",
        "peak +MiB",
        "live +MiB after trim",
        "state MiB (storage)",
        "s",
    ]
    drows = []
    for name in args.backbones:
        for L in args.lengths:
            r = results[name][str(L)]
            if r.get("status") == "ok":
                drows.append(
                    [
                        name,
                        human(L),
                        _util.fmt(r["us_per_token"]),
                        _util.fmt(r["cpu_us_per_token"]),
                        _util.fmt(r["peak_delta_mb"]),
                        _util.fmt(r["live_after_trim_mb"]),
                        f"{r['state_mb']:.2f} ({r['state_storage_mb']:.2f})",
                        _util.fmt(r["seconds"]),
                    ]
                )
            else:
                drows.append([name, human(L), r["status"], "", "", "", "", ""])
    _util.print_table("long context: every measurement", dh, drows)
    skipped = [
        (n, L, results[n][str(L)]["reason"])
        for n in args.backbones
        for L in args.lengths
        if results[n][str(L)].get("status") != "ok"
    ]
    print()
    print(_util.markdown_table(headers, rows))
    print()
    print(_util.markdown_table(dh, drows))
    if skipped:
        print()
        for n, L, why in skipped:
            print(f"- {n} at {human(L)}: {why}")
    print(f"\nwrote {args.out} and {args.plot} in {report['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
