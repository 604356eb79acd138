"""`llama`: the plain transformers Llama baseline, with RoPE scaling through transformers' own
rope parameters (`linear`, `dynamic`, `yarn`, `longrope`).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from slm.models.registry import common_config_kwargs, register_backbone


def llama_config_kwargs(model_cfg, vocab_size: int) -> dict[str, Any]:
    kwargs = common_config_kwargs(model_cfg, vocab_size)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    if model_cfg.rope_scaling:
        rope_parameters.update(model_cfg.rope_scaling)
    kwargs["rope_parameters"] = rope_parameters
    kwargs["attention_bias"] = False
    return kwargs


register_backbone("llama", LlamaConfig, LlamaForCausalLM, llama_config_kwargs)
