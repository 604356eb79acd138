"""Evaluation: held-out loss, domain accuracy, selection quality, RULER-style long-context tasks (`ruler/`) and
the lm-eval harness."""
