"""`slm shards report`: what the selection keeps, on one HTML page (and JSON), with no ground-truth column.

Sample: at most `max_rows` rows spread evenly over the shard set (the same rows on every run). Selection: one cut
over all sampled valid tokens keeps the top `ratio` of them by a score (`slm.selection.top_k_mask`, ties broken as
in training):
  - with a model: excess loss = model loss - reference loss (RHO-1 eq. 1);
  - without one, from shards scored with a base model: the static excess, base_loss - ref_loss;
  - else the reference-only proxy of `slm shards stats`: the lowest reference losses are kept (the excess against a
    model whose loss is the same on every token, as an untrained one nearly is).
With the corpus the shards were scored from, each shard's documents are tokenised and packed again exactly as
`slm score` packed them and checked token for token against the shard, so that every sampled token knows its
document, and each document its source (its `source_field` value, else its file). Without it the unit is the row
and the source the shard.

The page: histograms of reference loss and of the score (kept against dropped), the share kept per source and per
shard, the documents most and least kept with their tokens highlighted (`slm.shards.inspect.spans_html`), the token
strings most often kept and dropped, and, given the pretrain runs, the SLM and CLM held-out curves. Every text on
it is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError
from slm.models.token_loss import token_losses
from slm.selection import top_k_mask
from slm.shards.inspect import RowView, css, decode_pieces, spans_html, visible
from slm.shards.layout import shard_documents, shard_index
from slm.shards.reader import ShardSet
from slm.utils.io import atomic_write_json, atomic_write_text

HIST_BINS = 60
TOP_STRINGS = 20


def sample_rows(n_rows: int, max_rows: int) -> np.ndarray:
    """At most `max_rows` row indices spread evenly over 0..n_rows-1 (first and last included)."""
    if n_rows < 1:
        raise SlmError("the shards hold no rows")
    return np.unique(np.linspace(0, n_rows - 1, num=min(n_rows, max_rows)).round().astype(np.int64))


def score_sample(shards: ShardSet, rows: np.ndarray, ratio: float, model=None, batch_size: int = 8) -> dict:
    """The sampled rows' arrays ([n, seq_len]), the selection score, the rule, and what one cut at `ratio` keeps."""
    cols = ("sequence_id", "input_ids", "ref_loss", "loss_mask")
    cols += ("base_loss",) if model is None and "base_loss" in shards.columns else ()
    data = shards.rows(rows, cols)
    ids = data["input_ids"].astype(np.int64)
    ref = data["ref_loss"].astype(np.float32)
    mask = data["loss_mask"].astype(bool)
    valid = mask & np.isfinite(ref)
    model_loss = None
    if model is not None:
        emb = model.get_input_embeddings()
        if emb is not None and ids.max(initial=0) >= emb.num_embeddings:
            raise SlmError(
                f"the shards hold token id {int(ids.max())}, the model's vocabulary has {emb.num_embeddings}; "
                "is it on the shards' tokenizer?"
            )
        dev = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            parts = [
                token_losses(model, torch.from_numpy(ids[b : b + batch_size]).to(dev)).float().cpu().numpy()
                for b in range(0, len(ids), batch_size)
            ]
        model_loss = np.concatenate(parts)
        valid &= np.isfinite(model_loss)
        score, kind = model_loss - ref, "excess"
        rule = "excess loss = model loss - reference loss (RHO-1 eq. 1)"
    elif "base_loss" in data:
        base = data["base_loss"].astype(np.float32)
        valid &= np.isfinite(base)
        score, kind, rule = base - ref, "static", "static excess = base_loss - ref_loss (from the shards)"
    else:
        score, kind = -ref, "proxy"
        rule = "reference-only proxy: the lowest reference losses (no model given)"
    score = np.where(valid, score, np.nan).astype(np.float32)
    flat = torch.from_numpy(np.nan_to_num(score, nan=0.0).reshape(-1))
    kept = top_k_mask(flat, torch.from_numpy(valid.reshape(-1)), ratio).numpy().reshape(valid.shape)
    return {
        "rows": rows,
        "sequence_id": data["sequence_id"],
        "input_ids": ids,
        "ref_loss": ref,
        "loss_mask": mask,
        "valid": valid,
        "model_loss": model_loss,
        "score": score,
        "kind": kind,
        "rule": rule,
        "kept": kept,
    }


