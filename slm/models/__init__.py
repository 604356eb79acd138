"""Backbones. Importing this package registers each one (see registry.py). Beside them: the per-token loss every
stage computes with a model (token_loss.py) and a model's checks against its tokenizer and seq_len (checks.py)."""

from slm.models import beacon, fam, infini, llama, megalodon  # noqa: F401
from slm.models.registry import BACKBONES, build_config, build_model, get_backbone, load_pretrained  # noqa: F401
