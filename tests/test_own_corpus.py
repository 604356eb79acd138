"""A user's own corpus end to end (issue 13): `slm data tokenizer`, the EOS check wherever slm loads a tokenizer,
`slm init pipeline` and the pipeline it writes run by `slm run` on a small corpus that is not the demo."""

from __future__ import annotations

import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from slm import cli
from slm.config import CorpusConfig
from slm.data.tokenizer import corpus_texts, load_tokenizer, min_vocab_size, train_corpus_tokenizer
from slm.errors import SlmError

# A small world of plain sentences (the "high-quality" domain), and web junk to mix into the training corpus.
SUBJECTS = ["the farmer", "a child", "my sister", "the old man", "our teacher", "the baker", "a small dog"]
VERBS = ["walks to", "looks at", "paints", "carries", "finds", "repairs", "visits", "remembers"]
OBJECTS = ["the river", "a red boat", "the garden", "an old letter", "the market", "a warm loaf", "the bridge"]
TIMES = ["in the morning", "after the rain", "before dinner", "every winter", "at noon", "on sunday"]
JUNK = ["Home", "Login", "Contact", "Cart", "Help", "Terms", "BUY NOW!!!", "FREE", "click here"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."


def clean_document(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))


def web_document(rng: random.Random) -> str:
    """Clean text with navigation, hashes or spam lines mixed in at random places."""
    parts = [clean_document(rng)]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(3)
        if kind == 0:
            parts.append(" | ".join(rng.sample(JUNK[:6], 4)))
        elif kind == 1:
            parts.append("".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(20, 60))))
        else:
            parts.append(" ".join(rng.choice(JUNK[6:]) for _ in range(rng.randint(3, 8))))
    rng.shuffle(parts)
    return "\n".join(parts)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "source": "own"}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def own_corpus(tmp_path_factory):
    """hq.jsonl (300 clean documents), web.jsonl (400 mixed ones; the same as web.parquet, column `body`),
    val.jsonl (40 clean)."""
    root = tmp_path_factory.mktemp("own")
    rng = random.Random(13)
    write_jsonl(root / "hq.jsonl", [clean_document(rng) for _ in range(300)])
    web = [web_document(rng) for _ in range(400)]
    write_jsonl(root / "web.jsonl", web)
    pq.write_table(pa.table({"body": web}), root / "web.parquet")
    write_jsonl(root / "val.jsonl", [clean_document(rng) for _ in range(40)])
    return root


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.run_cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


# ---------------------------------------------------------------------------------------------- slm data tokenizer


def test_data_tokenizer_trains_a_transformers_tokenizer_on_two_formats(own_corpus, tmp_path, capsys):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = tmp_path / "tok"
    code, said = run_cli(
        capsys, "data", "tokenizer", "--corpus", own_corpus / "hq.jsonl", "--vocab-size", 400, "--out", out
    )
    assert code == 0, said
    tok = AutoTokenizer.from_pretrained(str(out))
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 400
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    text = "The baker repairs the bridge at noon. Ünïcödé and 12345 survive: byte-level."
    assert tok.decode(tok(text)["input_ids"]) == text  # any byte sequence round-trips
    assert len(tok("The farmer walks to the river")["input_ids"]) < 10  # merges learned from the corpus
    record = json.loads((out / "stage.json").read_text())
    assert record["status"] == "complete" and record["metrics"]["vocab_size"] == 400

    code, said = run_cli(
        capsys, "data", "tokenizer", "--corpus", own_corpus / "hq.jsonl", "--vocab-size", 400, "--out", out
    )
    assert code == 0 and "complete for this config; skipping" in said  # a rerun skips

    # from a config: two corpora read in turn, the second a parquet file with its text in `body`
    web = [{"path": str(own_corpus / "web.parquet"), "text_field": "body"}]
    corpora = [{"path": str(own_corpus / "hq.jsonl")}, *web]
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "tok2"), "corpus": corpora, "vocab_size": 400}))
    code, said = run_cli(capsys, "data", "tokenizer", "--config", cfg)
    assert code == 0, said
    both = load_tokenizer(tmp_path / "tok2")
    junk = "Home | Login | Contact | Cart"
    assert len(both) == 400 and len(both(junk)["input_ids"]) < len(tok(junk)["input_ids"])  # it learned the web's


