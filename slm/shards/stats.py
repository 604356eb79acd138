"""`slm shards stats | plot`: token counts, reference-loss quantiles, noise separation, histogram.

Everything streams over the shards in row batches (memory-mapped, one batch of one shard at a
time); nothing holds all tokens. Quantiles and the ROC AUC are still *exact*, in two passes:

1. one pass counts tokens and bins every scored reference loss by the top 16 bits of an
   order-preserving 32-bit key of its float32 value (65,536 buckets; distinct buckets hold
   distinct values, so buckets are ordered like the values they hold);
2. a second pass gathers only the values of the buckets that are needed: the buckets holding
   the order statistics the quantiles interpolate between, and (for the AUC) the buckets holding
   both noise and clean tokens, in groups of at most COLLECT_BUDGET values per pass (so a very
   large noise-tagged corpus takes several passes instead of unbounded memory; a single bucket
   larger than the budget is still gathered whole).

Quantiles use numpy's default ("linear") definition; the AUC counts ties as one half.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm.errors import SlmError
from slm.shards.format import fixed_list_to_numpy
from slm.shards.reader import ShardSet

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
NUM_BUCKETS = 1 << 16
COLLECT_BUDGET = 1 << 25  # most values the exact pass holds at once (float32 + label each)
BATCH_TOKENS = 1 << 20  # tokens per streamed row batch

_SIGN = np.uint32(0x80000000)


def as_shardset(shards: ShardSet | str | Path) -> ShardSet:
    return shards if isinstance(shards, ShardSet) else ShardSet(shards)


def quantile_key(q: float) -> str:
    return f"p{q * 100:g}"


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (NaN excluded by the caller; -0.0 == +0.0)."""
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def iter_batches(
    shards: ShardSet, max_rows: int | None = None, with_noise: bool = True
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(shard name, ref_loss [n, L] float32, loss_mask [n, L] bool, noise [n, L] bool or None)
    for the first `max_rows` rows (all when None), in global row order."""
    L = shards.seq_len
    cols = ["ref_loss", "loss_mask"] + (["noise"] if with_noise and "noise" in shards.columns else [])
    left = len(shards) if max_rows is None else max(0, int(max_rows))
    per_batch = max(1, BATCH_TOKENS // L)
    for name in shards.names:
        if left <= 0:
            return
        table = shards.table(name).select(cols)
        for batch in table.to_batches(max_chunksize=per_batch):
            if left <= 0:
                return
            n = min(batch.num_rows, left)
            batch = batch.slice(0, n)
            left -= n
            get = lambda c, batch=batch: fixed_list_to_numpy(batch.column(c), L)
            noise = get("noise").astype(bool) if "noise" in cols else None
            yield name, get("ref_loss"), get("loss_mask").astype(bool), noise


@dataclass
class _Counts:
    """What the first pass gathers."""

    rows: int = 0
    tokens: int = 0
    scored: int = 0
    nan_tokens: int = 0
    total: float = 0.0
    total_noise: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    per_shard: dict = field(default_factory=dict)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BUCKETS, np.int64))
    hist_noise: np.ndarray | None = None


def _first_pass(shards: ShardSet, max_rows: int | None) -> _Counts:
    c = _Counts()
    if "noise" in shards.columns:
        c.hist_noise = np.zeros(NUM_BUCKETS, np.int64)
    for name, ref, mask, noise in iter_batches(shards, max_rows):
        finite = np.isfinite(ref)
        scored = mask & finite
        nan = int((mask[:, 1:] & ~finite[:, 1:]).sum())  # position 0 is NaN by definition
        values = ref[scored]
        s = c.per_shard.setdefault(
            name, {"shard": name, "rows": 0, "tokens": 0, "scored_tokens": 0, "nan_tokens": 0, "_sum": 0.0}
        )
        s["rows"] += len(ref)
        s["tokens"] += int(mask.sum())
        s["scored_tokens"] += len(values)
        s["nan_tokens"] += nan
        s["_sum"] += float(values.sum(dtype=np.float64))
        c.rows += len(ref)
        c.tokens += int(mask.sum())
        c.scored += len(values)
        c.nan_tokens += nan
        c.total += float(values.sum(dtype=np.float64))
        if len(values):
            c.minimum = min(c.minimum, float(values.min()))
            c.maximum = max(c.maximum, float(values.max()))
        buckets = sortable_keys(values) >> 16
        c.hist += np.bincount(buckets, minlength=NUM_BUCKETS)
        if noise is not None:
            tagged = noise[scored]
            c.hist_noise += np.bincount(buckets[tagged], minlength=NUM_BUCKETS)
            c.total_noise += float(values[tagged].sum(dtype=np.float64))
    return c


def _gather(shards: ShardSet, max_rows: int | None, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values (float32) of the scored tokens whose bucket is flagged in `want`, with noise labels."""
    values, labels = [], []
    for _, ref, mask, noise in iter_batches(shards, max_rows):
        scored = mask & np.isfinite(ref)
        v = ref[scored]
        pick = want[sortable_keys(v) >> 16]
        values.append(v[pick])
        labels.append(noise[scored][pick] if noise is not None else np.zeros(int(pick.sum()), bool))
    v = np.concatenate(values) if values else np.zeros(0, np.float32)
    lab = np.concatenate(labels) if labels else np.zeros(0, bool)
    order = np.argsort(v, kind="stable")
    return v[order], lab[order]


def _linear_quantile(lo_val: float, hi_val: float, t: float) -> float:
    """numpy's `_lerp`, so that the result equals np.quantile(..., method='linear') exactly."""
    diff = hi_val - lo_val
    return hi_val - diff * (1 - t) if t >= 0.5 else lo_val + diff * t


def _quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    h = (n - 1) * q  # numpy's virtual index for method='linear'
    if h >= n - 1:
        return n - 1, n - 1, 0.0
    if h < 0:
        return 0, 0, 0.0
    lo = int(np.floor(h))
    return lo, lo + 1, h - lo


def _exact(shards: ShardSet, max_rows: int | None, c: _Counts, ranks: set[int], auc: bool, cut_rank: int | None = None):
    """Order statistics at `ranks` (0-based, ascending order); when `auc`, the noise ROC AUC; with
    `cut_rank`, the (noise, clean) counts of tokens <= the value at that rank (it must be in `ranks`)."""
    hist = c.hist
    before = np.concatenate([[0], np.cumsum(hist)[:-1]])  # values in lower buckets
    need = {int(np.searchsorted(np.cumsum(hist), r, side="right")) for r in ranks}
    noise_h = c.hist_noise
    clean_h = hist - noise_h if noise_h is not None else None
    if auc:
        need |= set(np.nonzero((noise_h > 0) & (clean_h > 0))[0].tolist())
    groups, cur, size = [], [], 0
    for b in sorted(need):
        if cur and size + hist[b] > COLLECT_BUDGET:
            groups.append(cur)
            cur, size = [], 0
        cur.append(b)
        size += int(hist[b])
    if cur:
        groups.append(cur)
    stats: dict[int, float] = {}
    within = 0.0
    kept = None
    for group in groups:
        want = np.zeros(NUM_BUCKETS, bool)
        want[group] = True
        values, labels = _gather(shards, max_rows, want)
        start = 0
        for b in group:  # buckets are disjoint value ranges, so the sorted values come bucket by bucket
            v, lab = values[start : start + hist[b]], labels[start : start + hist[b]]
            start += int(hist[b])
            for r in ranks:
                if before[b] <= r < before[b] + hist[b]:
                    stats[r] = float(v[r - before[b]])
            if cut_rank is not None and before[b] <= cut_rank < before[b] + hist[b]:
                inside = v <= v[cut_rank - before[b]]
                below_noise = int(noise_h[:b].sum()) if noise_h is not None else 0
                kept = (
                    below_noise + int((inside & lab).sum()),
                    int(before[b]) - below_noise + int((inside & ~lab).sum()),
                )
            if auc and noise_h[b] and clean_h[b]:
                clean = v[~lab]  # already sorted
                nv = v[lab]
                less = np.searchsorted(clean, nv, side="left")
                leq = np.searchsorted(clean, nv, side="right")
                within += float(less.sum()) + 0.5 * float((leq - less).sum())
    result = None
    if auc:
        n_noise, n_clean = int(noise_h.sum()), int(clean_h.sum())
        if n_noise and n_clean:
            clean_below = np.concatenate([[0], np.cumsum(clean_h)[:-1]])
            cross = float((noise_h.astype(np.float64) * clean_below).sum())
            result = (cross + within) / (float(n_noise) * float(n_clean))
    return stats, result, kept


def _share(a: int, b: int) -> float | None:
    return a / b if b else None


def shard_stats(
    shards: ShardSet | str | Path, ratio: float | None = None, max_rows: int | None = None, _auc: bool = True
) -> dict:
    """Counts, reference-loss quantiles, per-shard figures and (with a `noise` column) how well
    the reference loss alone separates noise.

    Selection proxy (`ratio`): without a model there is no excess loss, so the reference-only
    proxy keeps the `ratio` of scored tokens with the *lowest* reference loss (the text the
    reference finds predictable; noise tends to score high): cut = the k-th smallest ref_loss,
    k = round(ratio * scored tokens), kept = ref_loss <= cut (ties at the cut are all kept).
    Reported: the share of noise tokens dropped (recall of the drop) and the share of kept tokens
    that are clean (precision). AUC: P(ref_loss of a noise token > that of a clean token), ties
    counted one half; 0.5 is chance, 1.0 a perfect detector.
    `max_rows` reads only the first rows (global order: shards by name, rows in order).
    """
    shards = as_shardset(shards)
    if ratio is not None and not 0 < ratio <= 1:
        raise SlmError(f"ratio={ratio}: must lie in (0, 1]")
    if max_rows is not None and max_rows < 1:
        raise SlmError(f"max_rows={max_rows}: must be at least 1")
    c = _first_pass(shards, max_rows)
    n = c.scored
    ranks: set[int] = set()
    plan = {}
    if n:
        for q in QUANTILES:
            lo, hi, t = _quantile_ranks(n, q)
            plan[q] = (lo, hi, t)
            ranks |= {lo, hi}
    k = int(np.round(ratio * n)) if ratio is not None else 0
    if k:
        ranks.add(k - 1)
    want_auc = _auc and c.hist_noise is not None
    order_stats, auc, kept = (
        _exact(shards, max_rows, c, ranks, want_auc, k - 1 if k else None) if n else ({}, None, None)
    )

    per_shard = []
    for s in c.per_shard.values():
        total = s.pop("_sum")
        per_shard.append({**s, "mean_ref_loss": total / s["scored_tokens"] if s["scored_tokens"] else None})
    out = {
        "directory": str(shards.directory),
        "seq_len": shards.seq_len,
        "max_rows": max_rows,
        "shards": len(per_shard),
        "rows": c.rows,
        "tokens": c.tokens,
        "scored_tokens": n,
        "nan_tokens": c.nan_tokens,
        "padding_tokens": c.rows * shards.seq_len - c.tokens,
        "ref_loss": {
            "mean": c.total / n if n else None,
            "min": c.minimum if n else None,
            "max": c.maximum if n else None,
            "quantiles": {
                quantile_key(q): _linear_quantile(order_stats[lo], order_stats[hi], t)
                for q, (lo, hi, t) in plan.items()
            },
        },
        "per_shard": per_shard,
        "noise": None,
        "selection": None,
    }
    if c.hist_noise is not None:
        n_noise = int(c.hist_noise.sum())
        out["noise"] = {
            "noise_tokens": n_noise,
            "clean_tokens": n - n_noise,
            "noise_share": _share(n_noise, n),
            "mean_ref_loss_noise": c.total_noise / n_noise if n_noise else None,
            "mean_ref_loss_clean": (c.total - c.total_noise) / (n - n_noise) if n - n_noise else None,
            "auc": auc,
        }
    if ratio is not None:
        sel = {
            "rule": "reference-only proxy: keep ref_loss <= cut (the lowest-loss ratio)",
            "ratio": ratio,
            "cut": None,
            "kept_tokens": 0,
        }
        kept_noise = kept_clean = 0
        if k:
            kept_noise, kept_clean = kept
            sel.update(cut=order_stats[k - 1], kept_tokens=kept_noise + kept_clean)
        sel["kept_fraction"] = _share(sel["kept_tokens"], n)
        if out["noise"] is not None:
            n_noise = out["noise"]["noise_tokens"]
            dropped = n - sel["kept_tokens"]
            sel.update(
                noise_dropped_share=_share(n_noise - kept_noise, n_noise),  # recall of the drop
                kept_clean_share=_share(kept_clean, sel["kept_tokens"]),  # precision of the keep
                noise_share_kept=_share(kept_noise, sel["kept_tokens"]),
                noise_share_dropped=_share(n_noise - kept_noise, dropped),
            )
        out["selection"] = sel
    return out


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_stats(stats: dict, console=None, max_shards: int = 20) -> None:
    """The figures of `shard_stats` as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(
        title=f"shards in {stats['directory']}"
        + (f" (first {stats['max_rows']:,} rows)" if stats.get("max_rows") else ""),
        show_header=False,
    )
    head.add_column(style="bold")
    head.add_column(justify="right")
    for key in ("shards", "rows", "tokens", "scored_tokens", "nan_tokens", "padding_tokens"):
        head.add_row(key.replace("_", " "), _fmt(stats[key]))
    ref = stats["ref_loss"]
    head.add_row("mean ref loss", _fmt(ref["mean"]))
    head.add_row("min / max ref loss", f"{_fmt(ref['min'])} / {_fmt(ref['max'])}")
    console.print(head)
    if ref["quantiles"]:
        qt = Table(title="reference loss quantiles")
        for key in ref["quantiles"]:
            qt.add_column(key, justify="right")
        qt.add_row(*(_fmt(v) for v in ref["quantiles"].values()))
        console.print(qt)
    per = Table(title="per shard")
    for col in ("shard", "rows", "tokens", "scored", "NaN", "mean ref loss"):
        per.add_column(col, justify="left" if col == "shard" else "right")
    for s in stats["per_shard"][:max_shards]:
        per.add_row(
            s["shard"],
            _fmt(s["rows"]),
            _fmt(s["tokens"]),
            _fmt(s["scored_tokens"]),
            _fmt(s["nan_tokens"]),
            _fmt(s["mean_ref_loss"]),
        )
    if len(stats["per_shard"]) > max_shards:
        per.add_row(f"... {len(stats['per_shard']) - max_shards} more", "", "", "", "", "")
    console.print(per)
    noise, sel = stats.get("noise"), stats.get("selection")
    if noise or sel:
        nt = Table(
            title="noise separation by reference loss" if noise else "reference-only selection", show_header=False
        )
        nt.add_column(style="bold")
        nt.add_column(justify="right")
        if noise:
            nt.add_row("noise share (scored tokens)", _pct(noise["noise_share"]))
            nt.add_row(
                "mean ref loss noise / clean",
                f"{_fmt(noise['mean_ref_loss_noise'])} / {_fmt(noise['mean_ref_loss_clean'])}",
            )
            nt.add_row("ROC AUC of ref loss as noise detector", _fmt(noise["auc"]))
        if sel:
            nt.add_row(
                f"keep lowest-ref-loss {_pct(sel['ratio'])} (cut {_fmt(sel['cut'])})",
                f"{_fmt(sel['kept_tokens'])} kept ({_pct(sel['kept_fraction'])})",
            )
            if noise:
                nt.add_row("noise tokens dropped (recall)", _pct(sel["noise_dropped_share"]))
                nt.add_row("kept tokens clean (precision)", _pct(sel["kept_clean_share"]))
                nt.add_row(
                    "noise share kept / dropped",
                    f"{_pct(sel['noise_share_kept'])} / {_pct(sel['noise_share_dropped'])}",
                )
        console.print(nt)


def plot_histogram(
    shards: ShardSet | str | Path, path: str | Path, bins: int = 100, max_rows: int | None = None
) -> Path:
    """Histogram PNG of the reference loss (log-count axis), noise and clean apart when tagged,
    with the quantiles marked. Written atomically."""
    from slm.utils.plots import plt, save_png

    shards = as_shardset(shards)
    if bins < 1:
        raise SlmError(f"bins={bins}: must be at least 1")
    stats = shard_stats(shards, max_rows=max_rows, _auc=False)
    ref = stats["ref_loss"]
    if not stats["scored_tokens"]:
        raise SlmError(f"{shards.directory}: no scored tokens to plot")
    lo, hi = ref["min"], ref["max"]
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {"all": np.zeros(bins, np.int64), "noise": np.zeros(bins, np.int64)}
    for _, r, mask, noise in iter_batches(shards, max_rows):
        scored = mask & np.isfinite(r)
        counts["all"] += np.histogram(r[scored], edges)[0]
        if noise is not None:
            counts["noise"] += np.histogram(r[scored & noise], edges)[0]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if stats["noise"] is not None:
        ax.stairs(
            counts["all"] - counts["noise"],
            edges,
            fill=True,
            alpha=0.55,
            color="tab:green",
            label=f"clean ({stats['noise']['clean_tokens']:,})",
        )
        ax.stairs(
            counts["noise"],
            edges,
            fill=True,
            alpha=0.55,
            color="tab:red",
            label=f"noise ({stats['noise']['noise_tokens']:,})",
        )
    else:
        ax.stairs(
            counts["all"],
            edges,
            fill=True,
            alpha=0.7,
            color="tab:blue",
            label=f"scored tokens ({stats['scored_tokens']:,})",
        )
    ax.set_yscale("log")
    for key, value in ref["quantiles"].items():
        ax.axvline(value, color="black", lw=0.8, ls="--", alpha=0.6)
        ax.text(
            value,
            0.98,
            f" {key} {value:.2f}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
        )
    ax.axvline(ref["mean"], color="tab:purple", lw=1.0, label=f"mean {ref['mean']:.3f}")
    ax.set_xlabel("reference loss (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"{shards.directory.name}: {stats['scored_tokens']:,} scored tokens in {stats['rows']:,} rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
