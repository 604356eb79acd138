"""Task generators after RULER (Hsieh et al. 2024, Sec. 3) and the pass-key test (Mohtashami &
Jaggi 2023; also Infini-attention, Munkhdalai et al. 2024).

Each task draws its random content (keys, values, needle positions) once per sample from a seed
derived from (seed, task, length, index) (`derive_seed`), independent of any training data, and
returns a `Draft` whose `render(n)` lays that content out with `n` haystack units. `sizing`
then picks the largest `n` that fits the target length in the model's tokenizer.

Needle depth: a fraction of the haystack (0 = first, 1 = last, right before the question). The
needle asked about sits at the sample's depth; for several asked needles (multi-value,
multi-query) the first sits at the depth and the others at random depths, as do distractors.
`variable_tracking` puts the chain's first assignment at the depth and its later hops at random
depths after it. `common_words` / `frequent_words` have no needle (depth = None).

| task | RULER name | haystack | asked | answer |
| --- | --- | --- | --- | --- |
| passkey | (Landmark pass key) | noise | the pass key | 1 number |
| niah_single | niah_single_1 | noise | 1 key | 1 value |
| niah_multikey | niah_multikey_1 | noise + distractor needles | 1 of `multikey_keys` keys | 1 value |
| niah_multivalue | niah_multivalue | noise | 1 key with `multivalue_values` values | all values |
| niah_multiquery | niah_multiquery | noise | `multiquery_queries` keys | all their values |
| variable_tracking | vt | noise | a value | all variables of its chain |
| common_words | cwe | numbered word list | - | `cwe_common` most common words |
| frequent_words | fwe | Zipf-distributed coded words | - | `fwe_answers` most frequent words |
"""

from __future__ import annotations

import hashlib
import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from slm.errors import SlmError
from slm.evaluation.ruler.config import TASKS, TaskOptions
from slm.evaluation.ruler.sizing import TooShort, count_answer_tokens, count_prompt_tokens, fit_units
from slm.evaluation.ruler.templates import TemplateSet
from slm.evaluation.ruler.vocab import ADJECTIVES, NOUNS, CodedWords, WordPool

NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
# RULER scores every synthetic task with string_match_all (string_match_part is for its QA tasks)
METRIC = {t: "string_match_all" for t in TASKS}


def derive_seed(seed: int, task: str, length: int, index: int) -> int:
    digest = hashlib.sha256(f"slm.ruler/{seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class Rendered:
    prompt: str
    haystack_span: tuple[int, int]  # character span of the context in the prompt
    needle_spans: list[tuple[int, int]]  # character spans of the asked needles (first = at `depth`)
    insert_spans: list[tuple[int, int]] = field(default_factory=list)  # every needle, asked or distractor


@dataclass
class Draft:
    answers: list[str]
    render: Callable[[int], Rendered]
    min_units: int = 0


@dataclass
class Sample:
    task: str
    length: int
    index: int
    seed: int
    depth: float | None
    prompt: str
    answers: list[str]
    metric: str
    prompt_tokens: int
    answer_tokens: int
    filler_units: int
    haystack_span: tuple[int, int]
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    insert_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def needle_depth(self) -> float | None:
        """Where the first asked needle actually sits: the share of the filler (in characters,
        needles left out) that comes before it; 0 = first, 1 = last."""
        if not self.needle_spans:
            return None
        a, b = self.haystack_span
        start = self.needle_spans[0][0]
        inserted = sum(e - s for s, e in self.insert_spans)
        inserted_before = sum(e - s for s, e in self.insert_spans if e <= start)
        return (start - a - inserted_before) / max(1, (b - a) - inserted)

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- building blocks


class FillerStream:
    """Haystack sentences, prefix-stable: `take(n)` is the first n of one endless sequence."""

    def __init__(self, tpl: TemplateSet, seed: int):
        self._filler = tpl.filler
        self._cycle = tpl.filler_order == "cycle"
        self._rng = random.Random(seed)
        self._units: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            i = len(self._units)
            self._units.append(self._filler[i % len(self._filler)] if self._cycle else self._rng.choice(self._filler))
        return self._units[:n]


def layout(
    tpl: TemplateSet, intro: str, units: list[str], inserts: list[tuple[float, str, bool]], question: str
) -> Rendered:
    """intro / haystack / question, with each insert (depth, text, asked?) placed before the
    unit at index round(depth * n); inserts at the same index keep their given order."""
    n = len(units)
    slots: dict[int, list[tuple[str, bool, bool]]] = {}
    for depth, text, asked in inserts:
        slots.setdefault(min(n, max(0, round(depth * n))), []).append((text, asked, True))
    pieces: list[tuple[str, bool, bool]] = []  # (text, asked needle?, any needle?)
    for i in range(n + 1):
        pieces.extend(slots.get(i, []))
        if i < n:
            pieces.append((units[i], False, False))

    head = intro + tpl.section_sep if intro else ""
    offset, parts, asked_spans, insert_spans = len(head), [], [], []
    for text, asked, inserted in pieces:
        if parts:
            offset += 1  # the space between units
        if asked:
            asked_spans.append((offset, offset + len(text)))
        if inserted:
            insert_spans.append((offset, offset + len(text)))
        parts.append(text)
        offset += len(text)
    context = " ".join(parts)
    prompt = head + context + tpl.section_sep + question
    return Rendered(prompt, (len(head), len(head) + len(context)), asked_spans, insert_spans)


def list_layout(tpl: TemplateSet, intro: str, context: str, question: str) -> Rendered:
    head = intro + tpl.section_sep if intro else ""
    return Rendered(head + context + tpl.section_sep + question, (len(head), len(head) + len(context)), [])


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))


