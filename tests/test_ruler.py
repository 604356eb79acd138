"""RULER-style evaluation: generators, sizing, decoding, scoring, effective length, run_ruler.

A tiny byte-level BPE (trained here with `tokenizers`) and a tiny random Llama stand in for a
real model; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import random
import re
import string

import pytest
import torch

from slm.config import validate
from slm.errors import SlmError
from slm.evaluation.ruler import decode as decode_mod
from slm.evaluation.ruler import runner as runner_mod
from slm.evaluation.ruler.config import TASKS, CompactWording, RulerConfig, TaskOptions
from slm.evaluation.ruler.decode import clean_prediction, greedy_generate, stop_token_ids
from slm.evaluation.ruler.report import aggregate, summary_table
from slm.evaluation.ruler.runner import run_ruler
from slm.evaluation.ruler.scoring import (
    bootstrap_interval,
    effective_length,
    match_all,
    match_part,
    string_match_all,
    string_match_part,
    summarize,
    wilson_interval,
)
from slm.evaluation.ruler.sizing import TooShort, count_prompt_tokens, fit_units
from slm.evaluation.ruler.tasks import generate_sample, zipf_counts, zipf_valid
from slm.evaluation.ruler.templates import compact_templates, get_templates, ruler_templates
from slm.evaluation.ruler.vocab import ADJECTIVES, NOUNS, VERBS

# small task sizes so that every task fits a few hundred tokens of a tiny tokenizer
SMALL = TaskOptions(
    cwe_common=5,
    cwe_freq_common=4,
    cwe_freq_uncommon=1,
    vt_hops=2,
    multikey_keys=3,
    multivalue_values=3,
    multiquery_queries=2,
)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _training_text() -> list[str]:
    rng = random.Random(0)
    texts = []
    for tpl in (ruler_templates(TaskOptions()), compact_templates(CompactWording())):
        for v in vars(tpl).values():
            if isinstance(v, str):
                texts.append(v)
            elif isinstance(v, tuple):
                texts.extend(v)
    words = ADJECTIVES + NOUNS + VERBS
    for _ in range(1500):
        texts.append(
            " ".join(rng.choice(words) for _ in range(12))
            + f" {rng.randint(0, 10**7)} "
            + "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            + " "
            + "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
            + f" {rng.randint(1, 999)}.\n"
        )
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BPE tokenizer (adds BOS) and a tiny random Llama, saved together like a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 1 << 30
    fast.save_pretrained(str(out))

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _sample(tokenizer, task, length, index=0, template_set="compact", seed=0, depths=DEPTHS, options=SMALL):
    tpl = get_templates(template_set, CompactWording(), options)
    return generate_sample(
        task, length, index, tokenizer=tokenizer, templates=tpl, options=options, depths=depths, seed=seed
    )


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("template_set,lengths", [("compact", [512, 1024]), ("ruler", [1024, 2048])])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fills_target_length(tokenizer, task, template_set, lengths):
    """Prompt tokens (BOS included) <= target, >= 90% of it; prompt + answer <= target."""
    for length in lengths:
        for index in range(2):
            s = _sample(tokenizer, task, length, index, template_set)
            n = len(tokenizer(s.prompt)["input_ids"])  # counted independently of the sizing code
            assert n == s.prompt_tokens
            assert 0.9 * length <= n <= length, (task, length, n)
            assert n + s.answer_tokens <= length
            assert s.answers and all(a.strip() for a in s.answers)
            assert s.metric == "string_match_all"


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_in_the_prompt(tokenizer, task):
    """Retrieval tasks hide their answers in the context; extraction tasks list their words."""
    for template_set, length in (("compact", 512), ("ruler", 1024)):
        s = _sample(tokenizer, task, length, 1, template_set)
        context = s.prompt[s.haystack_span[0] : s.haystack_span[1]]
        for a in s.answers:
            assert a in context, (task, a)
        for a, b in s.needle_spans:  # asked needles lie inside the context
            assert s.haystack_span[0] <= a < b <= s.haystack_span[1]


def test_passkey_and_kv_wording_match_the_demo(tokenizer):
    s = _sample(tokenizer, "passkey", 512, 2)
    key = s.answers[0]
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.prompt
    assert s.prompt.endswith("What is the pass key? The pass key is")
    s = _sample(tokenizer, "niah_multikey", 512, 2)
    assert s.prompt.count("The value of key ") == 1 + SMALL.multikey_keys  # needles + the question
    assert f"is {s.answers[0]}." in s.prompt
    key = s.prompt.rsplit("What is the value of key ", 1)[1].split("?")[0]
    assert f"The value of key {key} is {s.answers[0]}." in s.prompt


def test_custom_compact_wording(tokenizer):
    w = CompactWording(passkey_needle="PK={key}.", passkey_question="PK?", filler=["Lorem ipsum."])
    tpl = compact_templates(w)
    s = generate_sample("passkey", 256, 0, tokenizer=tokenizer, templates=tpl, options=SMALL, depths=[0.5], seed=0)
    assert f"PK={s.answers[0]}." in s.prompt and s.prompt.endswith("PK?")
    assert set(s.prompt.replace(f"PK={s.answers[0]}.", "").replace("PK?", "").split()) == {"Lorem", "ipsum."}
    with pytest.raises(SlmError, match=r"compact\.kv_needle"):
        validate(
            {"model": "m", "out_dir": "o", "compact": {"kv_needle": "key {k} has no value"}}, RulerConfig, "cfg.yaml"
        )


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
@pytest.mark.parametrize("template_set,length", [("compact", 1024), ("ruler", 2048)])
def test_depth_places_the_needle(tokenizer, task, template_set, length):
    """Sample i sits at depths[i % 5]; the needle's share of the haystack before it matches."""
    for index, depth in enumerate(DEPTHS):
        s = _sample(tokenizer, task, length, index, template_set)
        assert s.depth == depth
        assert abs(s.needle_depth - depth) < 0.05, (task, depth, s.needle_depth)
    assert _sample(tokenizer, task, length, 7, template_set).depth == DEPTHS[2]


