"""Scoring into token-score shards: alignment, format, readers, resume, repair, splits, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from slm.config import ScoreConfig
from slm.errors import SlmError
from slm.models import load_pretrained
from slm.models.token_loss import token_losses
from slm.shards import ShardSet, load_manifest
from slm.shards.reader import verify_shards
from slm.stages import score


def copy_scored(scored, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(scored["shards"], dst)
    return dst


def test_ref_loss_is_aligned_as_documented(scored):
    """ref_loss[t] = -log p_ref(x_t | x_<t), NaN at t = 0: recomputed here from full logits."""
    shards = ShardSet(scored["shards"])
    rows = shards.rows(np.arange(3), ("input_ids", "ref_loss", "loss_mask"))
    model = load_pretrained(scored["reference"]).eval()
    ids = torch.from_numpy(rows["input_ids"]).long()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    expected = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert np.isnan(rows["ref_loss"][:, 0]).all()
    np.testing.assert_allclose(rows["ref_loss"][:, 1:], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_chunked_log_probs_equal_full_logits(scored):
    model = load_pretrained(scored["reference"]).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        full = token_losses(model, ids, chunk_tokens=10_000)
        tiny_chunks = token_losses(model, ids, chunk_tokens=7)
    torch.testing.assert_close(full, tiny_chunks, equal_nan=True)


def test_shards_open_with_datasets_and_pyarrow(scored):
    import datasets

    manifest = load_manifest(scored["shards"])
    name = sorted(manifest.shards)[0]
    path = f"{scored['shards']}/{name}"
    ds = datasets.Dataset.from_file(path)
    assert len(ds) == manifest.shards[name]["rows"]
    assert len(ds[0]["input_ids"]) == manifest.metadata.seq_len
    loaded = datasets.load_dataset("arrow", data_files=path, split="train")
    assert loaded[0]["input_ids"] == ds[0]["input_ids"]
    torch_row = loaded.with_format("torch")[0]
    assert torch_row["ref_loss"].dtype == torch.float32 and torch.isnan(torch_row["ref_loss"][0])
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    meta = json.loads(table.schema.metadata[b"slm"])
    assert (
        meta["seq_len"] == manifest.metadata.seq_len and meta["tokenizer_sha256"] == manifest.metadata.tokenizer_sha256
    )
    assert table.column("input_ids").type == pa.list_(pa.int32(), meta["seq_len"])


def test_manifest_lists_counts_and_checksums(scored):
    manifest = load_manifest(scored["shards"])
    assert manifest.complete
    shards = ShardSet(scored["shards"])
    rows = shards.rows(np.arange(len(shards)), ("loss_mask", "sequence_id", "noise"))
    assert manifest.totals()["tokens"] == int(rows["loss_mask"].sum())
    assert len(set(rows["sequence_id"].tolist())) == len(shards)
    assert 0.2 < rows["noise"][rows["loss_mask"] == 1].mean() < 0.6
    assert verify_shards(scored["shards"]) == []


def test_rerun_after_success_skips(scored):
    before = {p.name: p.stat().st_mtime_ns for p in (scored["root"] / "shards").glob("*.arrow")}
    record = score.run(scored["score_cfg"])
    assert record["status"] == "complete"
    assert before == {p.name: p.stat().st_mtime_ns for p in (scored["root"] / "shards").glob("*.arrow")}


def test_verify_names_truncated_and_altered_shards_and_rerun_repairs(scored, tmp_path):
    out = copy_scored(scored, tmp_path)
    names = sorted(load_manifest(out).shards)
    original = {n: (out / n).read_bytes() for n in names}
    truncated, altered = out / names[0], out / names[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(altered.read_bytes())
    data[-50] ^= 0xFF
    altered.write_bytes(bytes(data))
    problems = verify_shards(out)
    assert any(names[0] in p and "truncated" in p for p in problems)
    assert any(names[1] in p and "sha256" in p for p in problems)
    (out / "stage.json").unlink()  # a crashed run: no success record
    score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
    assert verify_shards(out) == []
    assert {n: (out / n).read_bytes() for n in names} == original  # scoring is deterministic


def test_partial_shard_is_redone_and_whole_ones_skipped(scored, tmp_path):
    out = copy_scored(scored, tmp_path)
    (out / "stage.json").unlink()
    names = sorted(load_manifest(out).shards)
    (out / ".done" / f"{names[-1]}.json").unlink()  # crashed before recording the last shard
    (out / names[-1]).write_bytes(b"partial")
    keep = {n: (out / n).stat().st_mtime_ns for n in names[:-1]}
    record = score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
    assert record["metrics"]["scored_now"] == 1
    assert keep == {n: (out / n).stat().st_mtime_ns for n in names[:-1]}
    assert verify_shards(out) == []


def test_parts_merge_into_the_same_shards(scored, tmp_path):
    base = scored["score_cfg"].model_copy(update={"out_dir": str(tmp_path / "parts")})
    first = score.run(base.model_copy(update={"part": 0, "parts": 2}))
    assert first["status"] == "partial"
    second = score.run(base.model_copy(update={"part": 1, "parts": 2}))
    assert second["status"] == "complete"
    a, b = load_manifest(tmp_path / "parts"), load_manifest(scored["shards"])
    assert {n: e["sha256"] for n, e in a.shards.items()} == {n: e["sha256"] for n, e in b.shards.items()}


def test_bad_inputs_get_clear_errors(scored, tiny_demo, tmp_path):
    cfg = scored["score_cfg"]
    with pytest.raises(SlmError, match=r"reference model .*missing.*: checkpoint directory not found"):
        score.run(cfg.model_copy(update={"out_dir": str(tmp_path / "a"), "reference": str(tmp_path / "missing")}))
    from slm.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["some other text entirely"] * 50, 300, tmp_path / "other_tok")
    with pytest.raises(SlmError, match=r"tokenizer .*other_tok.* is not the tokenizer of reference model"):
        score.run(cfg.model_copy(update={"out_dir": str(tmp_path / "b"), "tokenizer": str(tmp_path / "other_tok")}))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SlmError, match="empty"):
        score.run(
            cfg.model_copy(
                update={
                    "out_dir": str(tmp_path / "c"),
                    "corpus": cfg.corpus.model_copy(update={"path": str(tmp_path / "empty.jsonl")}),
                }
            )
        )
    copied = copy_scored(scored, tmp_path)
    with pytest.raises(SlmError, match=r"holds a finished score run with another config; use --force"):
        score.run(cfg.model_copy(update={"out_dir": str(copied), "seq_len": 32}))
    (copied / "stage.json").unlink()  # an unfinished run with other shards in the directory
    with pytest.raises(SlmError, match=r"holds shards with another seq_len \(64 vs 32 now\)"):
        score.run(cfg.model_copy(update={"out_dir": str(copied), "seq_len": 32}))


def test_nan_losses_are_counted_masked_and_reported(scored, tmp_path, monkeypatch):
    import slm.shards.scoring as scoring

    real = scoring.token_losses

    def with_nans(model, ids, chunk):
        loss = real(model, ids, chunk)
        loss[:, 5] = float("nan")
        return loss

    monkeypatch.setattr(scoring, "token_losses", with_nans)
    out = tmp_path / "nan"
    record = score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
    shards = ShardSet(out)
    assert record["metrics"]["nan_tokens"] == int(
        shards.rows(np.arange(len(shards)), ("loss_mask",))["loss_mask"][:, 5].sum()
    )
    from slm.config import SelectionConfig
    from slm.selection import selective_loss

    rows = shards.rows(np.arange(4), ("ref_loss", "loss_mask"))
    ref = torch.from_numpy(rows["ref_loss"])
    sel = selective_loss(torch.rand_like(ref), ref, SelectionConfig(ratio=0.5), torch.from_numpy(rows["loss_mask"]))
    assert not sel.valid[:, 5].any()


def test_reader_refuses_incomplete_and_missing(tmp_path, scored):
    with pytest.raises(SlmError, match="no manifest"):
        ShardSet(tmp_path)
    out = copy_scored(scored, tmp_path)
    name = sorted(load_manifest(out).shards)[0]
    (out / name).unlink()
    with pytest.raises(SlmError, match=f"{name}: shard listed in the manifest is missing"):
        ShardSet(out).rows(np.array([0]))


def test_score_config_part_range():
    with pytest.raises(ValueError, match="part=2 must be < parts=2"):
        ScoreConfig.model_validate(dict(out_dir="o", reference="r", corpus={"path": "c"}, part=2, parts=2))