def document_map(shards: ShardSet, rows: np.ndarray, corpus, tokenizer, source_field: str) -> tuple[np.ndarray, dict]:
    """Per sampled token the index of its corpus document (-1 on padding), and each such document's source.

    Each shard's documents are packed again as `slm score` packed them; a shard whose tokens differ is an error
    naming it (another corpus or tokenizer)."""
    from slm.data.corpus import load_corpus, resolve_files
    from slm.data.packed import iter_documents
    from slm.data.packing import pack_documents, token_documents

    docs = load_corpus(corpus)
    per_shard = shards.metadata.documents_per_shard
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shard_of = np.searchsorted(shards.offsets, rows, side="right") - 1
    stored = shards.rows(rows, ("input_ids",))["input_ids"]
    doc = np.full(stored.shape, -1, dtype=np.int64)
    for s in np.unique(shard_of):
        name = shards.names[s]
        if (k := shard_index(name)) is None:
            raise SlmError(f"{shards.directory / name}: not a shard name")
        lo, hi = shard_documents(k, per_shard, len(docs))
        tokens = iter_documents(docs, tokenizer, corpus.text_field, None, lo, hi)
        packed = list(pack_documents(tokens, shards.seq_len, tokenizer.eos_token_id, pad_id, corpus.packing))
        want = {int(r - shards.offsets[s]): i for i, r in enumerate(rows) if shard_of[i] == s}
        same = len(packed) == shards.offsets[s + 1] - shards.offsets[s] and all(
            np.array_equal(np.asarray(packed[j].input_ids), stored[i]) for j, i in want.items()
        )
        if not same:
            raise SlmError(
                f"{shards.directory / name}: its tokens differ from corpus.path {corpus.path!r} documents {lo}-{hi} "
                "packed again; not the corpus (or tokenizer) these shards were scored from"
            )
        for j, (_, documents) in enumerate(token_documents(packed, first=lo)):
            if j in want:
                doc[want[j]] = documents
    needed = np.unique(doc[doc >= 0])
    if source_field in docs.column_names:
        values = docs.select(needed.tolist())[source_field]
        sources = {int(d): str(v) for d, v in zip(needed, values)}
    else:
        files = resolve_files(corpus.path)
        if files is None or len(files) == 1:
            sources = {int(d): Path(files[0]).name if files else str(corpus.path) for d in needed}
        else:  # documents are read file after file, in this order (slm.data.corpus)
            ends = np.cumsum([len(load_corpus(corpus.model_copy(update={"path": f}))) for f in files])
            names = [Path(f).name for f in files]
            sources = {int(d): names[int(np.searchsorted(ends, d, side="right"))] for d in needed}
    return doc, sources


def _shares(labels: np.ndarray, valid: np.ndarray, kept: np.ndarray, names: list[str], key: str) -> list[dict]:
    """Per label: valid tokens, kept tokens and the share kept, most tokens first."""
    lab = labels[valid]
    tokens = np.bincount(lab, minlength=len(names))
    kept_n = np.bincount(lab[kept[valid]], minlength=len(names))
    out = [
        {key: names[i], "tokens": int(tokens[i]), "kept": int(kept_n[i]), "kept_share": kept_n[i] / tokens[i]}
        for i in range(len(names))
        if tokens[i]
    ]
    return sorted(out, key=lambda r: -r["tokens"])


