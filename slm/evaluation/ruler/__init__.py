"""RULER-style long-context evaluation (Hsieh et al. 2024) with the pass-key test
(Mohtashami & Jaggi 2023): synthetic tasks sized in the evaluated model's own tokenizer,
chunked greedy decoding with carried state, RULER's string-match scores, effective length.

Modules: config (RulerConfig), templates (wording), tasks (generators), sizing (fit a sample
to a token budget), decode (greedy_generate), scoring (metrics, intervals, effective length),
report (tables, heatmaps), runner (run_ruler).
"""

from slm.evaluation.ruler.config import TASKS, CompactWording, RulerConfig, TaskOptions
from slm.evaluation.ruler.decode import greedy_generate, stop_token_ids
from slm.evaluation.ruler.report import summary_table
from slm.evaluation.ruler.runner import run_ruler
from slm.evaluation.ruler.scoring import effective_length, string_match_all, string_match_part
from slm.evaluation.ruler.tasks import Sample, generate_sample

__all__ = [
    "TASKS",
    "CompactWording",
    "RulerConfig",
    "TaskOptions",
    "Sample",
    "effective_length",
    "generate_sample",
    "greedy_generate",
    "run_ruler",
    "stop_token_ids",
    "string_match_all",
    "string_match_part",
    "summary_table",
]
