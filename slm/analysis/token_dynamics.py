"""RHO-1's token categories: how each validation token's loss moves over training checkpoints.

Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need", sec. 2.1 / Fig. 2, with the rule
spelled out in the appendix ("Details of Token Categories"). For every token, take its losses
l_0..l_n at checkpoints 0..n and fit a least-squares line

    min_{a,b} sum_i (l_i - (a x_i + b))^2,     x_i = i  (x_0 = 0 first checkpoint, x_n = n last)

The fitted start and end are L_start = b and L_end = a n + b, so the change is
    dL = L_end - L_start = a n                 (the fitted change over the run, not the slope a)
and with L_mean the average loss of all tokens at the last checkpoint:
    dL < -0.2                        -> H->L  (loss decreases: high to low)
    dL > +0.2                        -> L->H  (loss increases: low to high)
    |dL| <= 0.2 and l_n <= L_mean    -> L->L  (stays low)
    |dL| <= 0.2 and l_n >  L_mean    -> H->H  (stays high)
The paper reports roughly H->H 11%, L->H 12%, H->L 26%, L->L 51% for TinyLlama-1B on 15B
OpenWebMath tokens, with a checkpoint every 1B tokens (Fig. 2a). Both numbers, 0.2 and L_mean,
are configurable here (`thresholds.change`, `thresholds.level`); `x_axis: step` fits against
training steps instead of the checkpoint index, for unevenly spaced checkpoints.

Checkpoints come as Hugging Face model directories in training order, or from a `reference` /
`pretrain` run directory: its whole DeepSpeed checkpoints (`<run>/checkpoints/step-NNNNNNNN`,
marked by `slm-complete.json`) are loaded one after the other into the architecture of the run's
exported model (`<run>/model`). ZeRO stages 0-2 keep whole module weights in
`mp_rank_00_model_states.pt` under `module`; ZeRO-3 partitions them and is refused.
Tokens are the validation rows packed as everywhere else (`slm.data.packed`); scored positions
are those with a loss (t >= 1) and `loss_mask` 1, finite at every checkpoint.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from slm.config import (  # the config lives with every stage's (slm.config); re-exported for this module's users
    TokenDynamicsConfig,
    TokenDynamicsThresholds,  # noqa: F401
    apply_overrides,
    dump_config,
    read_yaml,
    validate,
)
from slm.errors import SlmError
from slm.training.checkpoint import load_deepspeed_weights
from slm.utils.io import atomic_write_bytes, atomic_write_json, read_json

CATEGORIES = ("H->H", "L->H", "H->L", "L->L")
HH, LH, HL, LL = range(4)
MEANING = {"H->H": "stays high", "L->H": "increases", "H->L": "decreases", "L->L": "stays low"}
COLORS = {"H->H": "tab:red", "L->H": "tab:orange", "H->L": "tab:green", "L->L": "tab:blue"}
JSON_NAME, PLOT_NAME, ARRAYS_NAME = "token_dynamics.json", "token_dynamics.png", "token_losses.npz"


# --------------------------------------------------------------------------- the rule


def fit_loss_lines(losses: np.ndarray, x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line through each column of `losses` [K, N] against `x` [K] (default 0..K-1):
    (slope [N], intercept [N]), the same as `numpy.polyfit(x, losses, 1)` but in one pass."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] < 2:
        raise SlmError(f"token dynamics needs losses of shape [checkpoints >= 2, tokens], got {list(losses.shape)}")
    x = np.arange(losses.shape[0], dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    if x.shape != (losses.shape[0],):
        raise SlmError(f"{len(x)} checkpoint positions for {losses.shape[0]} checkpoints")
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx == 0:
        raise SlmError("checkpoint positions are all equal; a line cannot be fitted")
    mean = losses.mean(axis=0)
    slope = xc @ (losses - mean) / sxx
    return slope, mean - slope * x.mean()


@dataclass
class TokenCategories:
    codes: np.ndarray  # [N] int8: index into CATEGORIES
    delta: np.ndarray  # [N] fitted loss change L_end - L_start
    slope: np.ndarray  # [N] per unit of x
    level: float  # the high/low threshold applied to the last checkpoint's loss
    level_source: str


def classify_tokens(
    losses: np.ndarray, change: float = 0.2, level: float | None = None, x: np.ndarray | None = None
) -> TokenCategories:
    """RHO-1's rule (module docstring) on losses [K checkpoints, N tokens]."""
    losses = np.asarray(losses, dtype=np.float64)
    x = np.arange(losses.shape[0], dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    slope, _ = fit_loss_lines(losses, x)
    delta = slope * (x[-1] - x[0])  # L_end - L_start of the fitted line (= a n for x_i = i)
    last = losses[-1]
    source = "config"
    if level is None:  # L_mean: the average loss at the last checkpoint
        level, source = (float(last.mean()) if last.size else float("nan")), "mean loss at the last checkpoint"
    stable_code = np.where(last <= level, LL, HH)
    codes = np.where(delta < -change, HL, np.where(delta > change, LH, stable_code)).astype(np.int8)
    return TokenCategories(codes, delta, slope, float(level), source)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    name: str
    path: Path
    step: int | None
    kind: Literal["hf", "deepspeed"]


_STEP_RE = re.compile(r"(?:step|checkpoint|global_step|iter)[-_]?(\d+)", re.IGNORECASE)


def _step_from_name(name: str) -> int | None:
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


def resolve_checkpoints(cfg: TokenDynamicsConfig) -> list[Checkpoint]:
    """The checkpoints to analyse, in training order; at least two, or a one-line error."""
    if cfg.checkpoints is not None:
        found = []
        for i, c in enumerate(cfg.checkpoints):
            p = Path(c)
            if not p.is_dir():
                raise SlmError(f"checkpoints[{i}] {c!r}: directory not found")
            if not (p / "config.json").is_file():
                raise SlmError(f"checkpoints[{i}] {c!r}: not a Hugging Face model directory (no config.json)")
            found.append(Checkpoint(p.name, p, _step_from_name(p.name), "hf"))
        where = f"checkpoints ({len(found)} given)"
    else:
        from slm.training.checkpoint import MARKER, whole_checkpoints

        run = Path(cfg.run_dir)
        if not run.is_dir():
            raise SlmError(f"run_dir {cfg.run_dir!r}: directory not found")
        found = []
        for d in whole_checkpoints(run / "checkpoints"):
            step = read_json(d / MARKER).get("step")
            found.append(Checkpoint(d.name, d, int(step) if step is not None else _step_from_name(d.name), "deepspeed"))
        where = (
            f"run_dir {cfg.run_dir!r} has {len(found)} whole checkpoint(s) under checkpoints/; "
            "keep more with train.keep_checkpoints"
        )
    if len(found) < 2:
        raise SlmError(f"token dynamics needs at least 2 checkpoints in training order; {where}")
    if cfg.x_axis == "step":
        steps = [c.step for c in found]
        if None in steps or any(b <= a for a, b in zip(steps, steps[1:])):
            raise SlmError(
                f"x_axis=step needs increasing training steps for every checkpoint, got {steps}; use x_axis=index"
            )
    return found


def _iter_models(cfg: TokenDynamicsConfig, checkpoints: list[Checkpoint], dtype: torch.dtype, dev: torch.device):
    """(checkpoint, model in eval mode on `dev`) one at a time; run checkpoints share one model."""
    from slm.models import load_pretrained

    if checkpoints[0].kind == "deepspeed":
        arch = _architecture_dir(cfg)
        model = load_pretrained(str(arch)).to(device=dev, dtype=dtype).eval()
        for ck in checkpoints:
            yield ck, load_deepspeed_weights(model, ck.path)
        return
    for ck in checkpoints:
        model = load_pretrained(str(ck.path)).to(device=dev, dtype=dtype).eval()
        yield ck, model
        del model


def _architecture_dir(cfg: TokenDynamicsConfig) -> Path:
    arch = Path(cfg.architecture) if cfg.architecture else Path(cfg.run_dir) / "model"
    if not (arch / "config.json").is_file():
        raise SlmError(
            f"architecture {str(arch)!r}: no Hugging Face model (config.json) to load the checkpoints into; "
            "finish the run (its export is <run_dir>/model) "
            "or set architecture to a model directory of the same config"
        )
    return arch


def _tokenizer_dir(cfg: TokenDynamicsConfig, checkpoints: list[Checkpoint]) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    d = checkpoints[0].path if checkpoints[0].kind == "hf" else _architecture_dir(cfg)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SlmError(
            f"{d}: holds no tokenizer; "
            "set tokenizer to the directory of the tokenizer the checkpoints were trained with"
        )
    return d


# --------------------------------------------------------------------------- losses


@torch.inference_mode()
def rows_token_losses(model, input_ids: torch.Tensor, batch_size: int, on_batch=None) -> np.ndarray:
    """[R, T] float32 per-token losses (NaN at t=0, `slm.models.token_loss` alignment) in batches."""
    dev = next(model.parameters()).device
    from slm.models.token_loss import token_losses

    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        out.append(token_losses(model, input_ids[start : start + batch_size].to(dev)).float().cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(out).numpy()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlmError("device=cuda: no CUDA device is available")
    return torch.device(name)


# --------------------------------------------------------------------------- the analysis


def token_dynamics(cfg: TokenDynamicsConfig, progress: bool = True, console=None) -> dict:
    """Per-token losses of every checkpoint on the same validation rows, RHO-1's categories,
    a rich table of the shares (when `progress`), and out_dir/{token_dynamics.json, .png,
    token_losses.npz}, each written atomically. Returns the JSON's content."""
    from tqdm.auto import tqdm

    from slm.data.packed import packed_corpus
    from slm.data.tokenizer import load_tokenizer
    from slm.models.checks import check_vocab

    started = time.time()
    checkpoints = resolve_checkpoints(cfg)
    out = Path(cfg.out_dir)
    tok_dir = _tokenizer_dir(cfg, checkpoints)
    tokenizer = load_tokenizer(tok_dir)
    rows = packed_corpus(cfg.validation, tokenizer, str(tok_dir), cfg.seq_len, out / "data")
    n_rows = min(len(rows), cfg.max_rows)
    batch = rows.rows(np.arange(n_rows), ("input_ids", "loss_mask"))
    ids = torch.from_numpy(batch["input_ids"]).long()
    dev, dtype = _device(cfg.device), (torch.bfloat16 if cfg.precision == "bf16" else torch.float32)

    K = len(checkpoints)
    losses = np.empty((K, n_rows, cfg.seq_len), dtype=np.float32)
    n_batches = -(-n_rows // cfg.batch_size)
    bar = tqdm(total=K * n_batches, desc="token dynamics", disable=not progress, dynamic_ncols=True)
    for k, (ck, model) in enumerate(_iter_models(cfg, checkpoints, dtype, dev)):
        check_vocab(model, tokenizer, str(tok_dir))
        bar.set_postfix(checkpoint=ck.name)
        losses[k] = rows_token_losses(model, ids, cfg.batch_size, on_batch=lambda: bar.update(1))
    bar.close()

    valid = batch["loss_mask"].astype(bool) & np.isfinite(losses).all(axis=0)
    valid[:, 0] = False  # no context at t=0 (NaN by construction)
    flat = losses[:, valid].astype(np.float64)  # [K, N]
    if flat.shape[1] == 0:
        raise SlmError(f"validation {cfg.validation.path!r}: no scored tokens in the first {n_rows} rows")
    steps = [c.step for c in checkpoints]
    x = np.asarray(steps, dtype=np.float64) if cfg.x_axis == "step" else np.arange(K, dtype=np.float64)
    cats = classify_tokens(flat, cfg.thresholds.change, cfg.thresholds.level, x)

    summary = _summarise(cfg, checkpoints, flat, cats, valid, batch["input_ids"], tokenizer, x)
    codes_grid = np.full(valid.shape, -1, dtype=np.int8)
    codes_grid[valid] = cats.codes
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        losses=losses,
        valid=valid,
        categories=codes_grid,
        input_ids=batch["input_ids"],
        category_names=np.array(CATEGORIES),
        steps=np.array([-1 if s is None else s for s in steps]),
        checkpoints=np.array([str(c.path) for c in checkpoints]),
    )
    atomic_write_bytes(out / ARRAYS_NAME, buf.getvalue())
    plot_token_dynamics(summary, out / PLOT_NAME)
    summary["outputs"] = {"json": str(out / JSON_NAME), "plot": str(out / PLOT_NAME), "arrays": str(out / ARRAYS_NAME)}
    summary["seconds"] = round(time.time() - started, 2)
    atomic_write_json(out / JSON_NAME, summary)
    if progress:
        print_token_dynamics(summary, console)
    return summary


def _summarise(cfg, checkpoints, flat, cats: TokenCategories, valid, input_ids, tokenizer, x) -> dict:
    n = flat.shape[1]
    where = np.argwhere(valid)  # (row, position) of each column of `flat`, same order as losses[:, valid]
    categories: dict[str, Any] = {}
    for code, name in enumerate(CATEGORIES):
        members = np.flatnonzero(cats.codes == code)
        count = int(members.size)
        examples = []
        if count and cfg.examples:
            pick = members[np.unique(np.linspace(0, count - 1, min(cfg.examples, count)).round().astype(int))]
            for j in pick:
                r, t = (int(v) for v in where[j])
                examples.append(
                    {
                        "row": r,
                        "position": t,
                        "token": tokenizer.decode([int(input_ids[r, t])]),
                        "context": tokenizer.decode([int(i) for i in input_ids[r, max(0, t - 8) : t]]),
                        "losses": [round(float(v), 4) for v in flat[:, j]],
                        "delta": round(float(cats.delta[j]), 4),
                    }
                )
        categories[name] = {
            "meaning": MEANING[name],
            "count": count,
            "share": count / n,
            "mean_loss": [float(v) for v in flat[:, members].mean(axis=1)] if count else None,
            "mean_delta": float(cats.delta[members].mean()) if count else None,
            "examples": examples,
        }
    return {
        "rule": (
            "RHO-1 (Lin et al. 2024) appendix, Details of Token Categories: "
            "least-squares line through each token's losses over the checkpoints; "
            "dL = fitted end - fitted start; dL < -change: H->L, dL > change: L->H; "
            "otherwise last loss <= level: L->L, else H->H; "
            "level defaults to the mean loss at the last checkpoint (L_mean)"
        ),
        "checkpoints": [{"name": c.name, "path": str(c.path), "step": c.step, "kind": c.kind} for c in checkpoints],
        "x_axis": cfg.x_axis,
        "x": [float(v) for v in x],
        "rows": int(valid.shape[0]),
        "seq_len": int(valid.shape[1]),
        "tokens": n,
        "thresholds": {"change": cfg.thresholds.change, "level": cats.level, "level_source": cats.level_source},
        "mean_loss": [float(v) for v in flat.mean(axis=1)],
        "categories": categories,
        "config": dump_config(cfg),
    }


# --------------------------------------------------------------------------- table and plot


def print_token_dynamics(summary: dict, console=None) -> None:
    """The category shares as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    th = summary["thresholds"]
    ck = summary["checkpoints"]
    table = Table(
        title=f"RHO-1 token categories: {summary['tokens']:,} tokens over {len(ck)} checkpoints "
        f"({ck[0]['name']} .. {ck[-1]['name']}); |dL| > {th['change']:g}, level {th['level']:.3f}"
    )
    for col, justify in (
        ("category", "left"),
        ("loss", "left"),
        ("tokens", "right"),
        ("share", "right"),
        ("mean loss first", "right"),
        ("mean loss last", "right"),
        ("mean dL", "right"),
    ):
        table.add_column(col, justify=justify)
    for name, c in summary["categories"].items():
        first, last = (f"{c['mean_loss'][0]:.3f}", f"{c['mean_loss'][-1]:.3f}") if c["count"] else ("-", "-")
        table.add_row(
            name,
            c["meaning"],
            f"{c['count']:,}",
            f"{100 * c['share']:.1f}%",
            first,
            last,
            f"{c['mean_delta']:+.3f}" if c["count"] else "-",
        )
    all_loss = summary["mean_loss"]
    table.add_row(
        "all", "", f"{summary['tokens']:,}", "100.0%", f"{all_loss[0]:.3f}", f"{all_loss[-1]:.3f}", "", style="bold"
    )
    console.print(table)


def plot_token_dynamics(summary: dict, path: str | Path) -> Path:
    """Like RHO-1 Fig. 2: (a) mean loss of each category across checkpoints, (b) category shares,
    (c) example token trajectories. Written atomically."""
    from slm.utils.plots import plt, save_png

    ck = summary["checkpoints"]
    steps = [c["step"] for c in ck]
    by_step = None not in steps and all(b > a for a, b in zip(steps, steps[1:]))
    xs = steps if by_step else list(range(len(ck)))
    xlabel = "training step" if by_step else "checkpoint"
    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 0.8, 1.3]})
    for name, c in summary["categories"].items():
        if c["count"]:
            ax_a.plot(xs, c["mean_loss"], marker="o", ms=3, color=COLORS[name], label=f"{name} {100 * c['share']:.0f}%")
    ax_a.plot(xs, summary["mean_loss"], color="black", ls="--", lw=1, label="all tokens")
    ax_a.set(title="(a) mean loss by category", xlabel=xlabel, ylabel="loss (nats)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=8)

    names = list(summary["categories"])
    shares = [100 * summary["categories"][n]["share"] for n in names]
    bars = ax_b.bar(names, shares, color=[COLORS[n] for n in names])
    for b, s in zip(bars, shares):
        ax_b.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{s:.1f}%", ha="center", va="bottom", fontsize=8)
    ax_b.set(
        title=f"(b) share of {summary['tokens']:,} tokens", ylabel="% of tokens", ylim=(0, max(shares + [1]) * 1.15)
    )

    for name, c in summary["categories"].items():
        for i, ex in enumerate(c["examples"]):
            ax_c.plot(xs, ex["losses"], color=COLORS[name], lw=1, alpha=0.8, label=name if i == 0 else None)
    ax_c.set(title="(c) example tokens", xlabel=xlabel, ylabel="loss (nats)")
    if not by_step:  # name the checkpoints on the index axis
        for ax in (ax_a, ax_c):
            ax.set_xticks(
                xs,
                [c["name"] for c in ck],
                rotation=30 if len(ck) > 4 else 0,
                ha="right" if len(ck) > 4 else "center",
                fontsize=7,
            )
    ax_c.grid(alpha=0.3)
    if any(c["examples"] for c in summary["categories"].values()):
        ax_c.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


# --------------------------------------------------------------------------- configs from command-line flags


def token_dynamics_config(
    checkpoints: list[str] | None = None,
    run_dir: str | None = None,
    validation: str | None = None,
    out: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    architecture: str | None = None,
    tokenizer: str | None = None,
    seq_len: int | None = None,
    max_rows: int | None = None,
    batch_size: int | None = None,
    change_threshold: float | None = None,
    level_threshold: float | None = None,
    out_default: str | None = None,
) -> TokenDynamicsConfig:
    """The config `slm analyze token-dynamics` runs: a YAML config (optional), then the flags that are set, then
    `--set` overrides, validated as one `TokenDynamicsConfig` (problems are one-line `SlmError`s). `out_default`:
    the out_dir when neither `out` nor the YAML names one."""
    raw: dict[str, Any] = read_yaml(config) if config is not None else {}
    flags = {
        "checkpoints": [str(c) for c in checkpoints] if checkpoints else None,
        "run_dir": run_dir,
        "out_dir": out,
        "architecture": architecture,
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "max_rows": max_rows,
        "batch_size": batch_size,
    }
    raw.update({k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items() if v is not None})
    if out_default is not None:
        raw.setdefault("out_dir", out_default)
    if validation is not None:
        base = raw.get("validation") if isinstance(raw.get("validation"), dict) else {}
        raw["validation"] = {**base, "path": str(validation)}
    for key, value in (("change", change_threshold), ("level", level_threshold)):
        if value is not None:
            raw["thresholds"] = {**(raw.get("thresholds") or {}), key: value}
    raw = apply_overrides(raw, overrides)
    source = str(config) if config is not None else "token-dynamics options"
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    return validate(raw, TokenDynamicsConfig, source)


def token_dynamics_command(
    checkpoints: list[str] | None = None,
    run_dir: str | None = None,
    validation: str | None = None,
    out: str | None = None,
    *,
    progress: bool = True,
    console=None,
    **options,
) -> dict:
    """`token_dynamics` on the config `token_dynamics_config` builds from these arguments (no stage.json: the
    `token_dynamics` stage kind, what `slm analyze token-dynamics` runs, adds it). Returns the JSON's content."""
    cfg = token_dynamics_config(checkpoints, run_dir, validation, out, **options)
    return token_dynamics(cfg, progress=progress, console=console)
