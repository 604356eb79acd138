"""Models from a Hugging Face checkpoint (`model.init_from`): continue it, or graft a backbone onto it.

The long-context papers extend a pretrained LLM: Infini-attention continues a pretrained 1B/8B model,
Activation Beacon plugs into Llama-2 / Mistral / Qwen, TransformerFAM fine-tunes a pretrained LM, LongRoPE
rescales one, and RHO-1 continues TinyLlama. `model_from_checkpoint` does the same:

- the checkpoint's own backbone (or `backbone` left unset): it is loaded and continued; `model.options`
  and, for the Llama family, `model.rope_scaling` / `model.max_position_embeddings` override its config
  (position interpolation, YaRN, dynamic NTK, LongRoPE on a pretrained Llama, Mistral or Qwen2);
- `backbone: infini | fam | beacon` on a `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`
  checkpoint: the backbone is built with the source's sizes and every weight they share is copied
  (embeddings, norms, q/k/v/o with their biases and grouped-query layout, MLP, head, rope theta, norm eps).
  Each new path starts closed, so that at step 0 the grafted model computes what the source computes on
  any input within one segment / block / window:

  - infini: new gate beta per head (`gate_mode: add`, A = A_dot + tanh(beta) A_mem, beta = 0); it starts
    as the source because the memory read is shut, and within the first segment the memory is empty too;
  - fam: new FAM prompt and gate gamma per head (`fam_read: gated`, gamma = 0); block tokens read no FAM
    (the FAM still updates);
  - beacon: new beacon embedding, beacon q/k/v/o = copies of the regular ones (paper sec. 2.3); no beacon
    exists before the first window completes.

  The model *differs* from the source past one segment by design: the new backbone forgets raw tokens
  beyond its span until continued training teaches the new path. megalodon replaces attention with CEMA
  layers and cannot be grafted.

Sizes come from the checkpoint: a size key set explicitly in `model` that disagrees with it is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from slm.errors import SlmError
from slm.models.registry import BACKBONES, get_backbone

# model_type -> the transformers class a graft can start from
SOURCE_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_SOURCES = ", ".join(f"{cls} ({mt})" for mt, cls in SOURCE_CLASSES.items())

# ModelConfig size key -> the Hugging Face config attribute it must agree with
SIZE_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
}


def read_source_config(path: str) -> PretrainedConfig:
    if not (Path(path) / "config.json").is_file():
        raise SlmError(f"model.init_from={path!r}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise SlmError(f"model.init_from={path!r}: cannot read its config.json ({e})") from None


def rope_theta_of(config: PretrainedConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def source_value(config: PretrainedConfig, hf_key: str) -> Any:
    if hf_key == "rope_theta":
        return rope_theta_of(config)
    if hf_key == "num_key_value_heads":
        return getattr(config, hf_key, None) or config.num_attention_heads
    return getattr(config, hf_key)


def backbone_of(config: PretrainedConfig) -> str | None:
    """The registered backbone whose config class has this checkpoint's model_type."""
    return next((b.name for b in BACKBONES.values() if b.config_cls.model_type == config.model_type), None)


def check_sizes_agree(model_cfg, config: PretrainedConfig) -> None:
    for key, hf_key in SIZE_KEYS.items():
        if key in model_cfg.model_fields_set and getattr(model_cfg, key) is not None:
            mine, theirs = getattr(model_cfg, key), source_value(config, hf_key)
            if mine != theirs:
                raise SlmError(
                    f"model.{key}={mine} disagrees with model.init_from={model_cfg.init_from!r} ({hf_key}={theirs}); "
                    f"sizes come from the checkpoint: drop model.{key}"
                )


def model_from_checkpoint(model_cfg) -> PreTrainedModel:
    """Continue `model_cfg.init_from`, or graft `model_cfg.backbone` onto it (see the module docstring)."""
    path = model_cfg.init_from
    config = read_source_config(path)
    check_sizes_agree(model_cfg, config)
    own = backbone_of(config)
    wanted = model_cfg.backbone if "backbone" in model_cfg.model_fields_set else (own or "llama")
    get_backbone(wanted)  # an unknown name is refused here, naming the registered ones
    llama_family = wanted == "llama" and config.model_type in SOURCE_CLASSES
    if wanted == own or llama_family:
        return continue_checkpoint(path, model_cfg, config)
    return graft(path, model_cfg, config, wanted)


