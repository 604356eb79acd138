"""`llama`: the plain transformers Llama baseline, with RoPE scaling through transformers' own
rope parameters (`linear`, `dynamic`, `yarn`, `longrope`, `llama3`).

`ModelConfig.rope_scaling` is merged over `{rope_type: default, rope_theta: model.rope_theta}` and
becomes `LlamaConfig.rope_parameters`. transformers 5.x only *warns* about unknown keys, wrong list
lengths and factors < 1, and some problems only surface at the first forward (a `long_factor` of
the wrong length is a shape error deep in the rotary module). `normalize_rope_parameters` checks the
keys each type needs up front (the same sets as transformers' `_validate_<type>_rope_parameters`
in `modeling_rope_utils.py`) and raises one `SlmError` naming `model.rope_scaling.<key>`.

What each type does in transformers 5.24 (inv_freq_i = theta^(-2i/d), i < d/2):
- `linear` (position interpolation, Chen et al. 2023): inv_freq_i / factor.
- `dynamic` (dynamic NTK): base grows with the current length past `max_position_embeddings`,
  which is taken as the pretraining length.
- `yarn` (Peng et al. 2023): NTK-by-parts ramp between `original_max_position_embeddings`-based
  correction dims, attention temperature 0.1 ln(factor) + 1 unless `attention_factor` is given.
- `longrope` (Ding et al. 2024; the Phi-3 form): inv_freq_i / long_factor[i] once the sequence is
  longer than `original_max_position_embeddings`, inv_freq_i / short_factor[i] otherwise; cos/sin
  are scaled by `attention_factor`, default sqrt(1 + ln(factor) / ln(original_max_position_embeddings)).
  `slm.analysis.longrope.search_longrope_factors` searches `long_factor`.
"""

from __future__ import annotations

import copy
import math
from numbers import Real
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from slm.errors import SlmError
from slm.models.registry import common_config_kwargs, register_backbone

# rope_type -> (required keys, optional keys), mirroring transformers 5.24
# RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters (rope_type / rope_theta aside).
ROPE_TYPE_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "factor"}),
    ),
    "llama3": (
        frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
        frozenset(),
    ),
}


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def normalize_rope_parameters(
    rope_scaling: dict[str, Any] | None,
    *,
    rope_theta: float,
    head_dim: int,
    max_position_embeddings: int,
    where: str = "model.rope_scaling",
) -> dict[str, Any]:
    """The checked `rope_parameters` dict for a transformers Llama-style config.

    Raises `SlmError` naming `<where>.<key>` for an unknown rope_type, a missing or unknown key,
    a non-numeric or out-of-range value, or a longrope factor list whose length is not head_dim/2.
    """
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if not rope_scaling:
        return params
    if not isinstance(rope_scaling, dict):
        raise SlmError(f"{where}: expected a mapping of rope parameters, got {type(rope_scaling).__name__}")
    given = copy.deepcopy(dict(rope_scaling))
    # transformers' legacy spelling `type:` means `rope_type:`
    if "type" in given:
        legacy = given.pop("type")
        if given.setdefault("rope_type", legacy) != legacy:
            raise SlmError(
                f"{where}: `type: {legacy}` and `rope_type: {given['rope_type']}` disagree; use rope_type only"
            )
    rope_type = given.pop("rope_type", "default")
    if rope_type not in ROPE_TYPE_KEYS:
        raise SlmError(f"{where}.rope_type={rope_type!r}: unknown; expected one of {sorted(ROPE_TYPE_KEYS)}")
    if "rope_theta" in given:
        theta = given.pop("rope_theta")
        if not _is_number(theta) or float(theta) != float(rope_theta):
            raise SlmError(
                f"{where}.rope_theta={theta!r} disagrees with model.rope_theta={rope_theta}; set model.rope_theta only"
            )
    required, optional = ROPE_TYPE_KEYS[rope_type]
    missing = sorted(required - given.keys())
    unknown = sorted(given.keys() - required - optional)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing required key(s) {missing}")
        if unknown:
            problems.append(f"unknown key(s) {unknown}")
        raise SlmError(
            f"{where}: rope_type {rope_type!r}: {'; '.join(problems)} "
            f"(required: {sorted(required)}, optional: {sorted(optional)})"
        )

    # -- values
    def number(key: str, lo: float, lo_inclusive: bool = True) -> float:
        v = given[key]
        ok = _is_number(v) and (float(v) >= lo if lo_inclusive else float(v) > lo)
        if not ok:
            rel = ">=" if lo_inclusive else ">"
            raise SlmError(f"{where}.{key}={v!r}: expected a number {rel} {lo}")
        return float(v)

    if "factor" in given:
        given["factor"] = number("factor", 1.0)
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if key in given:
            given[key] = number(key, 0.0, lo_inclusive=False)
    for key in ("low_freq_factor", "high_freq_factor"):
        if key in given:
            given[key] = number(key, 0.0, lo_inclusive=False)
    if "truncate" in given and not isinstance(given["truncate"], bool):
        raise SlmError(f"{where}.truncate={given['truncate']!r}: expected true or false")
    if "original_max_position_embeddings" in given:
        orig = given["original_max_position_embeddings"]
        if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
            raise SlmError(f"{where}.original_max_position_embeddings={orig!r}: expected a positive integer")
        if orig > max_position_embeddings:
            raise SlmError(
                f"{where}.original_max_position_embeddings={orig} exceeds model.max_position_embeddings="
                f"{max_position_embeddings}; the extended context must be at least the original one"
            )
    if rope_type == "longrope":
        n = head_dim // 2
        for key in ("short_factor", "long_factor"):
            v = given[key]
            if not isinstance(v, (list, tuple)) or not all(_is_number(x) and float(x) > 0 for x in v):
                raise SlmError(f"{where}.{key}: expected a list of positive numbers (one per rotary pair)")
            if len(v) != n:
                raise SlmError(f"{where}.{key}: has {len(v)} entries; head_dim={head_dim} needs head_dim/2={n}")
            given[key] = [float(x) for x in v]
        if "factor" not in given:
            # transformers falls back to max_position_embeddings / original (with a warning); make it explicit.
            # It only sets the default attention factor sqrt(1 + ln(factor) / ln(original)).
            given["factor"] = max_position_embeddings / given["original_max_position_embeddings"]
    if rope_type == "llama3" and given["high_freq_factor"] <= given["low_freq_factor"]:
        raise SlmError(f"{where}: high_freq_factor must be greater than low_freq_factor")

    params["rope_type"] = rope_type
    params.update(given)
    return params


def llama_config_kwargs(model_cfg, vocab_size: int) -> dict[str, Any]:
    kwargs = common_config_kwargs(model_cfg, vocab_size)
    head_dim = model_cfg.options.get("head_dim") or model_cfg.hidden_size // model_cfg.num_heads
    kwargs["rope_parameters"] = normalize_rope_parameters(
        model_cfg.rope_scaling,
        rope_theta=kwargs.pop("rope_theta"),
        head_dim=head_dim,
        max_position_embeddings=model_cfg.max_position_embeddings,
    )
    kwargs["attention_bias"] = False
    return kwargs


register_backbone("llama", LlamaConfig, LlamaForCausalLM, llama_config_kwargs)
