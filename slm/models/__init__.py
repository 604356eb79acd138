"""Backbones. Importing this package registers each one (see registry.py)."""

from slm.models import beacon, fam, infini, llama, megalodon  # noqa: F401
from slm.models.registry import BACKBONES, build_config, build_model, get_backbone, load_pretrained  # noqa: F401
