"""Gates of the long-range paths (Infini-attention's memory gate, FAM's gated read).

A module with a gate defines `memory_gate()`: per head, the weight of its long-range read (or None when it
has no gate). Training gives the gate parameters their own learning rate and no weight decay, and logs their
values: a public reproduction of Infini-attention failed because its gates stayed near 0.5 (moving about
+-0.03 over training) and retrieval stayed at 0%.
"""

from __future__ import annotations

import torch
from torch import nn


def gated_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "memory_gate") and m.memory_gate() is not None]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.gate_parameter for m in gated_modules(model)]


@torch.no_grad()
def gate_stats(model: nn.Module) -> dict[str, float]:
    """Mean, min and max over every head of every gated layer; {} for a model without gates."""
    modules = gated_modules(model)
    if not modules:
        return {}
    values = torch.cat([m.memory_gate().detach().float().flatten() for m in modules])
    return {"gate_mean": float(values.mean()), "gate_min": float(values.min()), "gate_max": float(values.max())}