def test_variable_tracking_chain_is_in_order(tokenizer):
    for index in range(5):
        s = _sample(tokenizer, "variable_tracking", 512, index)
        names = s.answers
        positions = [s.prompt.index(f"VAR {n} =") for n in names]
        assert positions == sorted(positions)
        for prev, name in zip(names, names[1:]):
            assert f"VAR {name} = VAR {prev}." in s.prompt
        assert abs(s.needle_depth - s.depth) < 0.05


def test_extraction_tasks_have_the_right_counts(tokenizer):
    s = _sample(tokenizer, "common_words", 1024, 0)
    items = s.prompt[s.haystack_span[0] : s.haystack_span[1]].split()[1::2]  # "1. w 2. w" -> words
    counts = {w: items.count(w) for w in set(items)}
    assert sorted(s.answers) == sorted(w for w, c in counts.items() if c == SMALL.cwe_freq_common)
    assert all(c == SMALL.cwe_freq_uncommon for w, c in counts.items() if w not in s.answers)

    s = _sample(tokenizer, "frequent_words", 1024, 0, "ruler", options=TaskOptions())
    words = s.prompt[s.haystack_span[0] : s.haystack_span[1]].split()
    ranked = sorted(set(words), key=lambda w: -words.count(w))
    assert ranked[0] == "...."
    assert ranked[1:4] == s.answers
    top = [words.count(w) for w in ranked[:5]]
    assert top[1] > top[2] > top[3] > top[4]  # the answer is unambiguous


def test_zipf_counts():
    for n in (53, 100, 1000, 12345):
        c = zipf_counts(n, 2.0)
        assert sum(c) == n and c == sorted(c, reverse=True)
    assert zipf_valid(zipf_counts(1000, 2.0), 3)
    assert not zipf_valid(zipf_counts(10, 2.0), 3)


