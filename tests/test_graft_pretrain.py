"""RHO-1's continual setting: the student starts from the same base as the reference, with a long-context
backbone grafted onto it, and its gates train with their own learning rate."""

from __future__ import annotations

import numpy as np
import torch

from slm.config import ModelConfig, PretrainConfig
from slm.models import build_model
from slm.models.token_loss import token_losses
from slm.shards import ShardSet
from slm.stages import pretrain
from slm.training.loop import parameter_groups
from slm.training.metrics import read_metrics
from tests.conftest import TINY_TRAIN

SEQ = 64  # the shards' seq_len: one infini segment


def grafted_cfg(scored, tiny_demo, tmp_path, **optim):
    # segments of 16: each 64-token row spans four, so the memory is read and the gate gets a gradient
    return PretrainConfig.model_validate(
        dict(
            out_dir=str(tmp_path / "student"),
            shards=scored["shards"],
            validation={"path": str(tiny_demo.validation)},
            model={"backbone": "infini", "init_from": scored["reference"], "options": {"segment_len": 16}},
            train={
                **TINY_TRAIN,
                "max_steps": 8,
                "eval_every": 4,
                "checkpoint_every": 8,
                "optim": {"lr": 3e-3, "warmup_steps": 1, **optim},
            },
        )
    )


@torch.no_grad()
def test_grafted_student_starts_with_zero_excess_loss(scored):
    """Within one segment the graft computes what the reference computed: its token losses equal the shards'
    ref_loss, so every token's excess loss is 0 at step 0."""
    model = build_model(
        ModelConfig(backbone="infini", init_from=scored["reference"], options={"segment_len": SEQ}), 0
    ).eval()
    rows = ShardSet(scored["shards"]).rows(np.arange(4))
    ce = token_losses(model, torch.from_numpy(rows["input_ids"]).long())
    ref = torch.from_numpy(rows["ref_loss"])
    valid = torch.isfinite(ref) & torch.from_numpy(rows["loss_mask"]).bool()
    assert valid.sum() > 100 and (ce - ref)[valid].abs().max() < 1e-4


def test_gates_get_their_own_learning_rate_no_decay_and_are_logged(scored, tiny_demo, tmp_path):
    cfg = grafted_cfg(scored, tiny_demo, tmp_path, gate_lr=0.05)
    model = build_model(cfg.model, 0)
    groups = parameter_groups(model, cfg.train.optim)
    assert len(groups) == 2 and groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 2 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    record = pretrain.run(cfg)
    logs = read_metrics(record["outputs"]["metrics"])
    assert all("gate_mean" in m for m in logs)
    assert abs(logs[-1]["gate_max"]) > 1e-3 or abs(logs[-1]["gate_min"]) > 1e-3  # the shut gates moved
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(record["outputs"]["model"])
    assert student.config.model_type == "slm_infini" and student.config.gate_mode == "add"


def test_slm_finetune_grafts_and_continues_from_the_cli(scored, tiny_demo, tmp_path, capsys):
    import yaml

    from slm.cli import run_cli

    cfg = {
        "out_dir": str(tmp_path / "ft"),
        "tokenizer": str(tiny_demo.tokenizer),
        "corpus": {"path": str(tiny_demo.hq), "packing": "whole"},
        "model": {
            "backbone": "beacon",
            "init_from": scored["reference"],
            "options": {"window_len": 16, "condensing_ratio": 4},
        },
        "train": {**TINY_TRAIN, "max_steps": 3, "checkpoint_every": 3},
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli(["finetune", "--config", str(path)]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "model").config.model_type == "slm_beacon"
    record = __import__("json").loads((tmp_path / "ft" / "stage.json").read_text())
    assert record["kind"] == "finetune" and record["status"] == "complete"
    del cfg["model"]["init_from"]
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli(["finetune", "--config", str(path)]) == 2
    assert "model.init_from: a fine-tuning stage starts from a checkpoint" in capsys.readouterr().err
