"""Stage kind -> (config class, run function): what `slm run` and `slm jobs` dispatch on."""

from __future__ import annotations

from collections.abc import Callable

from slm.config import STAGE_CONFIGS


def stage_runner(kind: str) -> Callable:
    from slm.stages import compare, demo_data, evaluate, finetune, pretrain, reference, score, shards_report, tokenizer

    return {
        "demo_data": demo_data.run,
        "tokenizer": tokenizer.run,
        "reference": reference.run,
        "finetune": finetune.run,
        "score": score.run,
        "pretrain": pretrain.run,
        "eval": evaluate.run,
        "compare": compare.run,
        "shards_report": shards_report.run,
    }[kind]


def stage_config_class(kind: str):
    return STAGE_CONFIGS[kind]