def test_determinism_and_fresh_keys(tokenizer):
    for task in ("passkey", "niah_multikey", "variable_tracking", "common_words", "frequent_words"):
        a = _sample(tokenizer, task, 512, 3, seed=7)
        b = _sample(tokenizer, task, 512, 3, seed=7)
        assert a.to_json() == b.to_json()
        c = _sample(tokenizer, task, 512, 3, seed=8)
        d = _sample(tokenizer, task, 512, 4, seed=7)
        assert c.answers != a.answers and d.answers != a.answers
        assert c.prompt != a.prompt
    # values differ across samples: 20 pass keys, (almost surely) 20 different ones
    keys = {_sample(tokenizer, "passkey", 256, i).answers[0] for i in range(20)}
    assert len(keys) == 20


def test_too_short_length_is_a_one_line_error(tokenizer):
    with pytest.raises(SlmError, match=r"length 40 is too short for task 'niah_multivalue'") as e:
        _sample(tokenizer, "niah_multivalue", 40)
    assert "\n" not in str(e.value)


def test_fit_units_finds_the_largest_fitting_count():
    def render(n):
        return "x" * (3 * n + 10)

    for budget in (10, 11, 12, 13, 100, 1000, 99_999):
        n, text, tokens = fit_units(render, len, budget)
        assert tokens <= budget and len(render(n + 1)) > budget and text == render(n)
    with pytest.raises(TooShort):
        fit_units(render, len, 9)
    # a non-monotone count still returns a prompt that fits
    n, text, tokens = fit_units(lambda n: "y" * (2 * n + (5 if n % 7 == 0 else 0)), len, 501)
    assert tokens <= 501 and tokens >= 490


# --------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def llama64(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()


def test_chunked_greedy_equals_hf_generate(llama64, tokenizer):
    ids = tokenizer("The pass key is 48213. Remember it. The grass is green. What is the pass key? The pass key is")[
        "input_ids"
    ]
    x = torch.tensor([ids])
    ref = llama64.generate(x, do_sample=False, max_new_tokens=12, pad_token_id=2, eos_token_id=[1])[
        0, len(ids) :
    ].tolist()
    assert len(ref) == 12 and len(set(ref)) > 3  # a real test: no early stop, not one repeated token
    for chunk_len in (1, 3, 7, 1000):
        assert greedy_generate(llama64, ids, 12, chunk_len, [1]) == ref
    # stopping: make the 5th generated token a stop token; both stop there and include it
    stop = [ref[4]]
    ref_stop = llama64.generate(x, do_sample=False, max_new_tokens=12, pad_token_id=2, eos_token_id=stop)[
        0, len(ids) :
    ].tolist()
    assert ref_stop == ref[:5] == greedy_generate(llama64, torch.tensor(ids), 12, 4, stop)


def test_greedy_with_past_key_values_models(llama64, tokenizer):
    """slm backbones take and return `past_key_values` (not `cache`): same result."""

    class PkvModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=None, **kwargs):
            out = self.inner(input_ids=input_ids, cache=past_key_values, use_cache=use_cache)
            return {"logits": out.logits, "past_key_values": out.cache}

    class Out(dict):
        __getattr__ = dict.get

    wrapped = PkvModel(llama64)
    orig = wrapped.forward
    wrapped.forward = lambda *a, **k: Out(orig(*a, **k))
    assert decode_mod.cache_argument(wrapped) == "past_key_values"
    ids = tokenizer("Here we go. There and back again. The pass key is")["input_ids"]
    assert greedy_generate(wrapped, ids, 8, 3, []) == greedy_generate(llama64, ids, 8, 1000, [])


def test_stop_tokens_and_cleaning(tokenizer):
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert nl and nl[0] in stops
    assert tokenizer("green", add_special_tokens=False)["input_ids"][0] not in stops
    assert clean_prediction(" 48213.\nWhat") == "48213."
    assert clean_prediction("\n 48213.\nWhat") == "48213."  # a leading newline does not empty it
    assert clean_prediction(" a\nb ", first_line=False) == "a\nb"
    assert stop_token_ids(tokenizer, newline=False) == [tokenizer.eos_token_id]


