"""Evaluation: held-out loss, domain accuracy, and RULER-style long-context tasks (`ruler/`)."""
