"""The embedded demo corpus, generated deterministically from a seed (no downloads).

- high-quality target domain, in the spirit of RHO-1's math setting: arithmetic and short word
  problems with worked steps and answers, plus long-context retrieval documents (pass-key and
  key-value lookup hidden in filler text);
- a web-like training corpus mixing that domain with realistic noise (navigation boilerplate,
  markup, identifiers and hashes, shuffled sentences, repeated spam, arithmetic with wrong
  answers); every noise span is recorded as character offsets (`noise_spans`, with its kind in
  `noise_kinds`), columns used only to *measure* selection, never to select. Spans cover exactly
  the noisy characters: a whole boilerplate segment, but of a wrong-answer problem only the wrong
  number (its prompt and worked step are the domain's own clean text);
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
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs to the sea.",
    "Birds sing in the morning.",
    "The road is long and quiet.",
    "Clouds drift over the hills.",
    "A cold wind blows at night.",
]
NAV = [
    "Home",
    "About us",
    "Contact",
    "Privacy Policy",
    "Terms of Use",
    "Login",
    "Sign up",
    "Blog",
    "Careers",
    "Help",
    "Sitemap",
    "Cookie settings",
]
SPAM = [
    "BUY NOW!!!",
    "Best prices, cheap deals, click here!",
    "Limited offer, 90% OFF!!!",
    "Win a FREE phone today!!!",
    "Subscribe for more!!!",
]
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
    return wrong_arithmetic_problem(rng)[0] if wrong else _format_problem(*arithmetic_fact(rng))


def _format_problem(a: int, op: str, b: int, c: int) -> str:
    return QUESTION.format(a=a, op=op, b=b) + SOLUTION.format(a=a, op=op, b=b, c=c)


def wrong_arithmetic_problem(rng: random.Random) -> tuple[str, list[list[int]]]:
    """A worked solution with a wrong answer, and the character spans of the wrong answer only.

    The prompt and the worked step up to "=" are the same clean text as the domain's; only the wrong
    number (both times it is stated) is noise, so only it is tagged.
    """
    a, op, b, c = arithmetic_fact(rng)
    wrong = c + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    text = _format_problem(a, op, b, wrong)
    prefix = QUESTION.format(a=a, op=op, b=b) + f" {a} {op} {b} ="
    first = len(prefix) + 1  # after "= "
    second = text.rindex(str(wrong))
    n = len(str(wrong))
    return text, [[first, first + n], [second, second + n]]


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


RETRIEVAL_KINDS = ("passkey", "kv")


def retrieval_document(rng: random.Random, n_chars: int, kinds: tuple[str, ...] = RETRIEVAL_KINDS) -> str:
    """Pass-key or key-value lookup hidden at a random depth of filler text, asked at the end.

    With both `kinds` each is drawn with probability 1/2; with one, that one (the same random draws either way)."""
    before = filler_text(rng, int(n_chars * rng.random()))
    after = filler_text(rng, max(0, n_chars - len(before)))
    kind = RETRIEVAL_KINDS[rng.random() >= 0.5] if len(kinds) > 1 else kinds[0]
    if kind == "passkey":
        key = rng.randint(10000, 99999)
        return f"{before} {PASSKEY_NEEDLE.format(key=key)} {after} {PASSKEY_QUESTION} {key}."
    keys = rng.sample(range(100, 1000), 4)
    values = [rng.randint(1000, 9999) for _ in keys]
    needles = [KV_NEEDLE.format(k=k, v=v) for k, v in zip(keys, values)]
    parts = [before, *needles, after]
    i = rng.randrange(len(keys))
    return " ".join(p for p in parts if p) + f" {KV_QUESTION.format(k=keys[i])} {values[i]}."


SHORT_RETRIEVAL_CHARS = 40  # about two filler sentences: the needle a few tokens before its question


@dataclass(frozen=True)
class RetrievalMix:
    """How retrieval documents enter the domain text of every split (DemoDataConfig's retrieval_* fields)."""

    share: float  # of domain documents
    chars: int  # filler characters of a full-length one
    short_share: float = 0.0  # of retrieval documents that hold only SHORT_RETRIEVAL_CHARS of filler
    kinds: tuple[str, ...] = RETRIEVAL_KINDS

    @classmethod
    def of(cls, cfg) -> RetrievalMix:
        return cls(cfg.retrieval_share, cfg.retrieval_chars, cfg.retrieval_short_share, tuple(cfg.retrieval_kinds))

    def document(self, rng: random.Random) -> str:
        # the short/full draw only when short ones are asked for: the default corpus is the same as before it existed
        short = self.short_share > 0 and rng.random() < self.short_share
        return retrieval_document(rng, SHORT_RETRIEVAL_CHARS if short else self.chars, self.kinds)


def split_answer(text: str) -> tuple[str, str]:
    """A retrieval document as (prompt, completion): both questions end "... is", then " <answer>."."""
    at = text.rindex(" is ") + len(" is")
    return text[:at], text[at:]


def retrieval_finetune_documents(
    rng: random.Random, n: int, max_chars: int, short_share: float, kinds: tuple[str, ...] = RETRIEVAL_KINDS
) -> list[dict]:
    """Standalone retrieval documents for a retrieval fine-tuning stage, as prompt/completion pairs: the prompt
    ends with the question ("... The pass key is"), the completion is the answer (" 12345."), so that a fine-tuning
    stage can weigh the answer's tokens (corpus.completion_field, train.prompt_loss_weight).

    A length curriculum within one set: `short_share` of them hold only SHORT_RETRIEVAL_CHARS characters of
    filler, the rest a length uniform in [SHORT_RETRIEVAL_CHARS, max_chars]."""
    docs = []
    for _ in range(n):
        chars = SHORT_RETRIEVAL_CHARS if rng.random() < short_share else rng.randint(SHORT_RETRIEVAL_CHARS, max_chars)
        prompt, completion = split_answer(retrieval_document(rng, chars, kinds))
        docs.append({"prompt": prompt, "completion": completion, "source": "retrieval"})
    return docs


def domain_document(rng: random.Random, retrieval: RetrievalMix) -> str:
    if rng.random() < retrieval.share:
        return retrieval.document(rng)
    parts = [arithmetic_problem(rng) if rng.random() < 0.6 else word_problem(rng) for _ in range(rng.randint(2, 6))]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- noise


def _hash(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


NOISE_KINDS = ("navigation", "markup", "identifiers", "shuffled", "spam", "wrong_answer")


def noise_segment(rng: random.Random) -> tuple[str, str, list[list[int]]]:
    """(text, kind, noise spans relative to the text): the whole segment unless only part of it is noise."""
    kind = NOISE_KINDS[rng.randrange(len(NOISE_KINDS))]
    if kind == "navigation":
        text = " | ".join(rng.sample(NAV, rng.randint(4, 8)))
    elif kind == "markup":
        tag = rng.choice(TAGS)
        text = (  # one f-string split in two: the draws happen in the same order
            f'<{tag} class="{rng.choice(["nav", "item", "row", "col-md-4", "btn"])}-{rng.randint(1, 99)}">'
            f'<a href="/p/{rng.randint(100, 99999)}">{rng.choice(NAV)}</a></{tag}>'
        )
    elif kind == "identifiers":
        text = (
            f"session={_hash(rng, 24)} token:{_hash(rng, 16)} "
            f"id={''.join(rng.choice(string.ascii_letters + string.digits) for _ in range(12))}"
        )
    elif kind == "shuffled":
        words = (arithmetic_problem(rng) if rng.random() < 0.5 else word_problem(rng)).split()
        rng.shuffle(words)
        text = " ".join(words)
    elif kind == "spam":
        text = " ".join([rng.choice(SPAM)] * rng.randint(2, 5))
    else:
        text, spans = wrong_arithmetic_problem(rng)
        return text, kind, spans
    return text, kind, [[0, len(text)]]


def web_document(
    rng: random.Random, noise_share: float, retrieval: RetrievalMix
) -> tuple[str, list[list[int]], list[str]]:
    """Domain text interleaved with noise segments until they make up about `noise_share` of characters.

    Returns the text, the noise spans (character offsets) and each span's kind (NOISE_KINDS).
    """
    domain = domain_document(rng, retrieval)
    pieces: list[tuple[str, str | None, list[list[int]]]] = [(p, None, []) for p in domain.split("\n\n")]
    domain_chars = sum(len(p) for p, _, _ in pieces)
    # Per document, noise share varies around the target (some pages are cleaner than others).
    share = min(0.9, max(0.0, rng.gauss(noise_share, 0.15)))
    target = domain_chars * share / (1 - share)
    segment_chars = 0
    while segment_chars < target:
        seg, kind, seg_spans = noise_segment(rng)
        pieces.insert(rng.randint(0, len(pieces)), (seg, kind, seg_spans))
        segment_chars += len(seg)
    text, spans, kinds, pos = [], [], [], 0
    for i, (piece, kind, seg_spans) in enumerate(pieces):
        if i:
            text.append("\n\n")
            pos += 2
        spans += [[pos + start, pos + end] for start, end in seg_spans]
        kinds += [kind] * len(seg_spans)
        text.append(piece)
        pos += len(piece)
    return "".join(text), spans, kinds


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
    def retrieval(self) -> Path:
        return self.root / "retrieval.jsonl"

    @property
    def retrieval_warmup(self) -> Path:
        return self.root / "retrieval_warmup.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


def _write_jsonl(path: Path, rows) -> None:
    from slm.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def generate_demo(cfg, progress: bool = True) -> DemoFiles:
    """Write hq/train/validation/questions jsonl files and a trained BPE tokenizer into cfg.out_dir."""
    from slm.data.tokenizer import train_bpe_tokenizer

    files = DemoFiles(Path(cfg.out_dir))
    files.root.mkdir(parents=True, exist_ok=True)
    # Separate generators per split so that sizes of one split never change another.
    rng_hq, rng_train, rng_val, rng_q = (
        random.Random(f"{cfg.seed}-{name}") for name in ("hq", "train", "val", "questions")
    )
    retrieval = RetrievalMix.of(cfg)
    hq = [{"text": domain_document(rng_hq, retrieval), "source": "domain"} for _ in range(cfg.hq_documents)]
    train = []
    for _ in range(cfg.train_documents):
        text, spans, kinds = web_document(rng_train, cfg.noise_share, retrieval)
        train.append({"text": text, "noise_spans": spans, "noise_kinds": kinds, "source": "web"})
    val = [{"text": domain_document(rng_val, retrieval), "source": "domain"} for _ in range(cfg.validation_documents)]
    questions = []
    for _ in range(cfg.questions):
        a, op, b, c = arithmetic_fact(rng_q)
        questions.append(
            {"question": QUESTION.format(a=a, op=op, b=b), "answer": str(c), "answer_pattern": ANSWER_PATTERN}
        )
    _write_jsonl(files.hq, hq)
    _write_jsonl(files.train, train)
    _write_jsonl(files.validation, val)
    _write_jsonl(files.questions, questions)
    if cfg.retrieval_finetune_documents:  # its own generator: the other splits are the same with or without it
        rng_r = random.Random(f"{cfg.seed}-retrieval")
        _write_jsonl(
            files.retrieval,
            retrieval_finetune_documents(
                rng_r,
                cfg.retrieval_finetune_documents,
                cfg.retrieval_chars,
                cfg.retrieval_finetune_short_share,
                retrieval.kinds,
            ),
        )
    if cfg.retrieval_warmup_documents:
        rng_w = random.Random(f"{cfg.seed}-retrieval-warmup")
        _write_jsonl(
            files.retrieval_warmup,
            retrieval_finetune_documents(
                rng_w, cfg.retrieval_warmup_documents, cfg.retrieval_chars, 1.0, retrieval.kinds
            ),
        )
    train_bpe_tokenizer((r["text"] for r in hq + train), cfg.vocab_size, files.tokenizer)
    return files
