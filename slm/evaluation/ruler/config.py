"""`RulerConfig`: what `run_ruler` evaluates, on which lengths, with which wording."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slm.config import StrictModel
from slm.data import demo

TASKS = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)


def check_placeholders(template: str, required: set[str], allowed: set[str]) -> str:
    """A format string must use every `required` placeholder and nothing outside `allowed`."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"not a valid format string ({e}): {template!r}") from None
    if "" in used or any(not n.isidentifier() for n in used):
        raise ValueError(f"use named placeholders only, got {template!r}")
    missing, unknown = required - used, used - allowed
    if missing:
        raise ValueError(f"{template!r} lacks placeholder(s) {sorted('{' + m + '}' for m in missing)}")
    if unknown:
        raise ValueError(
            f"{template!r} uses unknown placeholder(s) {sorted('{' + u + '}' for u in unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    return template


# field -> (required placeholders, allowed placeholders)
COMPACT_PLACEHOLDERS: dict[str, tuple[set[str], set[str]]] = {
    "passkey_needle": ({"key"}, {"key"}),
    "passkey_question": (set(), set()),
    "kv_needle": ({"k", "v"}, {"k", "v"}),
    "kv_question": ({"k"}, {"k"}),
    "kv_multi_question": ({"keys"}, {"keys"}),
    "vt_assign": ({"var", "value"}, {"var", "value"}),
    "vt_copy": ({"var", "src"}, {"var", "src"}),
    "vt_question": ({"value"}, {"value", "num"}),
    "cwe_item": ({"word"}, {"i", "word"}),
    "cwe_question": (set(), {"num"}),
    "fwe_question": (set(), {"num"}),
}


class CompactWording(StrictModel):
    """Short templates for tiny models (template_set=compact). Defaults follow the slm demo
    corpus (slm/data/demo.py): filler sentences with the needle inside, the question at the end,
    the answer right after it. Placeholders: {key} pass key; {k}, {v} key and value; {keys} the
    queried keys joined "a, b, and c"; {var}, {src}, {value} variable names and value; {num} how
    many answers are asked for; {i}, {word} a numbered word."""

    filler: list[str] = Field(
        default_factory=lambda: list(demo.FILLER),
        description="Haystack sentences, drawn at random (seeded) one after another.",
    )
    passkey_needle: str = demo.PASSKEY_NEEDLE
    passkey_question: str = demo.PASSKEY_QUESTION
    kv_needle: str = demo.KV_NEEDLE
    kv_question: str = demo.KV_QUESTION
    kv_multi_question: str = "What are the values of keys {keys}? The values of keys {keys} are"
    vt_assign: str = "VAR {var} = {value}."
    vt_copy: str = "VAR {var} = VAR {src}."
    vt_question: str = "Which variables are equal to {value}? They are"
    cwe_item: str = "{i}. {word}"
    cwe_question: str = "The {num} most common words are:"
    fwe_question: str = "The {num} most frequent words are:"
    key_kind: Literal["number", "word", "letters"] = Field("number", description="What a key looks like.")
    key_digits: int = Field(3, ge=1, le=12, description="Digits (number) or letters (letters) of a key.")
    value_digits: int = Field(4, ge=1, le=18, description="Digits of a key-value value.")

    @model_validator(mode="after")
    def _placeholders(self):
        for name, (required, allowed) in COMPACT_PLACEHOLDERS.items():
            try:
                check_placeholders(getattr(self, name), required, allowed)
            except ValueError as e:
                raise ValueError(f"compact.{name}: {e}") from None
        if not self.filler or not all(s.strip() for s in self.filler):
            raise ValueError("compact.filler must hold at least one non-empty sentence")
        return self


class TaskOptions(StrictModel):
    """Task sizes. Defaults are RULER's (Hsieh et al. 2024, Table/Appendix B)."""

    passkey_digits: int = Field(5, ge=1, le=18, description="Digits of the pass key (Landmark Attention: 5).")
    value_digits: int = Field(7, ge=1, le=18, description="Digits of a NIAH value with template_set=ruler (RULER: 7).")
    niah_values: Literal["numbers", "uuids"] = Field(
        "numbers", description="template_set=ruler: NIAH values as numbers or UUIDs."
    )
    multikey_keys: int = Field(
        4, ge=2, description="niah_multikey: needles in all; one is asked for, the rest distract."
    )
    multivalue_values: int = Field(4, ge=2, description="niah_multivalue: values stored under the one key.")
    multiquery_queries: int = Field(4, ge=2, description="niah_multiquery: keys asked for at once.")
    vt_chains: int = Field(1, ge=1, description="variable_tracking: chains of assignments (one is asked for).")
    vt_hops: int = Field(4, ge=1, description="variable_tracking: hops per chain (answer = hops + 1 variables).")
    cwe_common: int = Field(10, ge=1, description="common_words: words to find.")
    cwe_freq_common: int = Field(30, ge=2, description="common_words: repeats of each common word.")
    cwe_freq_uncommon: int = Field(3, ge=1, description="common_words: repeats of each other word.")
    fwe_alpha: float = Field(2.0, gt=1.0, description="frequent_words: Zipf exponent of word counts.")
    fwe_answers: int = Field(3, ge=1, description="frequent_words: words to find.")
    fwe_word_len: int = Field(5, ge=2, le=12, description="frequent_words: letters of a coded word.")

    @model_validator(mode="after")
    def _freqs(self):
        if self.cwe_freq_common <= self.cwe_freq_uncommon:
            raise ValueError(
                f"options.cwe_freq_common={self.cwe_freq_common} "
                f"must exceed options.cwe_freq_uncommon={self.cwe_freq_uncommon}"
            )
        return self


class RulerConfig(StrictModel):
    """`slm eval ruler`: RULER-style synthetic long-context tasks (Hsieh et al. 2024) and the
    pass-key test (Mohtashami & Jaggi 2023), each sample sized in the model's own tokenizer."""

    model: str = Field(description="Hugging Face checkpoint directory (AutoModelForCausalLM).")
    tokenizer: str | None = Field(None, description="Tokenizer directory; defaults to the model directory.")
    out_dir: str = Field(description="Where results.json, predictions.jsonl and the heatmaps go.")
    tasks: list[str] = Field(default_factory=lambda: list(TASKS), description=f"Any of {list(TASKS)}.")
    lengths: list[int] = Field(
        default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072],
        description="Target lengths in tokens (prompt + answer).",
    )
    samples_per_length: int = Field(
        25, ge=1, description="Samples per task and length; depth i cycles through `depths`."
    )
    depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="Needle depths (0 = start)."
    )
    template_set: Literal["ruler", "compact"] = Field(
        "ruler", description="ruler: RULER's wording; compact: short, for tiny models."
    )
    chunk_len: int = Field(2048, ge=1, description="Prompt tokens per forward pass (state carried between chunks).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="None: per task (RULER's budgets for ruler; answer length + 4 for compact)."
    )
    stop_at_newline: bool = Field(True, description="Stop decoding at a newline (and EOS); score the first line.")
    seed: int = 0
    threshold: float = Field(
        85.6, ge=0, le=100, description="Absolute threshold for the effective length (RULER: 85.6)."
    )
    relative_threshold: float | None = Field(
        None, gt=0, le=1, description="If set: threshold = this fraction of the score at the shortest length."
    )
    ci: Literal["wilson", "bootstrap"] = Field("wilson", description="95% interval of a task's mean score.")
    confidence: float = Field(0.95, gt=0, lt=1)
    device: str = Field("auto", description="auto: cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    resume: bool = Field(True, description="Reuse predictions.jsonl rows of an identical earlier run.")
    compact: CompactWording = Field(default_factory=CompactWording)
    options: TaskOptions = Field(default_factory=TaskOptions)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one task")
        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; expected any of {list(TASKS)}")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is listed twice")
        return v

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one length")
        bad = [x for x in v if x < 1]
        if bad:
            raise ValueError(f"length {bad[0]} must be a positive number of tokens")
        if len(set(v)) != len(v):
            raise ValueError(f"lengths repeat: {v}")
        return sorted(v)

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one depth")
        bad = [x for x in v if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"depth {bad[0]} must lie in [0, 1]")
        if len(set(v)) != len(v):
            raise ValueError(f"depths repeat: {v}")
        return v
