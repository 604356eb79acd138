"""Scoring with several references: each one's losses as ref_loss_<i>, ref_loss their max, mean or per-domain min
(slm.shards.scoring); one reference in a list is the single-reference scoring, shard for shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slm.config import ReferenceModel, ScoreConfig, fingerprint_view, load_config
from slm.data.packing import PackedRow, token_documents
from slm.errors import SlmError
from slm.models import load_pretrained
from slm.models.token_loss import token_losses
from slm.shards import ShardSet, load_manifest
from slm.shards.reader import verify_shards
from slm.shards.scoring import combine_losses
from slm.stages import score
from tests.conftest import TINY_MODEL, TINY_TRAIN


@pytest.fixture(scope="module")
def second_reference(tiny_demo, tmp_path_factory):
    """Another tiny reference on the same tokenizer (other seed, fewer steps): losses unlike the first's."""
    from slm.config import ReferenceConfig
    from slm.stages import reference

    root = tmp_path_factory.mktemp("ref_b")
    record = reference.run(
        ReferenceConfig.model_validate(
            dict(
                out_dir=str(root / "ref"),
                tokenizer=str(tiny_demo.tokenizer),
                corpus={"path": str(tiny_demo.hq)},
                model=TINY_MODEL,
                train={**TINY_TRAIN, "max_steps": 8, "checkpoint_every": 8, "eval_every": 8, "seed": 1},
            )
        )
    )
    return record["outputs"]["model"]


def _score(scored, tmp_path, name, **update) -> ShardSet:
    raw = scored["score_cfg"].model_dump() | {"out_dir": str(tmp_path / name), **update}
    score.run(ScoreConfig.model_validate(raw))
    return ShardSet(tmp_path / name)


def _all(shards: ShardSet, *columns) -> dict[str, np.ndarray]:
    return shards.rows(np.arange(len(shards)), columns)


def _shas(directory) -> dict[str, str]:
    return {n: e["sha256"] for n, e in load_manifest(directory).shards.items()}


@pytest.mark.parametrize("combine", ["max", "mean", "min_per_domain"])
def test_one_reference_in_a_list_is_the_single_reference_bit_for_bit(scored, tmp_path, combine):
    shards = _score(scored, tmp_path, "one", reference=[scored["reference"]], combine=combine)
    assert _shas(shards.directory) == _shas(scored["shards"])  # every shard file, byte for byte
    assert shards.metadata == load_manifest(scored["shards"]).metadata
    assert "ref_loss_0" not in shards.columns


def test_mean_and_max_of_two_identical_references_equal_one(scored, tmp_path):
    single = _all(ShardSet(scored["shards"]), "ref_loss", "input_ids")
    twin = tmp_path / "twin"
    shutil.copytree(scored["reference"], twin)
    for combine in ("mean", "max"):
        shards = _score(scored, tmp_path, combine, reference=[scored["reference"], str(twin)], combine=combine)
        got = _all(shards, "ref_loss", "ref_loss_0", "ref_loss_1", "input_ids")
        np.testing.assert_array_equal(got["input_ids"], single["input_ids"])
        for column in ("ref_loss", "ref_loss_0", "ref_loss_1"):  # NaN where the single reference has NaN
            np.testing.assert_array_equal(got[column], single["ref_loss"])
        assert shards.metadata.combine == combine and len(shards.metadata.references) == 2


