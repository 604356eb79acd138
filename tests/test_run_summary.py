"""`slm run`'s summary prints every key figure in full, on a narrow terminal too; long paths are shortened."""

from __future__ import annotations

import io

from rich.console import Console

from slm.pipeline.run import print_summary, short_path

SUMMARY = [
    {
        "stage": "pretrain_slm",
        "kind": "pretrain",
        "status": "complete",
        "seconds": 812.4,
        "output": "/scratch/a/very/long/work/dir/of/a/user/runs/corpus-2026/pretrain_slm",
        "metrics": {
            "final_heldout_loss": 5.142371234,
            "final_heldout_rows": 990,
            "final_heldout_tokens": 253440,
            "tokens_seen": 1228800,
            "kept_fraction": 0.6,
        },
    },
    {
        "stage": "eval_slm",
        "kind": "eval",
        "status": "complete",
        "seconds": 41.0,
        "output": "/elsewhere/with/a/path/much/longer/than/the/column/eval_slm",
        "metrics": {"heldout_loss": 5.1424, "heldout_rows": 990, "heldout_tokens": 253440, "domain_accuracy": 0.385},
    },
]


def render(width: int) -> str:
    buffer = io.StringIO()
    print_summary(
        SUMMARY, "/scratch/a/very/long/work/dir/of/a/user/runs/corpus-2026", Console(file=buffer, width=width)
    )
    return buffer.getvalue()


def test_key_figures_are_whole_at_any_width():
    for width in (40, 80, 200):
        text = render(width)
        assert "pretrain_slm: final_heldout_loss=5.14237 (rows=990, tokens=253440)" in text
        assert "pretrain_slm: tokens_seen=1228800" in text and "pretrain_slm: kept_fraction=0.6" in text
        assert "eval_slm: heldout_loss=5.1424 (rows=990, tokens=253440)" in text
        assert "eval_slm: domain_accuracy=0.385" in text
        assert "…" not in text.split("┘")[-1]  # nothing below the table is cut


def test_paths_are_relative_to_the_work_dir_or_shortened_from_the_left():
    assert (
        short_path(SUMMARY[0]["output"], "/scratch/a/very/long/work/dir/of/a/user/runs/corpus-2026") == "pretrain_slm"
    )
    long = SUMMARY[1]["output"]
    short = short_path(long, "/scratch/x", keep=40)
    assert short.startswith("…/") and long.endswith(short[1:]) and len(short) <= 40
    assert short_path("/short/path", None) == "/short/path"
