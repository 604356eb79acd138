"""`StreamingConfig`: the Llama-style size fields and checks shared by the streaming backbones'
configs (infini, megalodon, fam, beacon)."""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig


class StreamingConfig(PretrainedConfig):
    """Llama-style sizes shared by the streaming backbones, with their checks.

    A backbone's config subclasses this, sets `model_type`, may override the size defaults (these
    are a small Llama's, as infini and fam use; megalodon and beacon default to tiny sizes),
    declares its own fields and extends the checks. `__post_init__` runs, in this order:
      1. `_fill_defaults()`: num_key_value_heads None -> num_attention_heads (extend for own derived keys);
      2. `integer_keys`: key -> minimum, checked in order (a subclass adds its own keys);
      3. `_check_structure()`: relations between sizes (default: heads split hidden_size evenly, for RoPE);
      4. `_check_numbers()`: `positive_keys` must be > 0, initializer_range >= 0.
    Each error is one ValueError naming the key, its value and what was expected.
    """

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2; Llama's attention_bias), for grafted checkpoints
    attention_out_bias: bool = False  # bias on o (Llama's attention_bias)

    integer_keys: ClassVar[dict[str, int]] = dict.fromkeys(
        (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ),
        1,
    )
    positive_keys: ClassVar[tuple[str, ...]] = ("rope_theta", "rms_norm_eps")

    def __post_init__(self, **kwargs):
        self._fill_defaults()
        for key, low in self.integer_keys.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key}={value!r}: must be an integer >= {low}")
        self._check_structure()
        self._check_numbers()
        super().__post_init__(**kwargs)

    def _fill_defaults(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    def _heads_split_evenly(self) -> bool:
        return not (self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2)

    def _check_structure(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads}: must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention)"
            )
        if not self._heads_split_evenly():
            raise ValueError(
                f"hidden_size={self.hidden_size}: must split into num_attention_heads="
                f"{self.num_attention_heads} heads of even size (RoPE)"
            )

    def _check_numbers(self):
        for key in self.positive_keys:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key}={value!r}: must be a positive number")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"initializer_range={self.initializer_range!r}: must be >= 0")
