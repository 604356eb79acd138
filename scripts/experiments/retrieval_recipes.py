"""Which training recipe teaches a tiny model to retrieve a pass key? The hand-run experiments behind the
long-context demo's design (pipelines/long-context-demo.yaml), as one plain PyTorch loop.

A recipe is a list of phases `NAME:STEPS`; each phase draws its batch rows from:
    short_pk   pass-key documents with ~40 characters of filler (the needle a few tokens before its question)
    pk         pass-key documents of 40..--max-chars characters of filler (up to ~L tokens)
    short, all the same with pass-key and key-value documents mixed 50/50
    half_pk    pass-key documents, half short and half 40..--max-chars
    dom        domain text of the demo's hq.jsonl (no retrieval documents)
One document per row (padded), the answer's tokens weighted --answer-weight x against the rest:
    loss = sum_t w_t l_t / sum_t w_t,  w_t = answer_weight on the answer's tokens, 1 elsewhere.
Every 100 steps it prints the loss, the answer's loss and greedy pass-key / key-value accuracy on 20 fresh
documents of ~L and ~2L tokens, and appends the same as a JSON line to --out.

    slm data demo --config DEMO.yaml            # or any demo data dir (tokenizer/, hq.jsonl)
    python scripts/experiments/retrieval_recipes.py --data runs/long-context-demo/data --phases short_pk:200,pk:200
    python scripts/experiments/retrieval_recipes.py --data ... --init runs/long-context-demo/reference/model \\
        --phases short_pk:150,pk:250                           # a pretrained model instead of one from scratch
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from slm.config import ModelConfig
from slm.data.demo import PASSKEY_QUESTION, SHORT_RETRIEVAL_CHARS, retrieval_document, split_answer
from slm.data.tokenizer import load_tokenizer
from slm.models import build_model, load_pretrained
from slm.models.token_loss import token_losses

OPTIONS = {  # the long-context demo's segment/window/block/chunk of 32 = L/4
    "llama": {},
    "infini": {"segment_len": 32},
    "fam": {"block_len": 32, "fam_len": 8},
    "beacon": {"window_len": 32, "condensing_ratio": 8, "max_beacon_windows": 128},
    "megalodon": {"chunk_len": 32},
}
L = 128


def parse_phases(text: str) -> list[tuple[str, int]]:
    return [(name, int(steps)) for name, steps in (p.split(":") for p in text.split(","))]


def phase_at(phases, step: int) -> str:
    for name, n in phases:
        if step < n:
            return name
        step -= n
    return phases[-1][0]


class Rows:
    def __init__(self, tok, data: Path, max_chars: int, answer_weight: float, seed: int):
        self.tok, self.max_chars, self.answer_weight = tok, max_chars, answer_weight
        self.rng = random.Random(seed)
        texts = [json.loads(line)["text"] for line in (data / "hq.jsonl").read_text().splitlines()]
        self.domain = [t for t in texts if "pass key" not in t and "value of key" not in t]

    def retrieval(self, phase: str) -> tuple[list[int], list[bool]]:
        rng = self.rng
        short = phase.startswith("short") or (phase.startswith("half") and rng.random() < 0.5)
        chars = SHORT_RETRIEVAL_CHARS if short else rng.randint(SHORT_RETRIEVAL_CHARS, self.max_chars)
        kinds = ("passkey",) if phase.endswith("pk") else ("passkey", "kv")
        prompt, answer = split_answer(retrieval_document(rng, chars, kinds))
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        ids = self.tok(prompt + answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        is_answer = [False] * len(p_ids) + [True] * (len(ids) - 1 - len(p_ids)) + [False]
        return ids[:L], is_answer[:L]

    def batch(self, phase: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, loss weights and the answer mask of `size` rows."""
        rows = []
        for _ in range(size):
            if phase == "dom":
                ids = self.tok(self.rng.choice(self.domain), add_special_tokens=False)["input_ids"][:L]
                rows.append((ids, [False] * len(ids)))
            else:
                rows.append(self.retrieval(phase))
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((size, width), self.tok.pad_token_id)
        answer = torch.zeros(size, width, dtype=torch.bool)
        w = torch.zeros(size, width)
        for i, (ids, is_answer) in enumerate(rows):
            x[i, : len(ids)], answer[i, : len(ids)] = torch.tensor(ids), torch.tensor(is_answer)
            w[i, : len(ids)] = 1.0
        return x, torch.where(answer, self.answer_weight, w), answer


@torch.no_grad()
def accuracy(model, tok, chars: int, n: int = 20) -> dict[str, list[int]]:
    """Greedy exact-answer counts [correct, total] per kind on n fresh documents with ~chars of filler."""
    model.eval()
    rng, counts = random.Random(99 + chars), {"passkey": [0, 0], "kv": [0, 0]}
    for _ in range(n):
        prompt, answer = split_answer(retrieval_document(rng, chars))
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
        kind = "passkey" if PASSKEY_QUESTION in prompt else "kv"
        counts[kind][0] += tok.decode(out[0, ids.shape[1] :]).strip().startswith(answer.strip().rstrip("."))
        counts[kind][1] += 1
    model.train()
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a demo data dir: tokenizer/ and hq.jsonl")
    ap.add_argument("--backbone", default="llama", choices=sorted(OPTIONS))
    ap.add_argument("--init", help="start from this checkpoint instead of from scratch")
    ap.add_argument("--phases", default="short_pk:200,pk:200")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--max-chars", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("retrieval_recipes.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(str(args.data / "tokenizer"))
    if args.init:
        model = load_pretrained(args.init).float()
    else:
        cfg = ModelConfig(backbone=args.backbone, options=OPTIONS[args.backbone])
        model = build_model(cfg, vocab_size=len(tok), seed=args.seed)
    phases = parse_phases(args.phases)
    rows = Rows(tok, args.data, args.max_chars, args.answer_weight, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    started = time.time()
    for step in range(sum(n for _, n in phases)):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)  # linear warm-up, then constant
        x, w, answer = rows.batch(phase_at(phases, step), args.batch_size)
        ce = token_losses(model, x)
        w = torch.where(torch.isfinite(ce), w, torch.zeros_like(w))
        loss = (torch.nan_to_num(ce) * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            answer &= torch.isfinite(ce)
            record = {
                "recipe": vars(args) | {"data": str(args.data), "out": str(args.out), "init": args.init},
                "step": step + 1,
                "phase": phase_at(phases, step),
                "loss": round(loss.item(), 4),
                "answer_loss": round(float(ce.detach()[answer].mean()), 4) if answer.any() else None,
                "at_L": accuracy(model, tok, args.max_chars),
                "at_2L": accuracy(model, tok, 2 * args.max_chars + 60),
                "seconds": round(time.time() - started),
            }
            print(json.dumps({k: v for k, v in record.items() if k != "recipe"}), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