def make_key(rng: random.Random, tpl: TemplateSet) -> str:
    if tpl.key_kind == "adj-noun":  # RULER's keys, e.g. "golden-lantern"
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if tpl.key_kind == "number":
        return number(rng, tpl.key_digits)
    if tpl.key_kind == "word":
        return rng.choice(NOUNS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(tpl.key_digits))


def make_value(rng: random.Random, tpl: TemplateSet) -> str:
    if tpl.value_kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return number(rng, tpl.value_digits)


def distinct(make: Callable[[], str], n: int, taken: set[str] | None = None, what: str = "keys") -> list[str]:
    """n distinct draws, none in `taken` (and none a substring of another, so that scoring by
    containment cannot credit one value for another)."""
    taken = set(taken or ())
    out: list[str] = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        x = make()
        if x in taken or any(x in y or y in x for y in out):
            continue
        out.append(x)
        taken.add(x)
    if len(out) < n:
        raise SlmError(f"cannot draw {n} distinct {what}; widen the key/value space (more digits)")
    return out


# --------------------------------------------------------------------------- tasks


def _passkey(rng, tpl: TemplateSet, opt: TaskOptions, depth: float, seed: int) -> Draft:
    key = number(rng, opt.passkey_digits)
    filler = FillerStream(tpl, seed)
    needle = tpl.passkey_needle.format(key=key)
    return Draft(
        [key], lambda n: layout(tpl, tpl.passkey_intro, filler.take(n), [(depth, needle, True)], tpl.passkey_question)
    )


def _niah(rng, tpl: TemplateSet, depth: float, seed: int, *, n_keys: int, n_values: int, n_asked: int) -> Draft:
    """The NIAH family: `n_keys` keys with `n_values` values each; the first `n_asked` keys are
    asked for. Needle 0 sits at `depth`, the others at random depths."""
    keys = distinct(lambda: make_key(rng, tpl), n_keys, what="keys")
    values = distinct(lambda: make_value(rng, tpl), n_keys * n_values, taken=set(keys), what="values")
    needles = []  # (key index, value)
    for j in range(n_values):
        for i in range(n_keys):
            needles.append((i, values[i * n_values + j]))
    inserts = []
    for m, (i, v) in enumerate(needles):
        d = depth if m == 0 else rng.random()
        inserts.append((d, tpl.kv_needle.format(k=keys[i], v=v), i < n_asked))
    # keep the needle at `depth` first among the asked ones: order inserts by depth (stable)
    inserts.sort(key=lambda x: x[0])
    first = tpl.kv_needle.format(k=keys[needles[0][0]], v=needles[0][1])
    asked_keys = keys[:n_asked]
    if n_asked == 1:
        question = tpl.kv_question.format(k=asked_keys[0])
    else:
        question = tpl.kv_multi_question.format(keys=tpl.join_keys(asked_keys))
    answers = [values[i * n_values + j] for i in range(n_asked) for j in range(n_values)]
    filler = FillerStream(tpl, seed)

    def render(n: int) -> Rendered:
        r = layout(tpl, tpl.niah_intro, filler.take(n), inserts, question)
        # the needle placed at `depth` goes first in needle_spans
        start = r.prompt.index(first, r.haystack_span[0])
        span = (start, start + len(first))
        r.needle_spans = [span] + [s for s in r.needle_spans if s != span]
        return r

    return Draft(answers, render)


