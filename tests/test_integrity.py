"""Bad input never reaches training (issue 19): shard integrity at start-up and on load, no run that learns
nothing, cross-stage checks, and one-line errors (exit 2) for bad bytes, a full disk and corrupt ids.

Every damaged shard here is a real one: a copy of the session's scored shards, then truncated, deleted, byte-flipped
inside `ref_loss`, or rewritten whole (with a valid manifest) through `ShardWriter` with bad content.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from slm import cli
from slm.config import EvalConfig, PretrainConfig
from slm.errors import SlmError
from slm.shards import ShardSet, load_manifest
from slm.shards.format import ShardMetadata, fixed_list_to_numpy
from slm.shards.layout import MANIFEST
from slm.shards.manifest import merge_manifest
from slm.shards.reader import open_shard, verify_shards
from slm.shards.writer import ShardWriter
from slm.stages import evaluate, pretrain, score
from slm.utils.io import sha256_file
from tests.conftest import TINY_MODEL, TINY_TRAIN


def copy_shards(scored, tmp_path, name="shards") -> tuple[Path, list[str]]:
    d = tmp_path / name
    shutil.copytree(scored["shards"], d)
    (d / "stage.json").unlink()  # these copies are inputs, not a scoring run's output
    return d, sorted(load_manifest(d).shards)


def ref_loss_offset(path: Path, row: int = 0, pos: int = 10) -> int:
    """The byte offset in the file of ref_loss[row, pos] (a scored, finite value)."""
    table = open_shard(path)
    value = fixed_list_to_numpy(table.column("ref_loss"), table.schema.field("ref_loss").type.list_size)[
        row, pos : pos + 4
    ]
    assert np.isfinite(value).all()
    data = path.read_bytes()
    at = data.find(value.astype(np.float32).tobytes())
    assert at > 0 and data.find(value.astype(np.float32).tobytes(), at + 1) == -1
    return at


def flip_ref_loss(path: Path) -> None:
    """Same size, one float of ref_loss changed: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[ref_loss_offset(path) + 3] ^= 0x40  # the top bits of the exponent: the loss becomes ~1e-38 or ~1e38
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE = {
    "truncated": (truncate, "bytes, the manifest says"),
    "ref_loss_flipped": (flip_ref_loss, "sha256"),
    "deleted": (Path.unlink, "shard listed in the manifest is missing"),
}


def rewrite(d: Path, change) -> list[str]:
    """Every shard of `d` rewritten whole through ShardWriter with `change(columns)` applied, and a manifest to match:
    bad content in shards that are otherwise whole."""
    manifest = load_manifest(d)
    meta = manifest.metadata
    for name in sorted(manifest.shards):
        table = open_shard(d / name)
        cols = {
            c: fixed_list_to_numpy(table.column(c), meta.seq_len).copy()
            for c in ("input_ids", "ref_loss", "loss_mask", "noise")
        }
        cols.update(
            sequence_id=table.column("sequence_id").to_numpy(), doc_starts=table.column("doc_starts").to_pylist()
        )
        change(cols)
        ShardWriter(d, meta, with_noise=True).write(
            int(name[6:11]), [cols], extra={"documents": manifest.shards[name]["documents"]}
        )
    merge_manifest(d, meta, manifest.num_shards)
    assert verify_shards(d) == []
    return sorted(manifest.shards)


def pretrain_cfg(shards, tiny_demo, tmp_path, **over) -> PretrainConfig:
    base = {
        "out_dir": str(tmp_path / "pt"),
        "shards": str(shards),
        "model": TINY_MODEL,
        "train": {**TINY_TRAIN, "max_steps": 2},
    }
    return PretrainConfig.model_validate({**base, **over})


# ----------------------------------------------------------------------------- 2. integrity before work


@pytest.mark.parametrize("case", list(DAMAGE))
def test_shardset_refuses_a_damaged_shard_at_start_up(scored, tmp_path, case):
    d, names = copy_shards(scored, tmp_path)
    damage, why = DAMAGE[case]
    damage(d / names[1])
    with pytest.raises(SlmError, match=f"{names[1]}: .*{why}.*slm shards verify"):
        ShardSet(d)


def test_verify_size_leaves_the_sha256_for_the_first_read(scored, tmp_path):
    d, names = copy_shards(scored, tmp_path)
    flip_ref_loss(d / names[1])
    shards = ShardSet(d, verify="size")  # sizes agree: start-up passes
    shards.rows(np.arange(3))  # rows of shard 0 only
    with pytest.raises(SlmError, match=f"{names[1]}: sha256 .* the manifest says .* \\(altered\\)"):
        shards.rows(np.array([shards.offsets[1]]))
    later = ShardSet(d, verify="size")
    truncate(d / names[2])  # changed after start-up: the first read of it checks its size again
    with pytest.raises(SlmError, match=f"{names[2]}: .*bytes, the manifest says"):
        later.table(names[2])


