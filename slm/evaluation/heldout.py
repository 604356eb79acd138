"""Held-out loss, domain accuracy (greedy, exact answers) and selection quality against noise tags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from slm.config import SelectionConfig
from slm.errors import SlmError
from slm.evaluation.ruler.decode import greedy_generate, stop_token_ids
from slm.models.token_loss import token_losses, token_losses_and_entropy
from slm.selection import selective_loss


def read_questions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"questions {str(path)!r}: file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row:
            raise SlmError(f"{path}:{i}: expected keys 'question' and 'answer', got {sorted(row)}")
        rows.append(row)
    if not rows:
        raise SlmError(f"questions {str(path)!r}: no questions")
    return rows


def extract_answer(generated: str, pattern: str | None) -> str:
    """The answer in `generated`: the pattern's first group, else the first line stripped."""
    if pattern:
        m = re.search(pattern, generated)
        return m.group(1).strip() if m else ""
    return generated.split("\n", 1)[0].strip()


@torch.no_grad()
def domain_accuracy(model, tokenizer, questions: list[dict], max_new_tokens: int, progress: bool = True) -> dict:
    """Exact-match accuracy of greedy answers; the per-question predictions for inspection."""
    model.eval()
    stops = [tokenizer.eos_token_id]
    newline_stops = stop_token_ids(tokenizer)
    correct, samples = 0, []
    for q in tqdm(questions, desc="domain accuracy", disable=not progress, dynamic_ncols=True):
        ids = tokenizer(q["question"], add_special_tokens=False)["input_ids"]
        # answers end at the first blank line: stop on EOS or a token holding "\n\n"
        out = greedy_generate(
            model,
            ids,
            max_new_tokens,
            chunk_len=max(len(ids), 1),
            stop_token_ids=stops + [t for t in newline_stops if "\n\n" in tokenizer.decode([t])],
        )
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred = extract_answer(text, q.get("answer_pattern"))
        ok = pred == str(q["answer"]).strip()
        correct += ok
        samples.append(
            {"question": q["question"], "generated": text, "prediction": pred, "answer": q["answer"], "correct": ok}
        )
    return {"accuracy": correct / len(questions), "n": len(questions), "samples": samples}


@torch.no_grad()
def selection_quality(
    model,
    shards,
    ratio: float,
    batch_size: int,
    max_batches: int | None,
    progress: bool = True,
    noise_codes: np.ndarray | None = None,
    kind_names: list[str] | None = None,
    mode: str = "batch",
) -> dict:
    """Precision/recall of the model's selection against the shards' noise column: the tokens that
    `slm.selection.selective_loss` keeps in training with `mode` at `ratio`, a batch of rows at a time: sequence,
    batch (RHO-1's), global (batch, in one process), soft (a weight above 1/2), or the reference-free self_loss /
    self_entropy; static needs the shards' base loss and is not measured here.

    noise_dropped: share of noise tokens the selection drops (recall of the drop);
    kept_clean: share of kept tokens that are clean (precision of the keep).
    With `noise_codes` ([rows, seq_len], 0 = clean, i + 1 = kind_names[i]; see
    `slm.analysis.noise_kinds`), also `by_kind`: per kind its share of the tokens, the share kept,
    and the mean reference loss, model loss and excess loss.
    """
    if "noise" not in shards.columns:
        raise SlmError(f"{shards.directory}: no noise column; selection quality needs the demo's noise tags")
    model.eval()
    dev = next(model.parameters()).device
    n = len(shards) if max_batches is None else min(len(shards), max_batches * batch_size)
    if noise_codes is not None and len(noise_codes) < n:
        raise SlmError(f"noise_codes cover {len(noise_codes)} rows, selection quality reads {n}")
    names = ["clean", *(kind_names or [])]
    # per code: tokens, kept, sum of reference loss, sum of model loss
    sums = np.zeros((len(names), 4))
    kept_clean = kept_total = noise_dropped = noise_total = 0
    for start in tqdm(range(0, n, batch_size), desc="selection vs noise", disable=not progress, dynamic_ncols=True):
        index = np.arange(start, min(start + batch_size, n))
        rows = shards.rows(index, ("input_ids", "ref_loss", "loss_mask", "noise"))
        ids = torch.from_numpy(rows["input_ids"]).long().to(dev)
        if mode == "self_entropy":
            ce, entropy = token_losses_and_entropy(model, ids)
        else:
            ce, entropy = token_losses(model, ids), None
        ce = ce.float()
        ref = torch.from_numpy(rows["ref_loss"]).to(dev)
        mask = torch.from_numpy(rows["loss_mask"]).to(dev)
        sel = selective_loss(ce, ref, SelectionConfig(mode=mode, ratio=ratio), mask, entropy=entropy)
        valid, kept = sel.valid, sel.kept
        noise = torch.from_numpy(rows["noise"]).bool().to(dev) & valid
        kept_total += int(kept.sum())
        kept_clean += int((kept & ~noise).sum())
        noise_total += int(noise.sum())
        noise_dropped += int((noise & ~kept).sum())
        if noise_codes is not None:
            codes = torch.from_numpy(noise_codes[index].astype(np.int64)).to(dev)
            for code in range(len(names)):
                m = (codes == code) & valid
                sums[code] += [int(m.sum()), int((m & kept).sum()), float(ref[m].nansum()), float(ce[m].sum())]
    out = {
        "ratio": ratio,
        "mode": mode,
        "noise_share": noise_total / max(int(n * shards.seq_len), 1),
        "noise_dropped": noise_dropped / max(noise_total, 1),
        "kept_clean": kept_clean / max(kept_total, 1),
    }
    if noise_codes is not None:
        total = max(sums[:, 0].sum(), 1)
        out["by_kind"] = {
            name: {
                "share": tokens / total,
                "kept": kept_n / tokens,
                "ref_loss": ref_sum / tokens,
                "model_loss": ce_sum / tokens,
                "excess": (ce_sum - ref_sum) / tokens,
            }
            for name, (tokens, kept_n, ref_sum, ce_sum) in zip(names, sums)
            if tokens
        }
    return out