def test_data_tokenizer_refuses_a_vocab_smaller_than_its_alphabet(own_corpus, tmp_path, capsys):
    code, said = run_cli(
        capsys, "data", "tokenizer", "--corpus", own_corpus / "hq.jsonl", "--vocab-size", 200, "--out", tmp_path / "t"
    )
    assert code == 2
    assert f"vocab_size=200: a byte-level BPE needs at least {min_vocab_size()} tokens" in said
    assert len([line for line in said.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "t").exists()  # refused before any work
    # and in a config (the same check), and in the library function the demo uses
    with pytest.raises(SlmError, match="256 byte symbols"):
        train_corpus_tokenizer([CorpusConfig(path=str(own_corpus / "hq.jsonl"))], 257, tmp_path / "t")
    assert min_vocab_size() == 258
    args = ["--vocab-size", 300, "--out", tmp_path / "t"]
    code, said = run_cli(capsys, "data", "tokenizer", "--corpus", own_corpus / "web.parquet", *args)
    assert code == 2 and "no text field 'text'; columns are ['body']" in said


def test_corpus_texts_streams_in_batches(own_corpus, tmp_path):
    """Python holds one batch of documents at a time: peak traced memory while reading a corpus 8x larger grows
    by far less than the extra text (an iterator that listed the whole column would grow by all of it)."""
    rng = random.Random(0)
    small = write_jsonl(tmp_path / "small.jsonl", [clean_document(rng) for _ in range(2_000)])
    big = write_jsonl(tmp_path / "big.jsonl", [clean_document(rng) for _ in range(16_000)])
    batches = corpus_texts(CorpusConfig(path=str(small)), batch_documents=500)
    first = next(batches)
    assert len(first) == 500 and all(isinstance(t, str) for t in first)
    assert sum(len(b) for b in batches) == 1_500

    def peak(path) -> int:
        cfg = CorpusConfig(path=str(path))
        for _ in corpus_texts(cfg):  # the first pass converts the file to Arrow (not measured)
            pass
        tracemalloc.start()
        n = sum(len(b) for b in corpus_texts(cfg, batch_documents=500))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return n, top

    (n_small, p_small), (n_big, p_big) = peak(small), peak(big)
    assert (n_small, n_big) == (2_000, 16_000)
    extra_text = big.stat().st_size - small.stat().st_size
    assert p_big - p_small < 0.1 * extra_text, (p_small, p_big, extra_text)


# ---------------------------------------------------------------------------------------------- EOS check


def test_a_tokenizer_without_eos_is_refused_naming_the_fix(own_corpus, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["some text without an end token"], trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path / "no_eos"))
    with pytest.raises(SlmError, match=r"has no EOS token.*\"eos_token\" in its tokenizer_config.json.*slm data "):
        load_tokenizer(tmp_path / "no_eos")
    # what a stage says: the reference stage refuses it before building a model
    cfg = tmp_path / "ref.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "out_dir": str(tmp_path / "ref"),
                "tokenizer": str(tmp_path / "no_eos"),
                "corpus": {"path": str(own_corpus / "hq.jsonl")},
            }
        )
    )
    code, said = run_cli(capsys, "reference", "--config", cfg)
    assert code == 2 and "has no EOS token" in said and "slm data tokenizer --corpus PATH" in said


# ---------------------------------------------------------------------------------------------- slm init pipeline


def init_args(own_corpus, out, *extra):
    return [
        "init",
        "pipeline",
        "--reference-corpus",
        own_corpus / "hq.jsonl",
        "--train-corpus",
        own_corpus / "web.jsonl",
        "--validation",
        own_corpus / "val.jsonl",
        "--out",
        out,
        *extra,
    ]


