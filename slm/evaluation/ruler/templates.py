"""Prompt wording. Two sets share one shape, `TemplateSet`:

- `ruler`: the wording of RULER's task descriptions (Hsieh et al. 2024, Appendix B), written
  out here from the paper, for real Hugging Face models. Each prompt is
  `intro \\n context \\n question+answer prefix`; the haystack is RULER's "noise" (the five
  repeated sentences of the pass-key test, Mohtashami & Jaggi 2023). `passkey` keeps the wording
  of Landmark Attention / Infini-attention. Trailing spaces of RULER's answer prefixes are
  dropped (a byte-level BPE would otherwise end the prompt on a lone space token).
- `compact`: the short wording of the slm demo corpus (no intro, filler sentences drawn at
  random, the question at the end), every string configurable (`RulerConfig.compact`).

Placeholders: {key} pass key; {k}, {v} key and value; {keys} several keys "a, b, and c";
{var}, {src}, {value} variable names and value; {num} how many answers; {i}, {word} list item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slm.evaluation.ruler.config import CompactWording, TaskOptions

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
}


def number_word(n: int) -> str:
    return NUMBER_WORDS.get(n, str(n))


@dataclass(frozen=True)
class TemplateSet:
    name: str
    filler: tuple[str, ...]
    filler_order: Literal["cycle", "random"]
    section_sep: str  # between intro, context and question
    passkey_intro: str
    passkey_needle: str
    passkey_question: str
    niah_intro: str
    kv_needle: str
    kv_question: str
    kv_multi_question: str
    vt_intro: str
    vt_assign: str
    vt_copy: str
    vt_question: str
    cwe_intro: str
    cwe_item: str
    cwe_question: str
    fwe_intro: str
    fwe_question: str
    key_kind: Literal["adj-noun", "number", "word", "letters"]
    key_digits: int
    value_kind: Literal["number", "uuid"]
    value_digits: int
    num_as_word: bool  # {num} as "three" (ruler) or "3" (compact)

    def join_keys(self, keys: list[str]) -> str:
        """RULER's multi-query phrasing: "a, b, and c" (two keys: "a and b")."""
        if len(keys) == 1:
            return keys[0]
        if len(keys) == 2:
            return f"{keys[0]} and {keys[1]}"
        return ", ".join(keys[:-1]) + ", and " + keys[-1]

    def num(self, n: int) -> str:
        return number_word(n) if self.num_as_word else str(n)


def ruler_templates(options: TaskOptions) -> TemplateSet:
    kind = "numbers" if options.niah_values == "numbers" else "uuids"
    question = (
        f"What are all the special magic {kind} for {{k}} mentioned in the provided text? "
        f"The special magic {kind} for {{k}} mentioned in the provided text are"
    )
    return TemplateSet(
        name="ruler",
        filler=NOISE,
        filler_order="cycle",
        section_sep="\n",
        passkey_intro=(
            "There is an important info hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the important information there."
        ),
        passkey_needle="The pass key is {key}. Remember it. {key} is the pass key.",
        passkey_question="What is the pass key? The pass key is",
        niah_intro=(
            f"Some special magic {kind} are hidden within the following text. "
            f"Make sure to memorize it. I will quiz you about the {kind} afterwards."
        ),
        kv_needle=f"One of the special magic {kind} for {{k}} is: {{v}}.",
        kv_question=question,
        kv_multi_question=question.replace("{k}", "{keys}"),
        vt_intro="Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
        vt_assign="VAR {var} = {value}.",
        vt_copy="VAR {var} = VAR {src}.",
        vt_question=(
            "Question: Find all variables that are assigned the value {value} in the text above. "
            "Answer: According to the chain(s) of variable assignment in the text above, "
            "{num} variables are assigned the value {value}, they are:"
        ),
        cwe_intro=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        cwe_item="{i}. {word}",
        cwe_question=(
            "Question: What are the {num} most common words in the above list? "
            "Answer: The top {num} words that appear most often in the list are:"
        ),
        fwe_intro=(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the {num} most frequently appeared coded words."
        ),
        fwe_question=(
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the {num} most frequently appeared words in the above coded text? "
            "Answer: According to the coded text above, the {num} most frequently appeared words are:"
        ),
        key_kind="adj-noun",
        key_digits=0,
        value_kind="number" if options.niah_values == "numbers" else "uuid",
        value_digits=options.value_digits,
        num_as_word=True,
    )


def compact_templates(w: CompactWording) -> TemplateSet:
    return TemplateSet(
        name="compact",
        filler=tuple(w.filler),
        filler_order="random",
        section_sep=" ",
        passkey_intro="",
        passkey_needle=w.passkey_needle,
        passkey_question=w.passkey_question,
        niah_intro="",
        kv_needle=w.kv_needle,
        kv_question=w.kv_question,
        kv_multi_question=w.kv_multi_question,
        vt_intro="",
        vt_assign=w.vt_assign,
        vt_copy=w.vt_copy,
        vt_question=w.vt_question,
        cwe_intro="",
        cwe_item=w.cwe_item,
        cwe_question=w.cwe_question,
        fwe_intro="",
        fwe_question=w.fwe_question,
        key_kind=w.key_kind,
        key_digits=w.key_digits,
        value_kind="number",
        value_digits=w.value_digits,
        num_as_word=False,
    )


def get_templates(template_set: str, compact: CompactWording, options: TaskOptions) -> TemplateSet:
    if template_set == "ruler":
        return ruler_templates(options)
    if template_set == "compact":
        return compact_templates(compact)
    raise ValueError(f"template_set={template_set!r}: expected 'ruler' or 'compact'")
