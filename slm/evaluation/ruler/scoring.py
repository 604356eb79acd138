"""RULER's metrics, confidence intervals, and the effective context length.

- `string_match_all`: per sample, the fraction of references contained in the prediction
  (case-insensitive); averaged over samples, x100. RULER's metric for all synthetic tasks.
- `string_match_part`: per sample, 1 if any reference is contained, else 0; averaged, x100.
- Intervals of a task's mean score (in percent):
  * `wilson` (default): the Wilson score interval with n = number of samples, applied to the
    mean score. Exact for 0/1 scores (single-answer tasks); for fractional scores
    (multi-answer tasks) it treats the mean as a proportion, a slight over-estimate of the
    spread. Unlike the normal interval it stays inside [0, 100] and is not degenerate at 0%
    or 100%, which RULER tables hit often.
  * `bootstrap`: percentile bootstrap over samples (2000 resamples, fixed seed); degenerate
    (zero width) when all scores are equal.
- Effective length (RULER Sec. 4): counting up from the shortest length, the longest length
  such that the task-averaged score at it and at every shorter length is at least the
  threshold: absolute (85.6, Llama-2-7B at 4K) or relative (a fraction of the score at the
  shortest length). None when even the shortest length falls short.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from statistics import NormalDist


def _contains(ref: str, pred: str) -> bool:
    return ref.lower() in pred.lower()


def match_all(pred: str, refs: list[str]) -> float:
    """Fraction of `refs` contained in `pred` (one sample, in [0, 1])."""
    return sum(_contains(r, pred) for r in refs) / len(refs) if refs else 0.0


def match_part(pred: str, refs: list[str]) -> float:
    """1.0 if any of `refs` is contained in `pred` (one sample)."""
    return float(any(_contains(r, pred) for r in refs))


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's string_match_all over samples, x100."""
    if not preds:
        return 0.0
    return 100.0 * sum(match_all(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's string_match_part over samples, x100."""
    if not preds:
        return 0.0
    return 100.0 * sum(match_part(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds)


SAMPLE_METRICS = {"string_match_all": match_all, "string_match_part": match_part}


def score_sample(pred: str, refs: list[str], metric: str = "string_match_all") -> float:
    return SAMPLE_METRICS[metric](pred, refs)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_interval(mean: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `mean` in [0, 1] observed over n trials."""
    if n <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    denom = 1 + z * z / n
    center = (mean + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(mean * (1 - mean), 0.0) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_interval(
    scores: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores`."""
    if not scores:
        return (0.0, 1.0)
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(resamples))
    lo = means[int(math.floor((1 - confidence) / 2 * (resamples - 1)))]
    hi = means[int(math.ceil((1 + confidence) / 2 * (resamples - 1)))]
    return (lo, hi)


def summarize(scores: list[float], ci: str = "wilson", confidence: float = 0.95) -> dict:
    """Mean and interval of per-sample scores in [0, 1], reported in percent."""
    n = len(scores)
    mean = sum(scores) / n if n else float("nan")
    if ci == "wilson":
        lo, hi = wilson_interval(mean, n, confidence) if n else (float("nan"), float("nan"))
    elif ci == "bootstrap":
        lo, hi = bootstrap_interval(scores, confidence) if n else (float("nan"), float("nan"))
    else:
        raise ValueError(f"ci={ci!r}: expected 'wilson' or 'bootstrap'")
    return {"score": 100 * mean, "ci_low": 100 * lo, "ci_high": 100 * hi, "n": n}


def effective_length(
    average: dict[int, float], threshold: float = 85.6, relative_threshold: float | None = None
) -> dict:
    """The effective context length from task-averaged scores per length (percent).

    Returns {"length": int | None, "threshold": the threshold used, "kind": "absolute" |
    "relative", "relative_threshold": the fraction or None}.
    """
    lengths = sorted(average)
    if relative_threshold is not None:
        used, kind = relative_threshold * average[lengths[0]] if lengths else float("nan"), "relative"
    else:
        used, kind = threshold, "absolute"
    best = None
    for length in lengths:
        if not average[length] >= used:  # also stops at NaN
            break
        best = length
    return {"length": best, "threshold": used, "kind": kind, "relative_threshold": relative_threshold}


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