def test_two_references_keep_each_loss_and_combine_them(scored, second_reference, tmp_path, tiny_demo):
    refs = [scored["reference"], second_reference]
    shards = {c: _score(scored, tmp_path, c, reference=refs, combine=c) for c in ("max", "mean")}
    got = {c: _all(s, "ref_loss", "ref_loss_0", "ref_loss_1", "input_ids", "loss_mask") for c, s in shards.items()}
    a, b = got["max"]["ref_loss_0"], got["max"]["ref_loss_1"]
    np.testing.assert_array_equal(a, _all(ShardSet(scored["shards"]), "ref_loss")["ref_loss"])  # the first's own
    model = load_pretrained(second_reference).eval()  # the second's own, recomputed from the tokens
    with torch.no_grad():
        own = token_losses(model, torch.from_numpy(got["max"]["input_ids"][:4]).long()).numpy()
    np.testing.assert_allclose(b[:4], np.where(got["max"]["loss_mask"][:4] == 1, own, np.nan), rtol=1e-5, atol=1e-6)
    assert np.nanmax(np.abs(a - b)) > 0.1  # two different references
    np.testing.assert_array_equal(got["max"]["ref_loss"], np.maximum(a, b))
    np.testing.assert_allclose(got["mean"]["ref_loss"], (a + b) / 2, rtol=1e-6)
    for c, s in shards.items():
        assert verify_shards(s.directory) == []  # the extra columns are part of the schema verify expects
        meta = s.metadata
        assert [r["model"] for r in meta.references] == refs and meta.reference_model == f"{c}({', '.join(refs)})"
    # the set and its rule are the reference identity: pretraining and readers tell them apart
    identities = {load_manifest(scored["shards"]).metadata.reference_sha256}
    identities |= {s.metadata.reference_sha256 for s in shards.values()}
    assert len(identities) == 3
    import datasets

    ds = datasets.Dataset.from_file(str(shards["max"].directory / shards["max"].names[0]))
    assert {"ref_loss", "ref_loss_0", "ref_loss_1"} <= set(ds.column_names)

    from slm.config import PretrainConfig
    from slm.stages import pretrain

    record = pretrain.run(
        PretrainConfig.model_validate(
            dict(
                out_dir=str(tmp_path / "pt"),
                shards=str(shards["max"].directory),
                model=TINY_MODEL,
                train={**TINY_TRAIN, "max_steps": 2},
            )
        )
    )
    assert record["fingerprints"]["reference"] == shards["max"].metadata.reference_sha256


def _domain_corpus(tiny_demo, tmp_path):
    """The demo's training documents, every third one of domain 'math', the rest 'web' (one without a domain)."""
    path = tmp_path / "domains.jsonl"
    with open(tiny_demo.train) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            doc = json.loads(line)
            doc["domain"] = None if i == 7 else ("math" if i % 3 == 0 else "web")
            dst.write(json.dumps(doc) + "\n")
    return path


def test_min_per_domain_takes_the_min_of_the_references_of_each_tokens_document(
    scored, second_reference, tmp_path, tiny_demo
):
    corpus = {"path": str(_domain_corpus(tiny_demo, tmp_path))}
    refs = [
        {"path": scored["reference"], "domain": "math"},
        {"path": second_reference, "domain": "web"},
        {"path": second_reference},  # general: enters every document, the one without a domain too
    ]
    shards = _score(scored, tmp_path, "dom", reference=refs, combine="min_per_domain", corpus=corpus)
    assert shards.metadata.domain_field == "domain" and verify_shards(shards.directory) == []
    domains = [json.loads(line)["domain"] for line in Path(corpus["path"]).read_text().splitlines()]
    per_shard = shards.metadata.documents_per_shard
    seen = set()
    for s, name in enumerate(shards.names):  # each token's document, from the shard's own doc_starts
        rows = np.arange(shards.offsets[s], shards.offsets[s + 1])
        got = shards.rows(rows, ("ref_loss", "ref_loss_0", "ref_loss_1", "ref_loss_2", "loss_mask"))
        k = int(name.removeprefix("shard-").removesuffix(".arrow"))
        starts = shards.table(name).column("doc_starts").to_pylist()
        packed = [PackedRow([0] * shards.seq_len, list(m), d) for m, d in zip(got["loss_mask"], starts)]
        for r, (_, docs) in enumerate(token_documents(packed, first=k * per_shard)):
            for t in np.nonzero(docs >= 0)[0]:
                domain = domains[docs[t]]
                entering = [got["ref_loss_2"][r, t]] + [
                    got[f"ref_loss_{i}"][r, t] for i, d in enumerate(("math", "web")) if d == domain
                ]
                want = np.float32(np.nan) if np.isnan(entering).any() else np.min(entering)
                np.testing.assert_array_equal(got["ref_loss"][r, t], want)
                seen.add(domain)
    assert seen == {"math", "web", None}
    math_tokens = got["ref_loss_0"] < got["ref_loss_1"]
    assert math_tokens.any() and (~math_tokens & (got["loss_mask"] == 1)).any()  # the rule is not trivial here


