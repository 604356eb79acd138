"""The embedded demo corpus, generated deterministically from a seed (no downloads).

- high-quality target domain, in the spirit of RHO-1's math setting: arithmetic and short word
  problems with worked steps and answers, plus long-context retrieval documents (pass-key and
  key-value lookup hidden in filler text);
- a web-like training corpus mixing that domain with realistic noise (navigation boilerplate,
  markup, identifiers and hashes, shuffled sentences, repeated spam, arithmetic with wrong
  answers); every noise span is recorded as character offsets (`noise_spans`), a column used only
  to *measure* selection, never to select;
- held-out validation documents and domain questions with exact answers.

The fact space is small (single-digit operands) so that a ~1M-parameter reference model can
answer most held-out questions at demo scale; otherwise accuracy cannot separate the methods.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemal", "Lena", "Mia", "Noah"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "eggs", "flowers"]
FILLER = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "Birds sing in the morning.", "The road is long and quiet.",
    "Clouds drift over the hills.", "A cold wind blows at night.",
]
NAV = ["Home", "About us", "Contact", "Privacy Policy", "Terms of Use", "Login", "Sign up", "Blog", "Careers", "Help", "Sitemap", "Cookie settings"]
SPAM = ["BUY NOW!!!", "Best prices, cheap deals, click here!", "Limited offer, 90% OFF!!!", "Win a FREE phone today!!!", "Subscribe for more!!!"]
TAGS = ["div", "span", "a", "li", "ul", "section", "nav", "footer"]

# Prompts: the same wording in training documents, validation and the domain questions.
QUESTION = "Question: What is {a} {op} {b}?\nAnswer:"
SOLUTION = " {a} {op} {b} = {c}. The answer is {c}."
ANSWER_PATTERN = r"The answer is (-?\d+)"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
KV_NEEDLE = "The value of key {k} is {v}."
KV_QUESTION = "What is the value of key {k}? The value of key {k} is"


def arithmetic_fact(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choice("+-*")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-":
        a = a + b  # non-negative results
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return a, op, b, c


def arithmetic_problem(rng: random.Random, wrong: bool = False) -> str:
    a, op, b, c = arithmetic_fact(rng)
    if wrong:  # noise: a worked solution with a wrong answer
        c = c + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return QUESTION.format(a=a, op=op, b=b) + SOLUTION.format(a=a, op=op, b=b, c=c)


def word_problem(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        story = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
        steps = f" {a} + {b} = {a + b}. The answer is {a + b}."
    else:
        a = a + b
        story = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have now?"
        steps = f" {a} - {b} = {a - b}. The answer is {a - b}."
    return f"Problem: {story}\nAnswer:{steps}"


def filler_text(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        s = rng.choice(FILLER)
        out.append(s)
        size += len(s) + 1
    return " ".join(out)


def retrieval_document(rng: random.Random, n_chars: int) -> str:
    """Pass-key or key-value lookup hidden at a random depth of filler text, asked at the end."""
    before = filler_text(rng, int(n_chars * rng.random()))
    after = filler_text(rng, max(0, n_chars - len(before)))
    if rng.random() < 0.5:
        key = rng.randint(10000, 99999)
        return f"{before} {PASSKEY_NEEDLE.format(key=key)} {after} {PASSKEY_QUESTION} {key}."
    keys = rng.sample(range(100, 1000), 4)
    values = [rng.randint(1000, 9999) for _ in keys]
    needles = [KV_NEEDLE.format(k=k, v=v) for k, v in zip(keys, values)]
    parts = [before, *needles, after]
    i = rng.randrange(len(keys))
    return " ".join(p for p in parts if p) + f" {KV_QUESTION.format(k=keys[i])} {values[i]}."


def domain_document(rng: random.Random, retrieval_share: float, retrieval_chars: int) -> str:
    if rng.random() < retrieval_share:
        return retrieval_document(rng, retrieval_chars)
    parts = [arithmetic_problem(rng) if rng.random() < 0.6 else word_problem(rng) for _ in range(rng.randint(2, 6))]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- noise


def _hash(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def noise_segment(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return " | ".join(rng.sample(NAV, rng.randint(4, 8)))
    if kind == 1:
        tag = rng.choice(TAGS)
        return f'<{tag} class="{rng.choice(["nav", "item", "row", "col-md-4", "btn"])}-{rng.randint(1, 99)}"><a href="/p/{rng.randint(100, 99999)}">{rng.choice(NAV)}</a></{tag}>'
    if kind == 2:
        return f"session={_hash(rng, 24)} token:{_hash(rng, 16)} id={''.join(rng.choice(string.ascii_letters + string.digits) for _ in range(12))}"
    if kind == 3:
        words = (arithmetic_problem(rng) if rng.random() < 0.5 else word_problem(rng)).split()
        rng.shuffle(words)
        return " ".join(words)
    if kind == 4:
        return " ".join([rng.choice(SPAM)] * rng.randint(2, 5))
    return arithmetic_problem(rng, wrong=True)


def web_document(rng: random.Random, noise_share: float, retrieval_share: float, retrieval_chars: int) -> tuple[str, list[list[int]]]:
    """Domain text interleaved with noise segments until noise makes up about `noise_share` of characters."""
    domain = domain_document(rng, retrieval_share, retrieval_chars)
    pieces: list[tuple[str, bool]] = [(p, False) for p in domain.split("\n\n")]
    domain_chars = sum(len(p) for p, _ in pieces)
    # Per document, noise share varies around the target (some pages are cleaner than others).
    share = min(0.9, max(0.0, rng.gauss(noise_share, 0.15)))
    target = domain_chars * share / (1 - share)
    noise_chars = 0
    while noise_chars < target:
        seg = noise_segment(rng)
        pieces.insert(rng.randint(0, len(pieces)), (seg, True))
        noise_chars += len(seg)
    text, spans, pos = [], [], 0
    for i, (piece, is_noise) in enumerate(pieces):
        if i:
            text.append("\n\n")
            pos += 2
        if is_noise:
            spans.append([pos, pos + len(piece)])
        text.append(piece)
        pos += len(piece)
    return "".join(text), spans


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class DemoFiles:
    root: Path

    @property
    def hq(self) -> Path:
        return self.root / "hq.jsonl"

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "validation.jsonl"

    @property
    def questions(self) -> Path:
        return self.root / "questions.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


def _write_jsonl(path: Path, rows) -> None:
    from slm.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def generate_demo(cfg, progress: bool = True) -> DemoFiles:
    """Write hq/train/validation/questions jsonl files and a trained BPE tokenizer into cfg.out_dir."""
    from slm.data.tokenizer import train_bpe_tokenizer

    files = DemoFiles(Path(cfg.out_dir))
    files.root.mkdir(parents=True, exist_ok=True)
    # Separate generators per split so that sizes of one split never change another.
    rng_hq, rng_train, rng_val, rng_q = (random.Random(f"{cfg.seed}-{name}") for name in ("hq", "train", "val", "questions"))
    hq = [{"text": domain_document(rng_hq, cfg.retrieval_share, cfg.retrieval_chars), "source": "domain"} for _ in range(cfg.hq_documents)]
    train = []
    for _ in range(cfg.train_documents):
        text, spans = web_document(rng_train, cfg.noise_share, cfg.retrieval_share, cfg.retrieval_chars)
        train.append({"text": text, "noise_spans": spans, "source": "web"})
    val = [{"text": domain_document(rng_val, cfg.retrieval_share, cfg.retrieval_chars), "source": "domain"} for _ in range(cfg.validation_documents)]
    questions = []
    for _ in range(cfg.questions):
        a, op, b, c = arithmetic_fact(rng_q)
        questions.append({"question": QUESTION.format(a=a, op=op, b=b), "answer": str(c), "answer_pattern": ANSWER_PATTERN})
    _write_jsonl(files.hq, hq)
    _write_jsonl(files.train, train)
    _write_jsonl(files.validation, val)
    _write_jsonl(files.questions, questions)
    train_bpe_tokenizer((r["text"] for r in hq + train), cfg.vocab_size, files.tokenizer)
    return files
