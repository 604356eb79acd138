"""`slm shards inspect`: one row's tokens with their reference loss, and what RHO-1 would keep.

Without a model the view colours tokens by reference loss (green low -> red high). With a model
(any HF causal LM on the shards' tokenizer) it adds the model's loss per token and the excess
loss  excess_t = model_loss_t - ref_loss_t  (RHO-1 eq. 1); tokens are coloured by excess and
marked kept (bold) or dropped (dim, struck through), where kept is either `excess >= threshold`
or the top `ratio` of the row's valid tokens by excess (slm.selection.top_k_mask, the
`sequence` mode's rule). Valid tokens are real (loss_mask 1) with finite losses; position 0 of a
row has no context and never is (see slm.shards.format for the alignment).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError
from slm.models.token_loss import token_losses
from slm.selection import top_k_mask
from slm.shards.reader import ShardSet
from slm.utils.io import atomic_write_text

# green (low) -> yellow -> red (high): ColorBrewer RdYlGn, reversed
_SCALE = ((0x1A, 0x98, 0x50), (0xFE, 0xE0, 0x8B), (0xD7, 0x30, 0x27))


@dataclass(frozen=True)
class TokenView:
    index: int
    token_id: int
    piece: str
    ref_loss: float
    valid: bool
    padding: bool
    noise: bool | None = None
    model_loss: float | None = None
    excess: float | None = None
    kept: bool | None = None


@dataclass
class RowView:
    """One row, token by token (arrays of length seq_len)."""

    row: int
    shard: str
    sequence_id: int
    token_ids: np.ndarray
    pieces: list[str]  # each token decoded on its own
    ref_loss: np.ndarray  # float32, NaN where unscored
    loss_mask: np.ndarray  # bool, False on padding
    valid: np.ndarray  # bool: real token with finite losses
    noise: np.ndarray | None = None  # bool, when the shards carry the demo's noise tags
    model_loss: np.ndarray | None = None
    excess: np.ndarray | None = None  # model_loss - ref_loss, NaN where not valid
    kept: np.ndarray | None = None  # bool, when a threshold or ratio was given with a model
    threshold: float | None = None
    ratio: float | None = None
    model_name: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def token(self, i: int) -> TokenView:
        f = lambda a: None if a is None else float(a[i])  # noqa: E731
        b = lambda a: None if a is None else bool(a[i])  # noqa: E731
        return TokenView(
            i,
            int(self.token_ids[i]),
            self.pieces[i],
            float(self.ref_loss[i]),
            bool(self.valid[i]),
            not bool(self.loss_mask[i]),
            b(self.noise),
            f(self.model_loss),
            f(self.excess),
            b(self.kept),
        )

    def tokens(self) -> list[TokenView]:
        return [self.token(i) for i in range(len(self))]

    @property
    def color_by(self) -> str:
        return "excess" if self.excess is not None else "ref_loss"

    def summary(self) -> dict:
        v = self.valid
        mean = lambda a, m: float(a[m].mean()) if a is not None and m.any() else None  # noqa: E731
        out = {
            "row": self.row,
            "shard": self.shard,
            "sequence_id": self.sequence_id,
            "tokens": int(self.loss_mask.sum()),
            "padding": int((~self.loss_mask).sum()),
            "valid_tokens": int(v.sum()),
            "mean_ref_loss": mean(self.ref_loss, v),
            "mean_model_loss": mean(self.model_loss, v),
            "mean_excess": mean(self.excess, v),
            "kept_tokens": None,
            "kept_fraction": None,
            "noise_share": float(self.noise[v].mean()) if self.noise is not None and v.any() else None,
            "noise_share_kept": None,
            "noise_share_dropped": None,
        }
        if self.kept is not None:
            kept, dropped = self.kept & v, ~self.kept & v
            out["kept_tokens"] = int(kept.sum())
            out["kept_fraction"] = out["kept_tokens"] / max(int(v.sum()), 1)
            if self.noise is not None:
                out["noise_share_kept"] = float(self.noise[kept].mean()) if kept.any() else None
                out["noise_share_dropped"] = float(self.noise[dropped].mean()) if dropped.any() else None
        return out

    def scale(self) -> tuple[np.ndarray, float, float]:
        """The coloured values (excess with a model, else ref loss) and their colour range: the
        row's 2nd..98th percentile, so one outlier does not wash out the rest of the row."""
        values = self.excess if self.excess is not None else self.ref_loss
        finite = values[self.valid & np.isfinite(values)]
        if not len(finite):
            return values, 0.0, 1.0
        lo, hi = (float(x) for x in np.percentile(finite, [2, 98]))
        return values, lo, hi if hi > lo else lo + 1.0


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte), to show partial UTF-8 tokens as bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def decode_pieces(tokenizer, ids) -> list[str]:
    """Each token decoded alone; a token holding part of a UTF-8 character shows its bytes (\\xe2)."""
    cache: dict[int, str] = {}
    out = []
    for i in (int(x) for x in ids):
        if i not in cache:
            piece = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if "\ufffd" in piece:
                raw = tokenizer.convert_ids_to_tokens(i)
                if isinstance(raw, str) and raw and all(ch in _BYTE_OF for ch in raw):
                    piece = bytes(_BYTE_OF[ch] for ch in raw).decode("utf-8", errors="backslashreplace")
                elif isinstance(raw, str):
                    piece = raw
            cache[i] = piece
        out.append(cache[i])
    return out