# --------------------------------------------------------------------------- scoring


def test_string_match_metrics():
    preds = ["The numbers are 123 and 456.", "only 789", "nothing here", "ABC, def"]
    refs = [["123", "456"], ["789", "000"], ["1"], ["abc", "DEF", "ghi"]]
    assert match_all(preds[0], refs[0]) == 1.0
    assert match_all(preds[1], refs[1]) == 0.5
    assert match_all(preds[3], refs[3]) == pytest.approx(2 / 3)  # case-insensitive
    assert string_match_all(preds, refs) == pytest.approx(100 * (1 + 0.5 + 0 + 2 / 3) / 4)
    assert match_part(preds[1], refs[1]) == 1.0
    assert string_match_part(preds, refs) == pytest.approx(100 * 3 / 4)
    assert string_match_all([], []) == 0.0


def test_confidence_intervals():
    lo, hi = wilson_interval(1.0, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)  # textbook value for 10/10
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    scores = [1.0] * 7 + [0.0] * 3
    blo, bhi = bootstrap_interval(scores)
    assert blo < 0.7 < bhi and (blo, bhi) == bootstrap_interval(scores)  # deterministic
    s = summarize(scores, "wilson")
    assert s["score"] == pytest.approx(70) and s["ci_low"] < 70 < s["ci_high"] and s["n"] == 10
    assert summarize(scores, "bootstrap")["ci_low"] == pytest.approx(100 * blo)


def test_effective_length_absolute_and_relative():
    table = {4096: 95.0, 8192: 90.0, 16384: 86.0, 32768: 80.0, 65536: 88.0}
    r = effective_length(table)  # 85.6; the rebound at 64K does not count
    assert r["length"] == 16384 and r["kind"] == "absolute" and r["threshold"] == 85.6
    assert effective_length(table, threshold=91)["length"] == 4096
    assert effective_length(table, threshold=96)["length"] is None
    assert effective_length({1: 85.6})["length"] == 1  # at the threshold counts
    r = effective_length(table, relative_threshold=0.9)  # 0.9 * 95 = 85.5
    assert r["kind"] == "relative" and r["threshold"] == pytest.approx(85.5) and r["length"] == 16384
    r = effective_length({256: 40.0, 512: 38.0, 1024: 30.0}, relative_threshold=0.9)  # 36
    assert r["length"] == 512
    assert effective_length({256: 40.0, 512: 38.0}, relative_threshold=1.0)["length"] == 256