def _niah_single(rng, tpl, opt: TaskOptions, depth, seed) -> Draft:
    return _niah(rng, tpl, depth, seed, n_keys=1, n_values=1, n_asked=1)


def _niah_multikey(rng, tpl, opt: TaskOptions, depth, seed) -> Draft:
    return _niah(rng, tpl, depth, seed, n_keys=opt.multikey_keys, n_values=1, n_asked=1)


def _niah_multivalue(rng, tpl, opt: TaskOptions, depth, seed) -> Draft:
    return _niah(rng, tpl, depth, seed, n_keys=1, n_values=opt.multivalue_values, n_asked=1)


def _niah_multiquery(rng, tpl, opt: TaskOptions, depth, seed) -> Draft:
    q = opt.multiquery_queries
    return _niah(rng, tpl, depth, seed, n_keys=q, n_values=1, n_asked=q)


def _variable_tracking(rng, tpl: TemplateSet, opt: TaskOptions, depth: float, seed: int) -> Draft:
    n_vars = opt.vt_hops + 1
    names = distinct(
        lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)),
        opt.vt_chains * n_vars,
        what="variable names",
    )
    values = distinct(lambda: number(rng, 5), opt.vt_chains, what="values")
    inserts = []
    for c in range(opt.vt_chains):
        chain = names[c * n_vars : (c + 1) * n_vars]
        if c == 0:  # the asked chain: first assignment at `depth`, later hops after it
            depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(opt.vt_hops))
        else:
            depths = sorted(rng.random() for _ in range(n_vars))
        inserts.append((depths[0], tpl.vt_assign.format(var=chain[0], value=values[c]), c == 0))
        for h in range(1, n_vars):
            inserts.append((depths[h], tpl.vt_copy.format(var=chain[h], src=chain[h - 1]), c == 0))
    inserts.sort(key=lambda x: x[0])  # stable: a chain's statements stay in order
    question = tpl.vt_question.format(value=values[0], num=tpl.num(n_vars))
    filler = FillerStream(tpl, seed)
    return Draft(list(names[:n_vars]), lambda n: layout(tpl, tpl.vt_intro, filler.take(n), inserts, question))


def _common_words(rng, tpl: TemplateSet, opt: TaskOptions, depth, seed: int) -> Draft:
    """RULER's CWE: `cwe_common` words repeated `cwe_freq_common` times among words repeated
    `cwe_freq_uncommon` times, as a shuffled numbered list; n = number of uncommon words."""
    pool = WordPool(rng.getrandbits(64))
    c = opt.cwe_common
    common = pool.first(c)
    shuffle_seed = rng.getrandbits(64)
    intro = tpl.cwe_intro.format(num=tpl.num(c))
    question = tpl.cwe_question.format(num=tpl.num(c))

    def render(n: int) -> Rendered:
        uncommon = pool.first(c + n)[c:]
        items = common * opt.cwe_freq_common + uncommon * opt.cwe_freq_uncommon
        random.Random(shuffle_seed).shuffle(items)
        context = " ".join(tpl.cwe_item.format(i=i + 1, word=w) for i, w in enumerate(items))
        return list_layout(tpl, intro, context, question)

    return Draft(list(common), render)


def zipf_counts(n: int, alpha: float) -> list[int]:
    """Counts of n words whose rank-r count is floor(n r^-alpha / zeta(alpha)); what the ranks
    with count >= 1 leave over becomes words seen once (appended as 1s)."""
    zeta = sum(r**-alpha for r in range(1, 10001)) + 10000 ** (1 - alpha) / (alpha - 1)
    counts = []
    r = 1
    while True:
        c = math.floor(n * r**-alpha / zeta)
        if c < 1:
            break
        counts.append(c)
        r += 1
    return counts + [1] * (n - sum(counts))