def test_init_pipeline_writes_a_valid_commented_pipeline(own_corpus, tmp_path, capsys):
    from slm.jobs import render_pipeline
    from slm.pipeline import load_pipeline

    out = tmp_path / "my.yaml"
    code, said = run_cli(capsys, *init_args(own_corpus, out, "--text-field", "text", "--backbone", "fam"))
    assert code == 0 and f"slm run {out}" in said, said
    text = out.read_text()
    assert text.startswith("# A pipeline for your own corpora") and text.count("\n  # ") >= 6  # commented stages
    pipeline, stages, _ = load_pipeline(out)
    kinds = [
        "tokenizer",
        "reference",
        "score",
        "pretrain",
        "pretrain",
        "eval",
        "eval",
        "eval",
        "compare",
        "shards_report",
    ]
    assert [s.kind for s in stages] == kinds
    by = {s.name: s.cfg for s in stages}
    assert pipeline.work_dir == "runs/my"
    assert by["reference"].tokenizer == by["tokenizer"].out_dir == "runs/my/tokenizer"
    slm_cfg, clm_cfg = by["pretrain_slm"], by["pretrain_clm"]
    assert slm_cfg.selection.enabled and not clm_cfg.selection.enabled
    assert slm_cfg.train == clm_cfg.train and slm_cfg.model == clm_cfg.model  # one budget, one student
    assert slm_cfg.model.backbone == "fam" and by["reference"].model.backbone == "llama"
    assert by["score"].seq_len == slm_cfg.train.seq_len == by["eval_slm"].seq_len
    assert by["score"].corpus.path == str(own_corpus / "web.jsonl")  # absolute: runs from any directory

    # as Slurm jobs: each stage kind has its command, and the comparison waits for both runs and the evals
    jobs = {j.stage: j for j in render_pipeline(out, tmp_path / "jobs", [f"work_dir={tmp_path / 'w'}"])}
    assert f"slm data tokenizer --config {jobs['tokenizer'].config}" in jobs["tokenizer"].script.read_text()
    assert f"slm compare --config {jobs['compare'].config}" in jobs["compare"].script.read_text()
    assert f"slm shards report --config {jobs['report'].config}" in jobs["report"].script.read_text()
    assert {"pretrain_slm", "pretrain_clm", "eval_slm", "eval_clm"} <= set(jobs["compare"].depends_on)
    assert "tokenizer" in jobs["reference"].depends_on
    code, said = run_cli(capsys, "data", "tokenizer", "--config", jobs["tokenizer"].config)  # what the job runs
    assert code == 0 and len(load_tokenizer(tmp_path / "w" / "tokenizer")) <= 2048, said

    code, said = run_cli(capsys, *init_args(own_corpus, out))
    assert code == 2 and "already exists; use --force" in said
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    code, said = run_cli(capsys, *init_args(own_corpus, out, "--force", "--tokenizer", tok_dir))
    assert code == 0, said
    _, stages, _ = load_pipeline(out)
    assert stages[0].kind == "reference" and stages[0].cfg.tokenizer == str(tok_dir)
    for bad, message in (
        (["--backbone", "gpt9"], "model.backbone='gpt9': unknown backbone; expected one of"),
        (["--vocab-size", "100"], "--vocab-size=100: a byte-level BPE needs at least 258"),
    ):
        code, said = run_cli(capsys, *init_args(own_corpus, tmp_path / "other.yaml", *bad))
        assert code == 2 and message in said, said
    args = init_args(own_corpus, tmp_path / "other.yaml")
    args[args.index("--reference-corpus") + 1] = tmp_path / "missing.jsonl"
    code, said = run_cli(capsys, *args)
    assert code == 2 and "--reference-corpus" in said and "missing.jsonl" in said and "file not found" in said
    assert not (tmp_path / "other.yaml").exists()