def test_reader_checks_nan_count_against_the_manifest(scored, tmp_path):
    """A shard re-hashed into the manifest (so size and sha256 agree) whose ref_loss gained NaNs."""
    d, names = copy_shards(scored, tmp_path)
    path = d / names[0]
    data = bytearray(path.read_bytes())
    at = ref_loss_offset(path)
    data[at : at + 8] = np.full(2, np.nan, np.float32).tobytes()
    path.write_bytes(bytes(data))
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["shards"][names[0]]["sha256"] = sha256_file(path)
    (d / MANIFEST).write_text(json.dumps(manifest))
    shards = ShardSet(d)
    with pytest.raises(SlmError, match=rf"{names[0]}: (\d+) NaN token losses, manifest says \d+"):
        shards.rows(np.arange(2))


def test_reader_refuses_token_ids_outside_the_vocabulary(scored, tmp_path):
    d, _ = copy_shards(scored, tmp_path)
    vocab = load_manifest(d).metadata.vocab_size
    names = rewrite(d, lambda c: c["input_ids"].__setitem__((2, 7), vocab + 5))
    shards = ShardSet(d)  # the files are whole: start-up passes
    with pytest.raises(
        SlmError,
        match=rf"{names[0]}: token id {vocab + 5} at row 2 position 7 is outside the vocabulary \[0, {vocab}\)",
    ):
        shards.rows(np.arange(4))


def test_pretrain_and_eval_refuse_a_bad_shard_before_any_work(scored, tiny_demo, tmp_path):
    d, names = copy_shards(scored, tmp_path)
    truncate(d / names[2])
    cfg = pretrain_cfg(d, tiny_demo, tmp_path)
    with pytest.raises(SlmError, match=f"{names[2]}: .*bytes, the manifest says"):
        pretrain.run(cfg)
    assert not (Path(cfg.out_dir) / "metrics.jsonl").exists() and not (Path(cfg.out_dir) / "checkpoints").exists()
    ecfg = EvalConfig(out_dir=str(tmp_path / "ev"), model=scored["reference"], shards=str(d))
    with pytest.raises(SlmError, match=f"{names[2]}: .*bytes, the manifest says"):
        evaluate.run(ecfg)
    assert not (tmp_path / "ev" / "results.json").exists()


@pytest.mark.parametrize(
    "command",
    [["stats"], ["plot", "--out", "{tmp}/h.png"], ["inspect", "--row", "0"]],
    ids=["stats", "plot", "inspect"],
)
def test_shards_commands_refuse_a_bad_shard_with_exit_2(scored, tmp_path, capsys, command):
    d, names = copy_shards(scored, tmp_path)
    flip_ref_loss(d / names[0])
    args = ["shards", command[0], str(d), *(a.format(tmp=tmp_path) for a in command[1:])]
    assert cli.run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and f"{names[0]}: sha256" in err[0]


