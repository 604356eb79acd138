"""`slm eval` measures the selection a model's own pretrain run trained with (issue 15, item 2): the run's
selection mode, read from its stage.json, at the eval's selection_ratio; batch mode for any other model."""

from __future__ import annotations

import pytest

from slm.config import EvalConfig, PretrainConfig
from slm.evaluation.heldout import selection_quality
from slm.models import load_pretrained
from slm.shards import ShardSet
from slm.stages import evaluate, pretrain
from tests.conftest import TINY_MODEL, TINY_TRAIN


@pytest.fixture(scope="module")
def self_loss_run(scored, tiny_demo, tmp_path_factory):
    """A pretrain run (two steps) that trained with the reference-free self_loss selection."""
    cfg = PretrainConfig.model_validate(
        dict(
            out_dir=str(tmp_path_factory.mktemp("self_loss") / "run"),
            shards=scored["shards"],
            model={**TINY_MODEL, "backbone": "llama"},
            train={**TINY_TRAIN, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2},
            selection={"mode": "self_loss", "ratio": 0.5},
        )
    )
    return pretrain.run(cfg)["outputs"]["model"]


def eval_cfg(tmp_path, model: str, shards: str, name: str) -> EvalConfig:
    return EvalConfig(out_dir=str(tmp_path / name), model=model, shards=shards, max_batches=2, batch_size=4)


def test_eval_measures_the_runs_own_selection_mode(self_loss_run, scored, tmp_path):
    assert evaluate.trained_selection_mode(self_loss_run) == "self_loss"
    measured = evaluate.run(eval_cfg(tmp_path, self_loss_run, scored["shards"], "eval"))["metrics"]["selection"]
    assert measured["mode"] == "self_loss" and measured["ratio"] == 0.6  # the run's mode, the eval's ratio

    # exactly what selection_quality gives in that mode, and not what batch mode (by excess loss) gives
    model = load_pretrained(self_loss_run).eval()
    shards = ShardSet(scored["shards"])
    assert measured == selection_quality(model, shards, 0.6, 4, 2, progress=False, mode="self_loss")
    batch = selection_quality(model, shards, 0.6, 4, 2, progress=False, mode="batch")
    assert (batch["noise_dropped"], batch["kept_clean"]) != (measured["noise_dropped"], measured["kept_clean"])


def test_a_model_without_a_pretrain_run_is_measured_in_batch_mode(scored, tmp_path):
    assert evaluate.trained_selection_mode(scored["reference"]) == "batch"  # a reference run's model
    measured = evaluate.run(eval_cfg(tmp_path, scored["reference"], scored["shards"], "eval"))["metrics"]["selection"]
    assert measured["mode"] == "batch"
