"""Sizing a sample to a target length in the evaluated model's own tokenizer.

A task renders its prompt from a whole number `n` of haystack units (filler sentences, list
words, coded words); the prompt grows with `n`. `fit_units` finds the largest `n` whose prompt
fits a token budget: a probe estimates tokens per unit, a galloping step brackets the answer
around the estimate, and a binary search settles it. BPE merges across unit boundaries make
the token count only nearly monotone in `n`, so the search keeps the largest `n` it has *seen*
fit, and the prompt it returns always fits.
"""

from __future__ import annotations

from collections.abc import Callable


class TooShort(Exception):
    """Even the prompt without any haystack does not fit the budget."""

    def __init__(self, needed: int, budget: int):
        super().__init__(f"needs {needed} tokens, budget {budget}")
        self.needed = needed
        self.budget = budget


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The ids the model is fed: the tokenizer's own special tokens at the start (BOS), never an
    EOS appended at the end (some tokenizers add one, which would end the document early)."""
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and len(ids) > 1:
        plain = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not plain or plain[-1] != eos:
            ids = ids[:-1]
    return ids


def count_prompt_tokens(tokenizer, text: str) -> int:
    return len(encode_prompt(tokenizer, text))


def count_answer_tokens(tokenizer, answers: list[str]) -> int:
    """Tokens of the gold answer as the model would write it after the prompt: " a, b, c"."""
    return len(tokenizer(" " + ", ".join(answers), add_special_tokens=False, verbose=False)["input_ids"])


def fit_units(
    render: Callable[[int], str],
    n_tokens: Callable[[str], int],
    budget: int,
    min_units: int = 0,
    max_units: int = 1 << 24,
) -> tuple[int, str, int]:
    """Largest n in [min_units, max_units] with n_tokens(render(n)) <= budget.

    Returns (n, prompt, its token count); raises TooShort when render(min_units) is too long.
    """
    cache: dict[int, tuple[str, int]] = {}

    def f(n: int) -> int:
        if n not in cache:
            text = render(n)
            cache[n] = (text, n_tokens(text))
        return cache[n][1]

    base = f(min_units)
    if base > budget:
        raise TooShort(base, budget)
    best = min_units  # largest n seen to fit

    # estimate tokens per unit from a probe, then guess
    probe = min(max_units, min_units + 8)
    if probe == min_units:
        return best, *cache[best]
    per_unit = max((f(probe) - base) / (probe - min_units), 1e-3)
    if f(probe) <= budget:
        best = probe
    guess = min(max_units, max(min_units + 1, min_units + int((budget - base) / per_unit)))

    # bracket: lo fits, hi does not (or hi = max_units + 1)
    step = max(1, guess // 64)
    if f(guess) <= budget:
        lo = guess
        hi = min(max_units + 1, guess + step)
        while hi <= max_units and f(hi) <= budget:
            lo, step = hi, step * 2
            hi = min(max_units + 1, hi + step)
    else:
        hi = guess
        lo = max(min_units, guess - step)
        while lo > min_units and f(lo) > budget:
            hi, step = lo, step * 2
            lo = max(min_units, lo - step)
    # binary search in (lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) <= budget:
            lo = mid
        else:
            hi = mid
    best = max(n for n, (_, t) in cache.items() if t <= budget)
    text, tokens = cache[best]
    return best, text, tokens