def zipf_valid(counts: list[int], answers: int) -> bool:
    """Ranks 2..answers+1 (rank 1 is the dots) have distinct counts >= 2, above everything after."""
    if len(counts) < answers + 2:
        return False
    top = counts[1 : answers + 2]
    return top[-2] >= 2 and all(a > b for a, b in zip(top, top[1:]))


def _frequent_words(rng, tpl: TemplateSet, opt: TaskOptions, depth, seed: int) -> Draft:
    """RULER's FWE: coded words with Zipf counts; the most frequent "word" is the dots '....'
    (which the question says to ignore), the answer is the next `fwe_answers`. n = words in all."""
    coded = CodedWords(rng.getrandbits(64), opt.fwe_word_len)
    a = opt.fwe_answers
    shuffle_seed = rng.getrandbits(64)
    intro = tpl.fwe_intro.format(num=tpl.num(a))
    question = tpl.fwe_question.format(num=tpl.num(a))
    min_units = next(n for n in range(a + 2, 1 << 20) if zipf_valid(zipf_counts(n, opt.fwe_alpha), a))

    def render(n: int) -> Rendered:
        counts = zipf_counts(n, opt.fwe_alpha)
        words = ["...."] + coded.first(len(counts) - 1)
        items = [w for w, k in zip(words, counts) for _ in range(k)]
        random.Random(shuffle_seed).shuffle(items)
        return list_layout(tpl, intro, " ".join(items), question)

    return Draft(coded.first(a), render, min_units=min_units)


GENERATORS: dict[str, Callable[..., Draft]] = {
    "passkey": _passkey,
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
}
assert set(GENERATORS) == set(TASKS)


SIZE_HINTS = {
    "niah_multikey": " or lower options.multikey_keys",
    "niah_multivalue": " or lower options.multivalue_values",
    "niah_multiquery": " or lower options.multiquery_queries",
    "variable_tracking": " or lower options.vt_hops / options.vt_chains",
    "common_words": " or lower options.cwe_common / options.cwe_freq_common / options.cwe_freq_uncommon",
    "frequent_words": " or lower options.fwe_answers / options.fwe_word_len",
}


def sample_depth(task: str, index: int, depths: list[float]) -> float | None:
    """Sample i of a (task, length) takes depth i mod len(depths): an even grid for heatmaps."""
    return depths[index % len(depths)] if task in NEEDLE_TASKS else None


def generate_sample(
    task: str,
    length: int,
    index: int,
    *,
    tokenizer,
    templates: TemplateSet,
    options: TaskOptions,
    depths: list[float],
    seed: int,
) -> Sample:
    """One sample whose prompt + gold answer fit `length` tokens of `tokenizer`, as full as fits."""
    if task not in GENERATORS:
        raise SlmError(f"unknown task {task!r}; expected any of {list(TASKS)}")
    sample_seed = derive_seed(seed, task, length, index)
    rng = random.Random(sample_seed)
    depth = sample_depth(task, index, depths)
    draft = GENERATORS[task](rng, templates, options, depth, rng.getrandbits(64))
    answer_tokens = count_answer_tokens(tokenizer, draft.answers)
    rendered: dict[int, Rendered] = {}

    def render(n: int) -> str:
        rendered[n] = draft.render(n)
        return rendered[n].prompt

    try:
        n, _, prompt_tokens = fit_units(
            render, lambda s: count_prompt_tokens(tokenizer, s), length - answer_tokens, min_units=draft.min_units
        )
    except TooShort as e:
        raise SlmError(
            f"length {length} is too short for task {task!r} (template_set={templates.name}): its smallest prompt "
            f"takes {e.needed} tokens and the answer {answer_tokens}; use a longer length" + SIZE_HINTS.get(task, "")
        ) from None
    r = rendered[n]
    return Sample(
        task=task,
        length=length,
        index=index,
        seed=sample_seed,
        depth=depth,
        prompt=r.prompt,
        answers=draft.answers,
        metric=METRIC[task],
        prompt_tokens=prompt_tokens,
        answer_tokens=answer_tokens,
        filler_units=n,
        haystack_span=r.haystack_span,
        needle_spans=r.needle_spans,
        insert_spans=r.insert_spans,
    )