def test_corrupt_token_ids_exit_2_in_one_line_from_the_process(scored, tmp_path):
    import os
    import sys

    d, _ = copy_shards(scored, tmp_path)
    names = rewrite(d, lambda c: c["input_ids"].__setitem__((0, 3), -4))
    out = subprocess.run(
        [sys.executable, "-m", "slm.cli", "shards", "stats", str(d)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
    )
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert f"{names[0]}: token id -4 at row 0 position 3 is outside the vocabulary" in err[0]


def test_the_manifest_lists_each_whole_shard_as_it_lands(scored, tmp_path, monkeypatch):
    out = tmp_path / "live"
    seen = []
    real = score.score_rows

    def watching(rows, reference, batch_size, chunk, first_id, *args):
        m = load_manifest(out)  # the manifest as this shard begins
        seen.append((first_id >> 32, sorted(m.shards), m.complete))
        return real(rows, reference, batch_size, chunk, first_id, *args)

    monkeypatch.setattr(score, "score_rows", watching)
    score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
    names = sorted(load_manifest(out).shards)
    assert [s[0] for s in seen] == list(range(len(names)))
    assert all(listed == names[:k] and not complete for k, listed, complete in seen)


# ----------------------------------------------------------------------------- 3. no run that learns nothing


def _all_nan(c):
    c["ref_loss"][:] = np.nan


def _all_masked(c):
    c["loss_mask"][:] = 0


@pytest.mark.parametrize("change", [_all_nan, _all_masked], ids=["all_ref_loss_nan", "every_position_masked"])
def test_pretrain_that_can_select_no_token_fails_at_start_up(scored, tiny_demo, tmp_path, change):
    d, _ = copy_shards(scored, tmp_path)
    rewrite(d, change)
    cfg = pretrain_cfg(d, tiny_demo, tmp_path)
    with pytest.raises(
        SlmError,
        match=r"no token can be trained on: of \d+ tokens in \d+ rows none has loss_mask 1 and a finite ref_loss",
    ):
        pretrain.run(cfg)
    assert not (Path(cfg.out_dir) / "stage.json").exists() and not (Path(cfg.out_dir) / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- 4. cross-stage checks


def test_shards_record_the_reference_vocab_and_embedding(scored):
    from slm.models import load_pretrained

    meta = load_manifest(scored["shards"]).metadata
    emb = load_pretrained(scored["reference"]).get_input_embeddings().weight
    assert meta.reference_vocab_size == emb.shape[0] and meta.reference_embedding_shape == list(emb.shape)
    older = {
        k: v
        for k, v in meta.to_json().items()
        if not k.startswith("reference_") or k in ("reference_model", "reference_sha256")
    }
    assert ShardMetadata.from_json(older, "old").reference_embedding_shape is None  # shards of earlier slm still read


def _reference_without_tokenizer(scored, tmp_path, vocab: int | None = None) -> str:
    from slm.models import load_pretrained

    model = load_pretrained(scored["reference"])
    if vocab:
        model.resize_token_embeddings(vocab)
    out = tmp_path / f"ref_{vocab}"
    model.save_pretrained(out)
    assert not list(out.glob("tokenizer*"))
    return str(out)


def test_scoring_refuses_a_tokenizer_that_does_not_fit_the_embedding(scored, tiny_demo, tmp_path):
    cfg = scored["score_cfg"]
    ref = _reference_without_tokenizer(scored, tmp_path, vocab=1024)
    with pytest.raises(
        SlmError,
        match=r"tokenizer .* has \d+ tokens, the embedding of reference model .* has 1024 rows: "
        r"\d+ rows no token reaches",
    ):
        score.run(
            cfg.model_copy(
                update={"out_dir": str(tmp_path / "a"), "reference": ref, "tokenizer": str(tiny_demo.tokenizer)}
            )
        )
    assert not (tmp_path / "a" / MANIFEST).exists()
    # the same reference without tokenizer files but its own vocab size: scored, with the tokenizer's sha256 recorded
    from slm.data.tokenizer import tokenizer_fingerprint

    same = _reference_without_tokenizer(scored, tmp_path)
    one_shard = cfg.corpus.model_copy(update={"max_documents": 20})
    score.run(
        cfg.model_copy(
            update={
                "out_dir": str(tmp_path / "b"),
                "reference": same,
                "tokenizer": str(tiny_demo.tokenizer),
                "corpus": one_shard,
            }
        )
    )
    assert load_manifest(tmp_path / "b").metadata.tokenizer_sha256 == tokenizer_fingerprint(tiny_demo.tokenizer)


def test_seq_len_above_max_position_embeddings(scored, tiny_demo, tmp_path):
    cfg = scored["score_cfg"]
    with pytest.raises(
        SlmError,
        match=r"seq_len=1024 exceeds max_position_embeddings=512 of reference model .*: "
        r"positions past 512 were never trained",
    ):
        score.run(cfg.model_copy(update={"out_dir": str(tmp_path / "s"), "seq_len": 1024}))
    pcfg = pretrain_cfg(scored["shards"], tiny_demo, tmp_path, model={**TINY_MODEL, "max_position_embeddings": 32})
    with pytest.raises(SlmError, match=r"train.seq_len=64 exceeds max_position_embeddings=32 of the llama model"):
        pretrain.run(pcfg)
    assert not (Path(pcfg.out_dir) / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "backbone, options, rope, expect",
    [
        ("llama", {}, None, "error"),
        (
            "llama",
            {},
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
            "RoPE scaling yarn",
        ),
        ("infini", {"segment_len": 16}, None, "slm_infini carries state"),
        ("beacon", {"window_len": 16, "condensing_ratio": 4}, None, "slm_beacon carries state"),
    ],
)
def test_seq_len_past_the_limit_is_a_warning_where_the_model_is_built_for_it(backbone, options, rope, expect):
    from slm.config import ModelConfig
    from slm.models.checks import check_seq_len
    from slm.models.registry import build_config

    config = build_config(
        ModelConfig(
            **{**TINY_MODEL, "max_position_embeddings": 32}, backbone=backbone, options=options, rope_scaling=rope
        ),
        300,
    )
    assert check_seq_len(config, 32, "seq_len", "m") is None
    if expect == "error":
        with pytest.raises(SlmError, match="seq_len=64 exceeds max_position_embeddings=32 of m"):
            check_seq_len(config, 64, "seq_len", "m")
    else:
        assert expect in check_seq_len(config, 64, "seq_len", "m")


def test_other_runs_output_is_refused_naming_the_keys_and_values(scored, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(scored["shards"], out)
    cfg = scored["score_cfg"].model_copy(update={"out_dir": str(out), "batch_size": 4, "seq_len": 32})
    with pytest.raises(
        SlmError,
        match=r"another config; use --force .*\(differs: batch_size was 8, now 4; "
        r"out_dir was '.*scored.*', now .*; seq_len was 64, now 32\)",
    ):
        score.run(cfg)


# ----------------------------------------------------------------------------- 5. one-line errors


def _bad_utf8_corpus(tiny_demo, tmp_path) -> Path:
    lines = Path(tiny_demo.train).read_bytes().splitlines(keepends=True)[:30]
    lines[3] = lines[3].replace(b'"text": "', b'"text": "caf\xe9 ', 1)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def test_non_utf8_corpus_names_file_and_offset_or_is_replaced(scored, tiny_demo, tmp_path, capsys):
    from slm.config import CorpusConfig
    from slm.data.corpus import load_corpus

    path = _bad_utf8_corpus(tiny_demo, tmp_path)
    offset = path.read_bytes().index(b"\xe9")
    yaml_cfg = tmp_path / "score.yaml"
    yaml_cfg.write_text(
        json.dumps(
            {
                **scored["score_cfg"].model_dump(mode="json"),
                "out_dir": str(tmp_path / "s"),
                "corpus": {"path": str(path)},
            }
        )
    )
    assert cli.run_cli(["score", "--config", str(yaml_cfg)]) == 2
    err = capsys.readouterr().err
    expected = (
        f"error: {path}: byte {offset} (line 4) is not UTF-8 (1 file(s) have such bytes); fix the file, "
        f"or set corpus.errors=replace to read them as U+FFFD"
    )
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error: ")] == [expected]
    ds = load_corpus(CorpusConfig(path=str(path), errors="replace"))
    assert len(ds) == 30 and ds[3]["text"].startswith("caf\ufffd ")


def _assert_nothing_partial(out: Path, whole: int, unlisted_ok: bool = False) -> None:
    """The manifest lists `whole` shards, each whole; no temp file is left. (`unlisted_ok`: the disk may fill while the
    manifest itself is rewritten, after a shard landed whole: that shard is then on disk but not yet listed.)"""
    manifest = load_manifest(out)
    assert len(manifest.shards) == whole and not manifest.complete
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".done/.*.tmp"))
    problems = [p for p in verify_shards(out) if not (unlisted_ok and "not listed in the manifest" in p)]
    assert problems == [f"{out}: {whole} of {manifest.num_shards} shards whole"]


def test_full_disk_while_scoring_simulated(scored, tmp_path, monkeypatch):
    """OSError(ENOSPC) raised from inside the shard's atomic write (the third shard), as a full disk raises it."""
    out = tmp_path / "full"
    real, calls = ShardWriter.record_batch, []

    def full_on_third_shard(self, batch):
        calls.append(int(batch["sequence_id"][0]) >> 32)
        if calls[-1] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, batch)

    monkeypatch.setattr(ShardWriter, "record_batch", full_on_third_shard)
    with pytest.raises(
        SlmError,
        match=rf"{out}/shard-00002.arrow: no space left on the device \(\d+ bytes free\); the 2 shard\(s\) "
        r"left to score need about \d+ bytes \(\d+ each\)",
    ):
        score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
    _assert_nothing_partial(out, whole=2)


def test_full_disk_while_scoring_on_a_real_tmpfs(scored, tmp_path):
    """A real full disk: a tmpfs that holds the first shard or two but not all four (needs root to mount)."""
    sizes = [e["bytes"] for e in load_manifest(scored["shards"]).shards.values()]
    mount = tmp_path / "small"
    mount.mkdir()
    size_k = (sum(sizes[:2]) + sizes[2] // 2) // 1024 + 16  # + pages for the manifest, sidecars and lock
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mount)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); test_full_disk_while_scoring_simulated covers the error")
    try:
        out = mount / "shards"
        with pytest.raises(SlmError, match=rf"{out}/\S+: no space left on the device \(\d+ bytes free\)"):
            score.run(scored["score_cfg"].model_copy(update={"out_dir": str(out)}))
        whole = len(load_manifest(out).shards)
        assert 1 <= whole < len(sizes)
        _assert_nothing_partial(out, whole, unlisted_ok=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
