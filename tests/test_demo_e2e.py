"""The README's main job end to end: `slm run` on the embedded demo (slow: about 6-7 minutes on 2 cores).

Run with `python -m pytest -q -m slow` (CI runs it after the default suite).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_slm_run_on_the_embedded_demo(tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "slm.cli", "run", "--set", f"work_dir={work}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in (
        "data",
        "reference",
        "shards",
        "pretrain_slm",
        "pretrain_clm",
        "eval_reference",
        "eval_slm",
        "eval_clm",
    ):
        assert json.loads((work / stage / "stage.json").read_text())["status"] == "complete", stage

    ref, slm_eval, clm_eval = (
        json.loads((work / name / "results.json").read_text()) for name in ("eval_reference", "eval_slm", "eval_clm")
    )
    assert ref["domain_accuracy"] >= 0.5  # a competent reference: otherwise accuracy cannot separate the methods
    for res in (slm_eval, clm_eval):
        sel, kinds = res["selection"], res["selection"]["by_kind"]
        noise_share = sel["noise_share"]
        assert 0.3 <= noise_share <= 0.5  # web-like, as the demo promises
        # the excess-loss selection is far better than chance: a random 60% keeps 60% of the noise
        assert sel["noise_dropped"] > 0.6 and sel["kept_clean"] > (1 - noise_share) + 0.15
        # boilerplate the reference never saw is dropped almost entirely
        assert kinds["navigation"]["kept"] < 0.2 and kinds["navigation"]["ref_loss"] > kinds["clean"]["ref_loss"] + 5

    # a second run skips every stage and changes nothing
    before = {p: p.stat().st_mtime_ns for p in work.rglob("stage.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in work.rglob("stage.json")} == before
