"""`slm finetune`: continue a checkpoint, or graft a long-context backbone onto one, as a causal LM on a corpus
(Infini-attention's pass-key fine-tuning; a short continued training after a graft). Same loop as `slm reference`."""

from __future__ import annotations

from slm.config import FinetuneConfig
from slm.stages.common import locked_stage
from slm.stages.reference import train_causal_lm


@locked_stage("finetune")
def run(cfg: FinetuneConfig, force: bool = False, resume: bool = True, stop_after: int | None = None) -> dict:
    return train_causal_lm("finetune", cfg, force, resume, stop_after)