def visible(piece: str) -> str:
    """The piece with whitespace shown: newline as ↵ (and a line break), tab as →, a token made
    only of spaces as middle dots, other control characters escaped; the empty piece as ∅."""
    if piece == "":
        return "∅"
    if piece.strip(" ") == "":
        return "·" * len(piece)
    out = []
    for ch in piece:
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t":
            out.append("→")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def render_row(
    shards: ShardSet | str | Path,
    row: int,
    tokenizer,
    model=None,
    threshold: float | None = None,
    ratio: float | None = None,
) -> RowView:
    """Row `row` (global index over the shard set) with per-token pieces and losses; with a
    `model`, its per-token loss, the excess loss and (given `threshold` or `ratio`) what is kept."""
    shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    if not 0 <= row < len(shards):
        raise SlmError(f"row {row}: out of range; {shards.directory} holds rows 0..{len(shards) - 1}")
    if threshold is not None and ratio is not None:
        raise SlmError("give either a threshold or a ratio, not both")
    if model is None and (threshold is not None or ratio is not None):
        raise SlmError("a threshold or ratio selects by excess loss (model loss - reference loss); give a model too")
    if ratio is not None and not 0 < ratio <= 1:
        raise SlmError(f"ratio={ratio}: must lie in (0, 1]")
    if threshold is not None and not np.isfinite(threshold):
        raise SlmError(f"threshold={threshold}: must be a finite number")
    cols = ("sequence_id", "input_ids", "ref_loss", "loss_mask") + (("noise",) if "noise" in shards.columns else ())
    data = {k: v[0] for k, v in shards.rows(np.array([row]), cols).items()}
    ids = data["input_ids"].astype(np.int64)
    meta = shards.metadata
    if len(tokenizer) != meta.vocab_size:
        raise SlmError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
            f"has {len(tokenizer)} tokens, "
            f"the shards were scored with tokenizer {meta.tokenizer_name!r} of {meta.vocab_size} tokens"
        )
    shard = shards.names[int(np.searchsorted(shards.offsets, row, side="right") - 1)]
    ref = data["ref_loss"].astype(np.float32)
    mask = data["loss_mask"].astype(bool)
    view = RowView(
        row=row,
        shard=shard,
        sequence_id=int(data["sequence_id"]),
        token_ids=ids,
        pieces=decode_pieces(tokenizer, ids),
        ref_loss=ref,
        loss_mask=mask,
        valid=mask & np.isfinite(ref),
        noise=data["noise"].astype(bool) if "noise" in data else None,
        threshold=threshold,
        ratio=ratio,
    )
    if model is None:
        return view
    emb = model.get_input_embeddings()
    if emb is not None and ids.max(initial=0) >= emb.num_embeddings:
        raise SlmError(
            f"row {row} holds token id {int(ids.max())}, the model's vocabulary has {emb.num_embeddings}; "
            "is it on the shards' tokenizer?"
        )
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = token_losses(model, torch.from_numpy(ids)[None].to(param.device))[0].float().cpu().numpy()
    finally:
        model.train(was_training)
    view.model_loss = loss
    view.valid = view.valid & np.isfinite(loss)
    view.excess = np.where(view.valid, loss - ref, np.nan).astype(np.float32)  # RHO-1 eq. 1
    view.model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if threshold is not None:
        view.kept = view.valid & (view.excess >= threshold)
    elif ratio is not None:
        view.kept = top_k_mask(torch.from_numpy(view.excess), torch.from_numpy(view.valid), ratio).numpy()
    return view


