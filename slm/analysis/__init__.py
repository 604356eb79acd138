"""Analyses of trained models (library code; the stages behind `slm analyze ...` call into here)."""

from slm.analysis.token_dynamics import (  # noqa: F401
    CATEGORIES,
    TokenDynamicsConfig,
    TokenDynamicsThresholds,
    classify_tokens,
    fit_loss_lines,
    load_deepspeed_weights,
    token_dynamics,
    token_dynamics_command,
    token_dynamics_config,
)
