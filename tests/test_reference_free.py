"""Reference-free selection (ESLM): `slm pretrain` with selection.mode self_loss / self_entropy, on shards (their
reference losses unread) and on a plain corpus with no shards at all."""

from __future__ import annotations

import pytest

from slm.config import PretrainConfig, load_config
from slm.errors import SlmError
from slm.stages import pretrain
from slm.training.metrics import read_metrics
from slm.utils.io import read_json
from tests.conftest import TINY_MODEL, TINY_TRAIN


def _cfg(tmp_path, name, selection, **source):
    return PretrainConfig.model_validate(
        dict(out_dir=str(tmp_path / name), model=TINY_MODEL, train={**TINY_TRAIN, "max_steps": 4}, selection=selection)
        | source
    )


def test_self_entropy_pretrains_on_a_corpus_without_shards(tiny_demo, tmp_path):
    cfg = _cfg(
        tmp_path,
        "eslm",
        {"mode": "self_entropy", "ratio": 0.5},
        corpus={"path": str(tiny_demo.train)},
        tokenizer=str(tiny_demo.tokenizer),
        validation={"path": str(tiny_demo.validation)},
    )
    record = pretrain.run(cfg)
    logs = read_metrics(record["outputs"]["metrics"])
    assert len(logs) == 4 and record["fingerprints"]["reference"] == ""
    for m in logs:  # the top half of each micro-batch by the student's entropy
        assert abs(m["kept_fraction"] - 0.5) <= 1.0 / m["valid_tokens"] + 1e-9
        assert m["self_entropy_kept"] > m["self_entropy_dropped"]
    assert read_json(tmp_path / "eslm" / "stage.json")["metrics"]["final_heldout_loss"] > 0


def test_self_loss_on_shards_reads_no_reference_loss(scored, tmp_path, monkeypatch):
    read = []
    real = pretrain.ShardSet.rows

    def watching(self, indices, columns=("input_ids", "ref_loss", "loss_mask")):
        read.append(tuple(columns))
        return real(self, indices, columns)

    monkeypatch.setattr(pretrain.ShardSet, "rows", watching)
    record = pretrain.run(_cfg(tmp_path, "self", {"mode": "self_loss", "ratio": 0.6}, shards=scored["shards"]))
    logs = read_metrics(record["outputs"]["metrics"])
    assert read and all("ref_loss" not in c for c in read)
    for m in logs:
        assert abs(m["kept_fraction"] - 0.6) <= 1.0 / m["valid_tokens"] + 1e-9
        assert m["self_loss_kept"] > m["self_loss_dropped"] and m["loss_kept"] == pytest.approx(m["self_loss_kept"])


def test_a_corpus_without_shards_takes_only_modes_that_need_no_reference(tiny_demo, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'x'}\ncorpus: {{path: {tiny_demo.train}}}\ntokenizer: {tiny_demo.tokenizer}\n"
    )
    with pytest.raises(SlmError, match=r"p.yaml: .*selection.mode=batch needs the reference losses .*self_loss"):
        load_config(path, PretrainConfig)
    with pytest.raises(SlmError, match=r"exactly one of shards .* and corpus"):
        load_config(path, PretrainConfig, ["shards=somewhere", "selection.mode=self_loss"])
    assert load_config(path, PretrainConfig, ["selection.enabled=false"]).corpus is not None


def test_selection_quality_measures_the_runs_own_rule(scored):
    """`slm.evaluation.heldout.selection_quality` with a reference-free mode keeps what training keeps: the top
    ratio of each batch by the model's own loss, recounted here from the shards' noise tags."""
    import numpy as np
    import torch

    from slm.evaluation.heldout import selection_quality
    from slm.models import load_pretrained
    from slm.models.token_loss import token_losses
    from slm.selection import top_k_mask
    from slm.shards import ShardSet

    shards, model = ShardSet(scored["shards"]), load_pretrained(scored["reference"]).float().eval()
    got = selection_quality(model, shards, 0.5, 8, 2, progress=False, mode="self_loss")
    kept_clean = kept_all = 0
    for start in (0, 8):
        rows = shards.rows(np.arange(start, start + 8), ("input_ids", "loss_mask", "noise"))
        with torch.no_grad():
            ce = token_losses(model, torch.from_numpy(rows["input_ids"]).long())
        valid = torch.isfinite(ce) & torch.from_numpy(rows["loss_mask"]).bool()
        kept = top_k_mask(ce.reshape(-1), valid.reshape(-1), 0.5).view_as(ce)
        kept_all += int(kept.sum())
        kept_clean += int((kept & ~torch.from_numpy(rows["noise"]).bool()).sum())
    assert got["mode"] == "self_loss" and got["kept_clean"] == pytest.approx(kept_clean / kept_all)
    assert got["kept_clean"] != selection_quality(model, shards, 0.5, 8, 2, progress=False)["kept_clean"]
