"""Backbone registry: name -> (HF config class, HF causal-LM class), and `build_model`.

Registering also registers with `AutoConfig` / `AutoModelForCausalLM`, so a checkpoint of any
backbone loads with `AutoModelForCausalLM.from_pretrained(path)` once `slm` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from slm.errors import SlmError


@dataclass(frozen=True)
class GraftSpec:
    """How a backbone is grafted onto a Llama-family checkpoint (`slm.models.graft`)."""

    closed_options: dict[str, Any]  # config keys that make every new path start closed
    new_parameters: tuple[str, ...]  # substrings naming the parameters the source does not have
    span_key: str  # config key of the span (segment, block, window) within which the graft equals the source
    renames: tuple[tuple[str, str], ...] = ()  # (from, to) substring replacements of the source's weight names
    after_copy: Callable[[PreTrainedModel], None] | None = None  # e.g. beacon: regular -> beacon projections

    def rename(self, name: str) -> str:
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def is_new(self, name: str) -> bool:
        return any(part in name for part in self.new_parameters)


@dataclass(frozen=True)
class Backbone:
    name: str
    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    # maps the common ModelConfig sizes onto this backbone's HF config kwargs
    config_kwargs: Callable[[Any, int], dict[str, Any]]
    graft: GraftSpec | None = None  # None: cannot be grafted onto a pretrained checkpoint ...
    graft_refusal: str = ""  # ... and why


BACKBONES: dict[str, Backbone] = {}


def common_config_kwargs(model_cfg, vocab_size: int) -> dict[str, Any]:
    """The Llama-style size keys that every slm backbone config accepts."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_embeddings,
    )


def register_backbone(
    name: str,
    config_cls,
    model_cls,
    config_kwargs=common_config_kwargs,
    graft: GraftSpec | None = None,
    graft_refusal: str = "",
) -> None:
    if config_cls.model_type not in _registered_model_types():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    BACKBONES[name] = Backbone(name, config_cls, model_cls, config_kwargs, graft, graft_refusal)


def _registered_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return set(CONFIG_MAPPING.keys())


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise SlmError(f"model.backbone={name!r}: unknown backbone; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_config(model_cfg, vocab_size: int) -> PretrainedConfig:
    backbone = get_backbone(model_cfg.backbone)
    if model_cfg.rope_scaling and model_cfg.backbone != "llama":
        raise SlmError(f"model.rope_scaling: applies to backbone llama only, not {model_cfg.backbone!r}")
    kwargs = backbone.config_kwargs(model_cfg, vocab_size)
    kwargs.update(model_cfg.options)
    try:
        return backbone.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SlmError(f"model.options for backbone {model_cfg.backbone!r}: {e}") from None


def build_model(model_cfg, vocab_size: int, seed: int | None = None) -> PreTrainedModel:
    """A fresh model from sizes (initialised from `seed`), or from the checkpoint in `model_cfg.init_from`:
    continued, or with `model_cfg.backbone` grafted onto it (`slm.models.graft`)."""
    if model_cfg.init_from:
        from slm.models.graft import model_from_checkpoint

        if seed is not None:  # the graft's new parameters are initialised from it
            import torch

            torch.manual_seed(seed)
        return model_from_checkpoint(model_cfg)
    config = build_config(model_cfg, vocab_size)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    model = get_backbone(model_cfg.backbone).model_cls(config)
    return model


def load_pretrained(path: str, **kwargs) -> PreTrainedModel:
    from pathlib import Path

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SlmError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