def _histograms(sample: dict) -> dict:
    """Counts of reference loss (and of the score, unless it is the proxy) for kept and dropped tokens."""
    valid, kept = sample["valid"], sample["kept"]
    out = {}
    series = [("ref_loss", sample["ref_loss"])] + ([("score", sample["score"])] if sample["kind"] != "proxy" else [])
    for name, values in series:
        v = values[valid]
        edges = np.linspace(float(v.min()), float(v.max()) + 1e-6, HIST_BINS + 1)
        out[name] = {
            "edges": edges.tolist(),
            "kept": np.histogram(values[valid & kept], edges)[0].tolist(),
            "dropped": np.histogram(values[valid & ~kept], edges)[0].tolist(),
        }
    return out


def _token_strings(sample: dict, pieces: dict[int, str]) -> dict:
    """The token strings kept most often and dropped most often (by count), with each one's share kept."""
    ids = sample["input_ids"][sample["valid"]]
    kept = sample["kept"][sample["valid"]]
    n = np.bincount(ids)
    k = np.bincount(ids[kept], minlength=len(n))
    d = n - k

    def top(counts) -> list[dict]:
        order = [int(i) for i in np.argsort(-counts, kind="stable")[:TOP_STRINGS] if counts[i] > 0]
        return [
            {"token_id": i, "piece": pieces[i], "count": int(n[i]), "kept": int(k[i]), "kept_share": k[i] / n[i]}
            for i in order
        ]

    return {"most_kept": top(k), "most_dropped": top(d)}


def build_report(cfg, tokenizer, model=None) -> dict:
    """Every figure of the page (JSON-ready) plus, under "_views", the token views of the example documents."""
    shards = ShardSet(cfg.shards)
    if len(tokenizer) != shards.metadata.vocab_size:
        raise SlmError(
            f"tokenizer of {len(tokenizer)} tokens; the shards were scored with one of {shards.metadata.vocab_size}"
        )
    rows = sample_rows(len(shards), cfg.max_rows)
    s = score_sample(shards, rows, cfg.ratio, model, cfg.batch_size)
    valid, kept = s["valid"], s["kept"]
    if not valid.any():
        raise SlmError(f"{shards.directory}: the sampled rows hold no scored token")
    shard_index = np.searchsorted(shards.offsets, rows, side="right") - 1
    per_shard = _shares(np.broadcast_to(shard_index[:, None], valid.shape), valid, kept, shards.names, "shard")
    if cfg.corpus is not None:
        doc, sources = document_map(shards, rows, cfg.corpus, tokenizer, cfg.source_field)
        unit = "document"
    else:
        doc = np.where(s["loss_mask"], rows[:, None], -1)
        sources = {int(r): shards.names[shard_index[i]] for i, r in enumerate(rows)}
        unit = "row"
    names = sorted(set(sources.values()))
    code = {n: i for i, n in enumerate(names)}
    uniq, inverse = np.unique(doc, return_inverse=True)
    source_code = np.array([code[sources[int(d)]] if d >= 0 else 0 for d in uniq])[inverse.reshape(doc.shape)]
    per_source = _shares(source_code, valid & (doc >= 0), kept, names, "source")

    # documents (or rows) ranked by the share of their sampled tokens kept
    d_valid = doc[valid]
    units, inverse, n_tok = np.unique(d_valid, return_inverse=True, return_counts=True)
    n_kept = np.bincount(inverse.reshape(-1), weights=kept[valid], minlength=len(units)).astype(np.int64)
    ok = n_tok >= cfg.min_tokens
    ranked = sorted(zip(units[ok], n_tok[ok], n_kept[ok]), key=lambda t: (-t[2] / t[1], int(t[0])))
    pieces = dict(zip(np.unique(s["input_ids"]).tolist(), decode_pieces(tokenizer, np.unique(s["input_ids"]))))
    colour = s["score"] if s["kind"] != "proxy" else s["ref_loss"]
    lo, hi = (float(x) for x in np.percentile(colour[valid], [2, 98]))

    def example(u, n, k) -> dict:
        segments = []
        for i in np.nonzero((doc == u).any(axis=1))[0]:
            sl = np.nonzero(doc[i] == u)[0]
            sl = slice(int(sl[0]), int(sl[-1]) + 1)
            ids = s["input_ids"][i, sl]
            view = RowView(
                row=int(rows[i]),
                shard=shards.names[shard_index[i]],
                sequence_id=int(s["sequence_id"][i]),
                token_ids=ids,
                pieces=[pieces[int(t)] for t in ids],
                ref_loss=s["ref_loss"][i, sl],
                loss_mask=s["loss_mask"][i, sl],
                valid=valid[i, sl],
                model_loss=None if s["model_loss"] is None else s["model_loss"][i, sl],
                excess=None if s["kind"] == "proxy" else s["score"][i, sl],
                kept=kept[i, sl],
                ratio=cfg.ratio,
            )
            segments.append(view)
        text = "".join(p for v in segments for p in v.pieces)
        return {
            unit: int(u),
            "source": sources[int(u)],
            "tokens": int(n),
            "kept": int(k),
            "kept_share": k / n,
            "rows": [v.row for v in segments],
            "text": text,
            "_views": segments,
        }

    most = [example(*t) for t in ranked[: cfg.examples]]
    least = [example(*t) for t in ranked[::-1][: cfg.examples]]
    report = {
        "shards": str(shards.directory),
        "rows": len(shards),
        "sampled_rows": len(rows),
        "seq_len": shards.seq_len,
        "model": cfg.model,
        "rule": s["rule"],
        "score": s["kind"],
        "ratio": cfg.ratio,
        "unit": unit,
        "tokens": int(s["loss_mask"].sum()),
        "valid_tokens": int(valid.sum()),
        "kept_tokens": int(kept.sum()),
        "kept_fraction": float(kept.sum() / valid.sum()),
        "cut": float(np.min(s["score"][kept])) if kept.any() else None,
        "mean_ref_loss_kept": float(s["ref_loss"][kept].mean()) if kept.any() else None,
        "mean_ref_loss_dropped": float(s["ref_loss"][valid & ~kept].mean()) if (valid & ~kept).any() else None,
        "colour_scale": [lo, hi],
        "histograms": _histograms(s),
        "per_source": per_source,
        "per_shard": per_shard,
        "most_kept": most,
        "least_kept": least,
        "token_strings": _token_strings(s, pieces),
        "curves": _curves(cfg),
    }
    return report


