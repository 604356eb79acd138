"""`RulerConfig`: what `run_ruler` evaluates, on which lengths, with which wording.

The classes live in `slm.config` with every other stage's config (RULER is the `ruler` stage
kind); they are re-exported here under the names the RULER modules use.
"""

from slm.config import COMPACT_PLACEHOLDERS, CompactWording, RulerConfig, TaskOptions, check_placeholders
from slm.config import RULER_TASKS as TASKS

__all__ = ["COMPACT_PLACEHOLDERS", "TASKS", "CompactWording", "RulerConfig", "TaskOptions", "check_placeholders"]
