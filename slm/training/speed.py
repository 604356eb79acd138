"""Optional speed-ups of the model being trained: activation checkpointing and `torch.compile`.

`train.activation_checkpointing: true` recomputes each decoder layer's activations in the backward pass instead
of keeping them (Hugging Face `activation_checkpointing_enable`, non-reentrant `torch.utils.checkpoint`): less
memory for a second forward of each layer. Only backbones whose model class says `supports_gradient_checkpointing`
have it (transformers' Llama does; the streaming backbones, whose layers carry recurrent state, do not); any other
is refused by name before training starts.

`train.compile: true` compiles the decoder (`model.get_decoder()`, what `slm.models.token_loss` runs) in place
with `nn.Module.compile`, so parameter names, checkpoints and the exported model stay those of the plain module.
The chunked output projection and cross-entropy (`slm.models.token_loss`) stay eager. Compilation happens at the
first forward; when the inductor backend cannot compile here (no C++ compiler, an unsupported op), the error is
one line that says so and names the way out (`compile_errors`).

Neither changes what is computed: the losses of a few steps match the plain model's (tests/test_train_speed.py).
"""

from __future__ import annotations

import contextlib

import torch

from slm.errors import SlmError


def backbone_name(model) -> str:
    """The registry name of the model's backbone (its HF model_type when it is not a registered one)."""
    from slm.models.registry import BACKBONES

    model_type = getattr(model.config, "model_type", None)
    for b in BACKBONES.values():
        if b.config_cls.model_type == model_type:
            return b.name
    return str(model_type)


def checkpointing_backbones() -> list[str]:
    """The registered backbones that support activation checkpointing."""
    from slm.models.registry import BACKBONES

    return sorted(b.name for b in BACKBONES.values() if b.model_cls.supports_gradient_checkpointing)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (HF activation checkpointing, non-reentrant); refused by name for a
    backbone without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SlmError(
            f"train.activation_checkpointing: backbone {backbone_name(model)!r} ({type(model).__name__}) does not "
            f"support activation checkpointing; backbones that do: {', '.join(checkpointing_backbones())}; "
            "set train.activation_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 (gradient_* is its old alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_model(model) -> None:
    """Compile the decoder in place (`nn.Module.compile`: the module, its parameters and state dict stay as they
    are); the work happens at its first call."""
    model.get_decoder().compile()


def autocast(engine):
    """DeepSpeed's autocast (the torch_autocast section of its config: bf16 when train.precision resolves to bf16)
    around a forward that the loop runs on the module itself, outside engine.forward (which would enter it)."""
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    return autocast_if_enabled(engine)


def prepare_model(model, cfg) -> None:
    """Apply train.activation_checkpointing, then train.compile, to the model before DeepSpeed wraps it."""
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        compile_model(model)


def _compile_error_types() -> tuple[type[BaseException], ...]:
    types = []
    with contextlib.suppress(ImportError, AttributeError):
        from torch._dynamo.exc import BackendCompilerFailed

        types.append(BackendCompilerFailed)
    with contextlib.suppress(ImportError, AttributeError):
        from torch._inductor.exc import InductorError

        types.append(InductorError)
    return tuple(types)


@contextlib.contextmanager
def compile_errors(cfg, model):
    """With train.compile, turn the backend's failure to compile (raised at the first forward) into one line naming
    the backbone, the device and the way out. A no-op otherwise."""
    if not cfg.compile:
        yield
        return
    try:
        yield
    except _compile_error_types() as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        device = next(model.parameters()).device
        raise SlmError(
            f"train.compile: torch.compile (inductor, torch {torch.__version__}) cannot compile the "
            f"{backbone_name(model)!r} model on {device.type}: {first[:300]}; set train.compile=false"
        ) from None
