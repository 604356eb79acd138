"""The DeepSpeed config, built from the typed TrainConfig (never written by hand)."""

from __future__ import annotations

import torch

from slm.config import TrainConfig


def resolve_precision(precision: str) -> str:
    """auto: bf16 on GPUs, fp32 on CPU (bf16 matrix work is far slower on these CPUs)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    opt = cfg.optim
    precision = resolve_precision(cfg.precision)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # torch.optim.AdamW: runs on CPU and GPU alike (FusedAdam needs CUDA)
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.max_steps,
                "warmup_num_steps": min(opt.warmup_steps, max(cfg.max_steps - 1, 0)),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": opt.min_lr_ratio,
            },
        },
        # bf16 is torch.autocast through DeepSpeed (its torch_autocast section; the loop enters it with
        # `slm.training.speed.autocast`, as engine.forward would): fp32 weights, gradients and AdamW states, matrix
        # products in bf16, norms, softmax and the loss in fp32. DeepSpeed's own "bf16" mode (the weights cast to
        # bf16) stays off: with ZeRO 0 it runs FP16_UnfusedOptimizer, which takes a zero-gradient AdamW step at start
        # (Adam's step count one ahead of the steps taken, one weight decay at the peak lr) and checks for overflow
        # with a host sync every step.
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "seed": cfg.seed,
    }