def test_min_per_domain_refuses_documents_no_reference_covers(scored, second_reference, tmp_path, tiny_demo):
    corpus = {"path": str(_domain_corpus(tiny_demo, tmp_path))}
    refs = [{"path": scored["reference"], "domain": "math"}, {"path": second_reference, "domain": "web"}]
    with pytest.raises(SlmError, match=r"documents of domain None have no reference: .*\['math', 'web'\]"):
        _score(scored, tmp_path, "lost", reference=refs, combine="min_per_domain", corpus=corpus)
    with pytest.raises(SlmError, match=r"no column 'topic' \(score.domain_field\).*columns: text"):
        _score(scored, tmp_path, "nocol", reference=refs, combine="min_per_domain", corpus=corpus, domain_field="topic")
    assert not (tmp_path / "lost" / "manifest.json").exists()  # refused before any scoring


def test_reference_list_config_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("out_dir: o\ncorpus: {path: c.jsonl}\nreference: [a, {path: b, domain: code}]\n")
    with pytest.raises(SlmError, match=r"s.yaml: .*reference.1.domain is set but combine='max'.*min_per_domain"):
        load_config(path, ScoreConfig)
    cfg = load_config(path, ScoreConfig, ["combine=min_per_domain"])
    assert cfg.references == [ReferenceModel(path="a"), ReferenceModel(path="b", domain="code")]
    with pytest.raises(SlmError, match=r"key 'reference': .*at least one reference"):
        load_config(path, ScoreConfig, ["reference=[]"])
    with pytest.raises(SlmError, match=r"key 'combine'"):
        load_config(path, ScoreConfig, ["combine=median"])


def test_keys_added_later_stay_out_of_the_fingerprint_at_their_default():
    """Finished stages of earlier runs (made before `combine`, `domain_field`, pretrain `corpus`) stay valid."""
    cfg = ScoreConfig(out_dir="o", reference="r", corpus={"path": "c"})
    view = fingerprint_view(cfg)
    assert "combine" not in view and "domain_field" not in view and view["reference"] == "r"
    assert fingerprint_view(cfg.model_copy(update={"combine": "mean"}))["combine"] == "mean"


def test_combine_losses_follows_its_equations():
    rng = np.random.default_rng(0)
    losses = rng.random((3, 4, 6), dtype=np.float32) * 5
    losses[1, 0, 2] = np.nan
    enters = rng.random((3, 4, 6)) < 0.6
    enters[:, 3, 5] = False  # a token no reference enters
    got = {rule: combine_losses(losses, rule, enters) for rule in ("max", "mean", "min_per_domain")}
    for b in range(4):
        for t in range(6):
            column = losses[:, b, t]
            assert np.array_equal(got["max"][b, t], np.max(column), equal_nan=True)
            assert np.isclose(got["mean"][b, t], column.astype(np.float64).mean(), equal_nan=True)
            entering = column[enters[:, b, t]]
            want = np.min(entering) if len(entering) else np.nan
            assert np.array_equal(got["min_per_domain"][b, t], want, equal_nan=True)
    assert all(v.dtype == np.float32 for v in got.values())
    with pytest.raises(ValueError, match="expected one of max, mean, min_per_domain"):
        combine_losses(losses, "median")