def continue_checkpoint(path: str, model_cfg, config: PretrainedConfig) -> PreTrainedModel:
    """The checkpoint as it is, with `options`, `rope_scaling` and an explicit `max_position_embeddings` applied."""
    overrides = dict(model_cfg.options)
    if "max_position_embeddings" in model_cfg.model_fields_set:
        overrides["max_position_embeddings"] = model_cfg.max_position_embeddings
    if model_cfg.rope_scaling:
        if config.model_type not in SOURCE_CLASSES:
            raise SlmError(
                f"model.rope_scaling: applies to Llama-family checkpoints ({SUPPORTED_SOURCES}); "
                f"{path!r} is {config.model_type!r}"
            )
        from slm.models.llama import normalize_rope_parameters

        overrides["rope_parameters"] = normalize_rope_parameters(
            model_cfg.rope_scaling,
            rope_theta=rope_theta_of(config),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            max_position_embeddings=overrides.get("max_position_embeddings", config.max_position_embeddings),
        )
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise SlmError(f"model.options.{key}: {config.model_type!r} checkpoint {path!r} has no config key {key!r}")
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config)


def check_graftable_layout(path: str, config: PretrainedConfig) -> None:
    """What the slm backbones reproduce of a Llama-family layer; anything else is refused by name."""
    head_dim = getattr(config, "head_dim", None)
    problems = []
    if head_dim and head_dim != config.hidden_size // config.num_attention_heads:
        problems.append(f"head_dim={head_dim} (slm backbones use hidden_size / num_attention_heads)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (SwiGLU needs silu)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=true")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r} (the streaming backbones use plain RoPE)")
    if problems:
        raise SlmError(f"model.init_from={path!r}: cannot be grafted: " + "; ".join(problems))


def graft_config_kwargs(config: PretrainedConfig, model_cfg) -> dict[str, Any]:
    """The source's sizes in the streaming backbones' (Llama-style) config keys."""
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    out_bias = config.model_type == "llama" and bool(getattr(config, "attention_bias", False))
    kwargs = {
        key: source_value(config, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rope_theta",
            "rms_norm_eps",
            "tie_word_embeddings",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    if "max_position_embeddings" in model_cfg.model_fields_set:
        kwargs["max_position_embeddings"] = model_cfg.max_position_embeddings
    return {**kwargs, "attention_bias": qkv_bias, "attention_out_bias": out_bias}


def graft(path: str, model_cfg, config: PretrainedConfig, wanted: str) -> PreTrainedModel:
    backbone = get_backbone(wanted)
    graftable = sorted(name for name, b in BACKBONES.items() if b.graft is not None)
    if backbone.graft is None:
        raise SlmError(
            f"model.backbone={wanted!r} cannot be grafted onto a pretrained checkpoint ({backbone.graft_refusal}); "
            f"graftable backbones: {graftable} (and llama with rope_scaling)"
        )
    if config.model_type not in SOURCE_CLASSES:
        raise SlmError(
            f"model.init_from={path!r}: model_type {config.model_type!r} cannot be grafted onto {wanted!r}; "
            f"supported sources: {SUPPORTED_SOURCES}"
        )
    if model_cfg.rope_scaling:
        raise SlmError(f"model.rope_scaling: applies to backbone llama only, not {wanted!r}")
    check_graftable_layout(path, config)
    spec = backbone.graft
    kwargs = {**graft_config_kwargs(config, model_cfg), **spec.closed_options, **model_cfg.options}
    try:
        target_config = backbone.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SlmError(f"model.options for backbone {wanted!r} grafted onto {path!r}: {e}") from None
    span = getattr(target_config, spec.span_key)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and window < span:
        raise SlmError(
            f"model.options.{spec.span_key}={span} exceeds the source's sliding_window={window}: within one "
            f"{spec.span_key} the graft must see what the source sees; use {spec.span_key} <= {window}"
        )
    source = AutoModelForCausalLM.from_pretrained(path)
    target = backbone.model_cls(target_config).to(next(source.parameters()).dtype)
    copy_shared_weights(source, target, spec, where=f"{path!r} -> {wanted!r}")
    return target


@torch.no_grad()
def copy_shared_weights(source: PreTrainedModel, target: PreTrainedModel, spec, where: str) -> list[str]:
    """Copy every source weight to its place in target; every target weight that is not new must be covered.
    Returns the names of the new (not copied) parameters."""
    target_state = target.state_dict()
    copied = set()
    for name, value in source.state_dict().items():
        dest = spec.rename(name)
        if dest not in target_state:
            raise SlmError(f"graft {where}: source weight {name!r} has no place in the backbone (looked for {dest!r})")
        if target_state[dest].shape != value.shape:
            raise SlmError(
                f"graft {where}: {name!r} has shape {tuple(value.shape)}, "
                f"{dest!r} needs {tuple(target_state[dest].shape)}"
            )
        target_state[dest].copy_(value)
        copied.add(dest)
    new = [name for name in target_state if name not in copied]
    not_new = [name for name in new if not spec.is_new(name)]
    if not_new:
        raise SlmError(
            f"graft {where}: the source has no weights for {not_new[:4]}{' ...' if len(not_new) > 4 else ''}"
        )
    if spec.after_copy is not None:
        spec.after_copy(target)
    return new