def _curves(cfg) -> dict:
    from slm.analysis.compare import run_summary

    runs = {"SLM": cfg.slm_run, "CLM": cfg.clm_run}
    return {name: run_summary(d, name.lower())["curve"] for name, d in runs.items() if d}


def without_views(report: dict) -> dict:
    """The report for JSON: the token views of the examples left out."""
    strip = lambda docs: [{k: v for k, v in d.items() if k != "_views"} for d in docs]  # noqa: E731
    return {**report, "most_kept": strip(report["most_kept"]), "least_kept": strip(report["least_kept"])}


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def plot_histograms(report: dict, path: Path) -> Path:
    from slm.utils.plots import plt, save_png

    hists = report["histograms"]
    fig, axes = plt.subplots(1, len(hists), figsize=(6 * len(hists), 3.8), squeeze=False)
    labels = {"ref_loss": "reference loss (nats)", "score": f"{report['score']} score (nats)"}
    for ax, (name, h) in zip(axes[0], hists.items()):
        edges = np.asarray(h["edges"])
        ax.stairs(h["kept"], edges, fill=True, alpha=0.6, color="tab:green", label=f"kept ({sum(h['kept']):,})")
        ax.stairs(h["dropped"], edges, fill=True, alpha=0.6, color="tab:red", label=f"dropped ({sum(h['dropped']):,})")
        ax.set_yscale("log")
        ax.set_xlabel(labels[name])
        ax.set_ylabel("tokens (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ratio {report['ratio']:g}: {report['rule']}", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.1%}" if 0 <= v <= 1 else f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[k])}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _examples(docs: list[dict], unit: str, scale) -> str:
    out = []
    for d in docs:
        where = f"{unit} {d[unit]}, {d['source']}, row(s) {', '.join(map(str, d['rows']))}"
        out.append(
            f"<h3>{html.escape(where)}: {d['kept']}/{d['tokens']} tokens kept ({d['kept_share']:.1%})</h3>"
            + "".join(f'<div class="row">{spans_html(v, scale)}</div>' for v in d["_views"])
        )
    return "".join(out) or "<p>none with enough sampled tokens</p>"


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.html (self-contained: images inlined), report.json and the PNGs it shows, written atomically."""
    from slm.utils.plots import plot_learning_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json", "html": out / "report.html", "histograms": out / "histograms.png"}
    atomic_write_json(files["json"], without_views(report))
    plot_histograms(report, files["histograms"])
    curves = ""
    if report["curves"]:
        files["curves"] = out / "learning_curves.png"
        history = {n: [{"tokens": t, "heldout_loss": v} for t, v in c] for n, c in report["curves"].items()}
        plot_learning_curves(history, files["curves"], ylabel="held-out loss (eval-point sample)")
        img = _png_data(files["curves"])
        curves = f'<h2>Held-out loss during pretraining</h2><img alt="learning curves" src="{img}">'
    scale = tuple(report["colour_scale"])
    coloured = "excess loss" if report["score"] != "proxy" else "reference loss"
    strings = {k: [{**r, "piece": visible(r["piece"])} for r in v] for k, v in report["token_strings"].items()}
    string_cols = [("piece", "token"), ("count", "count"), ("kept", "kept"), ("kept_share", "share kept")]
    share_cols = [("tokens", "tokens"), ("kept", "kept"), ("kept_share", "share kept")]
    unit = report["unit"]
    e = html.escape
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>selection report: {e(report["shards"])}</title>
<style>
{css()}
table{{border-collapse:collapse;margin:.5em 0 1.2em}}td,th{{border:1px solid #ddd;padding:.2em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left;font-family:ui-monospace,monospace;white-space:pre}}
img{{max-width:100%}}.cols{{display:flex;gap:2em;flex-wrap:wrap}}
</style>
</head>
<body>
<h1>Selection report: {e(report["shards"])}</h1>
<div class="summary">{report["sampled_rows"]} of {report["rows"]} rows sampled ({report["valid_tokens"]:,} scored
tokens); kept {report["kept_tokens"]:,} ({report["kept_fraction"]:.1%}) by {e(report["rule"])}, one cut over the
sample at ratio {report["ratio"]:g}. Mean reference loss of kept tokens {_num(report["mean_ref_loss_kept"])}, of dropped
{_num(report["mean_ref_loss_dropped"])}. No ground-truth column is used.</div>
<h2>Distributions</h2>
<img alt="histograms" src="{_png_data(files["histograms"])}">
<h2>Share kept per source</h2>
{_table(report["per_source"], [("source", "source"), *share_cols])}
<h2>Share kept per shard</h2>
{_table(report["per_shard"], [("shard", "shard"), *share_cols])}
<h2>Token strings</h2>
<div class="cols"><div><h3>most often kept</h3>{_table(strings["most_kept"], string_cols)}</div>
<div><h3>most often dropped</h3>{_table(strings["most_dropped"], string_cols)}</div></div>
<div class="legend">colour: {e(coloured)}, green {scale[0]:.2f} <span class="bar"></span> {scale[1]:.2f} red ·
bold = kept, dim struck = dropped · grey = not scored</div>
<h2>{e(unit.capitalize())}s most kept</h2>
{_examples(report["most_kept"], unit, scale)}
<h2>{e(unit.capitalize())}s least kept</h2>
{_examples(report["least_kept"], unit, scale)}
{curves}
</body>
</html>
"""
    atomic_write_text(files["html"], page)
    return files