def test_init_pipeline_runs_end_to_end_on_a_corpus_that_is_not_the_demo(own_corpus, tmp_path, capsys):
    """`slm init pipeline` then `slm run` on it: every stage completes, the comparison exists, a rerun skips all.

    The written file is run as it is apart from fewer steps (--set, to keep the test short; with the template's own
    sizes `slm run` took 60-82 s on the 2-core machine)."""
    from slm.pipeline import run_pipeline

    out = tmp_path / "my.yaml"
    assert run_cli(capsys, *init_args(own_corpus, out, "--work-dir", tmp_path / "w"))[0] == 0
    sets = [
        "stages.reference.train.max_steps=40",
        "stages.reference.train.eval_every=20",
        "stages.pretrain_slm.train.max_steps=30",
        "stages.pretrain_slm.train.eval_every=10",
        "stages.pretrain_clm.train.max_steps=30",
        "stages.pretrain_clm.train.eval_every=10",
    ]
    args = ["run", out] + [x for s in sets for x in ("--set", s)]
    code, said = run_cli(capsys, *args)
    assert code == 0, said[-3000:]
    w = tmp_path / "w"
    outputs = ["tokenizer", "reference", "shards", "pretrain_slm", "pretrain_clm", "eval_reference", "eval_slm"]
    for stage in [*outputs, "eval_clm", "compare", "report"]:
        assert json.loads((w / stage / "stage.json").read_text())["status"] == "complete", stage
    comparison = json.loads((w / "compare" / "comparison.json").read_text())
    assert comparison["equal_budget"] and comparison["slm"]["tokens_seen"] == comparison["clm"]["tokens_seen"] > 0
    assert comparison["slm"]["selection"]["enabled"] and not comparison["clm"]["selection"]["enabled"]
    assert 0 < comparison["slm"]["kept_fraction"] < 1
    assert set(comparison["evals"]) == {"reference", "slm", "clm"}
    assert comparison["evals"]["clm"]["heldout_loss"] == pytest.approx(comparison["clm"]["final_heldout_loss"])
    assert (w / "compare" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "# SLM vs CLM" in (w / "compare" / "comparison.md").read_text()
    assert "compare: equal_budget=True" in said
    assert len(load_tokenizer(w / "tokenizer")) <= 2048
    report = json.loads((w / "report" / "report.json").read_text())
    assert report["score"] == "excess" and set(report["curves"]) == {"SLM", "CLM"}
    assert report["per_source"][0]["source"] == "own" and abs(report["kept_fraction"] - 0.6) < 1e-3
    assert 'alt="learning curves"' in (w / "report" / "report.html").read_text()

    again = run_pipeline(out, sets)  # a rerun (what `slm run` calls): every stage skipped
    assert [s["status"] for s in again] == ["skipped"] * 10
    made = json.loads((w / "compare" / "stage.json").read_text())["fingerprints"]["upstream"]
    record = json.loads((w / "pretrain_clm" / "stage.json").read_text())
    (w / "pretrain_clm" / "stage.json").write_text(json.dumps({**record, "seconds": 0.5}))  # as if it was redone
    redone = {s["stage"]: s["status"] for s in run_pipeline(out, sets)}
    said = " ".join(capsys.readouterr().err.split())
    assert f"eval: {w / 'pretrain_clm'} finished again since {w / 'eval_clm'} was written; running it again" in said
    assert [n for n, s in redone.items() if s == "complete"] == ["eval_clm", "compare", "report"]
    remade = json.loads((w / "compare" / "stage.json").read_text())["fingerprints"]["upstream"]
    assert remade[str(w / "pretrain_clm")] != made[str(w / "pretrain_clm")]
    assert remade[str(w / "pretrain_slm")] == made[str(w / "pretrain_slm")]

    # a stage's own command (`slm compare`) applies the same rule: an input run's record changed
    from slm.pipeline import load_pipeline
    from slm.stages import compare

    record = json.loads((w / "pretrain_clm" / "stage.json").read_text())
    (w / "pretrain_clm" / "stage.json").write_text(json.dumps({**record, "seconds": 0.25}))
    compare.run(next(st.cfg for st in load_pipeline(out, sets)[1] if st.name == "compare"))
    said = " ".join(capsys.readouterr().err.split())
    assert f"compare: {w / 'pretrain_clm'} finished again since {w / 'compare'} was written" in said


def test_tokens_to_reach_and_compare_refusals(tmp_path):
    from slm.analysis.compare import tokens_to_reach
    from slm.config import CompareConfig
    from slm.stages import compare

    curve = [(100, 5.0), (200, 3.0), (300, 1.0)]
    assert tokens_to_reach(curve, 2.0, lower_is_better=True) == 250.0  # interpolated between the points
    assert tokens_to_reach(curve, 6.0, lower_is_better=True) == 100.0  # the first point already reaches it
    assert tokens_to_reach(curve, 0.5, lower_is_better=True) is None  # never reached
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "stage.json").write_text(json.dumps({"kind": "eval", "status": "complete"}))
    cfg = CompareConfig(out_dir=str(tmp_path / "c"), slm=str(tmp_path / "none"), clm=str(tmp_path / "eval"))
    with pytest.raises(SlmError, match=r"slm '.*none': no stage.json; run its pretrain stage first"):
        compare.run(cfg)
    cfg = cfg.model_copy(update={"slm": str(tmp_path / "eval")})
    with pytest.raises(SlmError, match=r"expected a complete pretrain run, found 'eval' with status 'complete'"):
        compare.run(cfg)