def _hex(t: float, tint: float = 0.0) -> str:
    """The scale's colour at t in [0, 1], mixed with white by `tint`."""
    t = min(max(t, 0.0), 1.0) * 2
    a, b = (_SCALE[0], _SCALE[1]) if t <= 1 else (_SCALE[1], _SCALE[2])
    t = t if t <= 1 else t - 1
    rgb = [round((x + (y - x) * t) * (1 - tint) + 255 * tint) for x, y in zip(a, b)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _segments(view: RowView):
    """(start, count) runs: each real token alone, a run of padding as one."""
    i, n = 0, len(view)
    while i < n:
        j = i + 1
        if not view.loss_mask[i]:
            while j < n and not view.loss_mask[j]:
                j += 1
        yield i, j - i
        i = j


def _numbers(view: RowView, i: int) -> str:
    t = view.token(i)
    num = lambda x: f"{x:.3f}" if np.isfinite(x) else "-"  # noqa: E731
    parts = [f"#{i} id {t.token_id}", f"ref {num(t.ref_loss)}"]
    if t.model_loss is not None:
        parts += [f"model {num(t.model_loss)}", f"excess {num(t.excess)}"]
    if t.kept is not None and t.valid:
        parts.append("kept" if t.kept else "dropped")
    if not t.valid:
        parts.append("not scored")
    if t.noise:
        parts.append("noise")
    return " | ".join(parts)


def _legend(view: RowView) -> tuple[str, str, str]:
    """What the colour shows, what the styles mean, what grey means."""
    what = "excess loss (model - reference)" if view.color_by == "excess" else "reference loss"
    styles = "bold = kept, dim struck = dropped" if view.kept is not None else ""
    return what, styles, "grey = not scored (position 0, padding, NaN)"


def _summary_line(view: RowView) -> str:
    s = view.summary()
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    parts = [
        f"{s['tokens']} tokens ({s['valid_tokens']} scored, {s['padding']} padding)",
        f"mean ref loss {num(s['mean_ref_loss'])}",
    ]
    if view.model_loss is not None:
        parts.append(f"mean model loss {num(s['mean_model_loss'])}, mean excess {num(s['mean_excess'])}")
    if view.kept is not None:
        rule = f"excess >= {view.threshold:g}" if view.threshold is not None else f"top {pct(view.ratio)} by excess"
        parts.append(f"kept {s['kept_tokens']}/{s['valid_tokens']} ({pct(s['kept_fraction'])}, {rule})")
    if view.noise is not None:
        if view.kept is not None:
            parts.append(f"noise share kept {pct(s['noise_share_kept'])} / dropped {pct(s['noise_share_dropped'])}")
        else:
            parts.append(f"noise share {pct(s['noise_share'])}")
    return "; ".join(parts)


def _title(view: RowView) -> str:
    return f"row {view.row} ({view.shard}, sequence {view.sequence_id})" + (
        f", model {view.model_name}" if view.model_name else ""
    )


def print_row(view: RowView, console=None) -> None:
    """The row's tokens coloured on the console (rich), a legend line and a summary line."""
    from rich.console import Console
    from rich.style import Style
    from rich.text import Text

    console = console or Console()
    values, lo, hi = view.scale()
    text = Text()
    for i, n in _segments(view):
        piece = visible(view.pieces[i])
        if n > 1 or not view.loss_mask[i]:
            text.append(f"{piece}×{n}" if n > 1 else piece, style=Style(color="grey50", italic=True))
        elif not view.valid[i]:
            text.append(piece, style=Style(color="grey50"))
        else:
            kept = None if view.kept is None else bool(view.kept[i])
            text.append(
                piece,
                style=Style(
                    color=_hex((float(values[i]) - lo) / (hi - lo)),
                    bold=kept is True,
                    dim=kept is False,
                    strike=kept is False,
                ),
            )
    console.print(Text(_title(view), style="bold"))
    console.print(text)
    what, styles, grey = _legend(view)
    legend = f"colour: {what}, green {lo:.2f} → red {hi:.2f}"
    console.print(Text("  ".join(x for x in (legend, styles, grey) if x), style="italic"))
    console.print(_summary_line(view), highlight=False, markup=False)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.row{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;line-height:1.9;\
border:1px solid #ddd;padding:.8em}
.t{border-radius:2px;padding:1px 0;margin:0 1px 0 0}
.k{font-weight:bold}.d{opacity:.45;text-decoration:line-through}
.u{color:#888;background:#eee}.p{color:#999;font-style:italic}.n{box-shadow:inset 0 -2px 0 #7b3294}
.bar{display:inline-block;width:12em;height:.9em;vertical-align:middle;background:linear-gradient(to right,%s,%s,%s)}
.legend,.summary{margin:.6em 0;font-size:.92em}"""


def spans_html(view: RowView, scale: tuple[float, float] | None = None) -> str:
    """The row's tokens as HTML spans (text escaped), coloured on the row's scale or on `scale` (lo, hi), kept bold
    and dropped struck through, each token's numbers in its title; CSS classes from `CSS`."""
    values, lo, hi = view.scale()
    if scale is not None:
        lo, hi = scale[0], max(scale[1], scale[0] + 1e-6)
    spans = []
    for i, n in _segments(view):
        piece = html.escape(visible(view.pieces[i]))
        if n > 1 or not view.loss_mask[i]:
            spans.append(f'<span class="t p" title="{n} padding token(s)">{piece}{f"×{n}" if n > 1 else ""}</span>')
            continue
        cls = ["t"]
        style = ""
        if not view.valid[i]:
            cls.append("u")
        else:
            style = f' style="background:{_hex((float(values[i]) - lo) / (hi - lo), tint=0.35)}"'
            if view.kept is not None:
                cls.append("k" if view.kept[i] else "d")
        if view.noise is not None and view.noise[i]:
            cls.append("n")
        spans.append(f'<span class="{" ".join(cls)}"{style} title="{html.escape(_numbers(view, i))}">{piece}</span>')
    return "".join(spans)


def css() -> str:
    """The style sheet of the token views (the colour bar runs along the scale)."""
    return _CSS % (_hex(0, 0.35), _hex(0.5, 0.35), _hex(1, 0.35))


def write_html(view: RowView, path: str | Path) -> Path:
    """The same view as one self-contained HTML page; each token's numbers in its title."""
    _, lo, hi = view.scale()
    what, styles, grey = _legend(view)
    noise_note = "purple underline = noise tag" if view.noise is not None else ""
    legend = " · ".join(html.escape(x) for x in (styles, grey, noise_note) if x)
    title = html.escape(_title(view))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
{css()}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="legend">colour: {html.escape(what)}, green {lo:.2f} <span class="bar"></span> {hi:.2f} red · {legend}</div>
<div class="summary">{html.escape(_summary_line(view))}</div>
<div class="row">{spans_html(view)}</div>
</body>
</html>
"""
    atomic_write_text(path, page)
    return Path(path)
