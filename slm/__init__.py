"""slm: Selective Language Modeling (RHO-1) pretraining for long-context backbones."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# Importing the package registers every backbone with AutoConfig / AutoModelForCausalLM,
# so that `AutoModelForCausalLM.from_pretrained(path)` loads slm checkpoints.
from slm import models as _models  # noqa: E402,F401