def test_aggregate_by_task_length_depth():
    rows = [
        {"task": "passkey", "length": 256, "depth": d, "score": s, "metric": "string_match_all"}
        for d, s in [(0.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    ] + [{"task": "common_words", "length": 256, "depth": None, "score": 0.5, "metric": "string_match_all"}] * 2
    agg = aggregate(rows, ["passkey", "common_words"], [256, 512])
    p = agg["scores"]["passkey"]["256"]
    assert p["score"] == 75 and p["n"] == 4 and p["by_depth"] == {"0": 100, "1": 50}
    assert agg["scores"]["common_words"]["256"]["by_depth"] == {"all": 50}
    assert agg["average"]["256"] == pytest.approx(62.5)
    assert math.isnan(agg["average"]["512"])  # no samples at 512


# --------------------------------------------------------------------------- run_ruler


def test_run_ruler_end_to_end(model_dir, tmp_path, monkeypatch):
    cfg = RulerConfig(
        model=str(model_dir),
        out_dir=str(tmp_path / "ruler"),
        tasks=["passkey", "niah_multikey", "common_words"],
        lengths=[256, 512],
        samples_per_length=2,
        depths=[0.0, 1.0],
        template_set="compact",
        chunk_len=100,
        max_new_tokens=4,
        options=SMALL,
        relative_threshold=0.9,
    )
    res = run_ruler(cfg, progress=False)
    out = tmp_path / "ruler"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["scores"] == json.loads(json.dumps(res["scores"]))
    assert set(res["scores"]) == {"passkey", "niah_multikey", "common_words"}
    for task, by_len in res["scores"].items():
        assert set(by_len) == {"256", "512"}
        for entry in by_len.values():
            assert entry["n"] == 2 and 0 <= entry["ci_low"] <= entry["score"] <= entry["ci_high"] <= 100
        png = (out / f"heatmap_{task}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "average.png").is_file()
    assert set(res["average"]) == {"256", "512"} and res["effective_length"]["kind"] == "relative"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    assert len(rows) == 12 and all(r["generated_tokens"] <= 4 and r["prompt_tokens"] <= r["length"] for r in rows)

    # a rerun reuses every prediction without decoding again
    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(runner_mod, "greedy_generate", boom)
    again = run_ruler(cfg, progress=False)
    assert again["reused_predictions"] == 12 and again["scores"] == res["scores"]


def test_run_ruler_errors(model_dir, tmp_path):
    with pytest.raises(SlmError, match="directory not found") as e:
        run_ruler(RulerConfig(model=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")), progress=False)
    assert "nope" in str(e.value)
    with pytest.raises(SlmError, match=r"length 64 is too short for task 'common_words'"):
        run_ruler(
            RulerConfig(
                model=str(model_dir),
                out_dir=str(tmp_path / "o"),
                tasks=["common_words"],
                lengths=[64],
                template_set="compact",
            ),
            progress=False,
        )
    assert not (tmp_path / "o").exists()  # failed before loading the model or writing anything
    with pytest.raises(SlmError, match=r"key 'tasks'.*unknown task 'needle'") as e:
        validate({"model": "m", "out_dir": "o", "tasks": ["passkey", "needle"]}, RulerConfig, "ruler.yaml")
    assert "\n" not in str(e.value) and "ruler.yaml" in str(e.value)
    with pytest.raises(SlmError, match=r"depth 1.5"):
        validate({"model": "m", "out_dir": "o", "depths": [0, 1.5]}, RulerConfig, "ruler.yaml")
    with pytest.raises(SlmError, match=r"cwe_freq_common=3 must exceed"):
        validate({"model": "m", "out_dir": "o", "options": {"cwe_freq_common": 3}}, RulerConfig, "ruler.yaml")
    with pytest.raises(SlmError, match=r"key 'lenghts': unknown key"):
        validate({"model": "m", "out_dir": "o", "lenghts": [1]}, RulerConfig, "ruler.yaml")


def test_prompt_token_count_skips_appended_eos(tokenizer):
    assert count_prompt_tokens(tokenizer, "Here we go.") == len(tokenizer("Here we go.")["input_ids"])


def test_run_ruler_scores_a_perfect_model(model_dir, tokenizer, tmp_path, monkeypatch):
    """An oracle decoder that reads the pass key off the prompt scores 100 everywhere."""

    def oracle(model, input_ids, max_new_tokens, chunk_len, stop_token_ids):
        key = re.search(r"The pass key is (\d+)\.", tokenizer.decode(input_ids)).group(1)
        return tokenizer(f" {key}.\nnoise", add_special_tokens=False)["input_ids"]

    monkeypatch.setattr(runner_mod, "greedy_generate", oracle)
    cfg = RulerConfig(
        model=str(model_dir),
        out_dir=str(tmp_path / "ruler"),
        tasks=["passkey"],
        lengths=[256, 512],
        samples_per_length=3,
        depths=[0.0, 0.5, 1.0],
        template_set="compact",
        max_new_tokens=8,
    )
    res = run_ruler(cfg, progress=False)
    for entry in res["scores"]["passkey"].values():
        assert entry["score"] == 100 and entry["by_depth"] == {"0": 100, "0.5": 100, "1": 100}
        assert entry["ci_high"] == pytest.approx(100) and entry["ci_low"] < 100  # Wilson: n=3 is not certainty
    assert res["effective_length"] == {"length": 512, "threshold": 85.6, "kind": "absolute", "relative_threshold": None}
    table = summary_table(res)
    assert "passkey" in table and "100.0" in table and "effective length at threshold 85.6: 512" in table
