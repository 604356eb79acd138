"""The CLI wiring of the shard tools and analyses, in-process (typer's CliRunner)."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from slm.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_shards_verify_stats_plot_inspect(scored, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(scored["shards"], shards)
    ok = invoke("shards", "verify", shards)
    assert ok.exit_code == 0 and "all shards whole" in ok.output
    stats = invoke("shards", "stats", shards, "--ratio", "0.6", "--json", tmp_path / "stats.json")
    assert stats.exit_code == 0
    assert json.loads((tmp_path / "stats.json").read_text())["tokens"] > 0
    plot = invoke("shards", "plot", shards, "--out", tmp_path / "h.png")
    assert plot.exit_code == 0 and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    view = invoke(
        "shards",
        "inspect",
        shards,
        "--row",
        2,
        "--model",
        scored["reference"],
        "--ratio",
        "0.6",
        "--html",
        tmp_path / "row.html",
    )
    assert view.exit_code == 0 and "<html" in (tmp_path / "row.html").read_text().lower()
    victim = sorted(shards.glob("shard-*.arrow"))[1]
    victim.write_bytes(victim.read_bytes()[:-10])
    bad = invoke("shards", "verify", shards)
    assert bad.exit_code == 2 and f"BAD {victim.name}" in bad.output


def test_eval_ruler_and_token_dynamics_commands(scored, tiny_demo, tmp_path):
    cfg = tmp_path / "ruler.yaml"
    cfg.write_text(
        f"model: {scored['reference']}\nout_dir: {tmp_path / 'ruler'}\ntasks: [passkey]\nlengths: [96, 192]\n"
        "samples_per_length: 2\ndepths: [0.0, 1.0]\ntemplate_set: compact\nchunk_len: 64\nmax_new_tokens: 6\n"
    )
    ruler = invoke("eval", "ruler", "--config", cfg)
    assert ruler.exit_code == 0, ruler.output
    results = json.loads((tmp_path / "ruler" / "results.json").read_text())
    assert "effective_length" in json.dumps(results)
    ref_run = scored["root"] / "ref"
    dyn = invoke(
        "analyze",
        "token-dynamics",
        "--checkpoint",
        ref_run / "model",
        "--checkpoint",
        ref_run / "model",
        "--validation",
        tiny_demo.validation,
        "--out",
        tmp_path / "dyn",
        "--max-rows",
        4,
        "--seq-len",
        64,
    )
    assert dyn.exit_code == 0, dyn.output
    assert (tmp_path / "dyn" / "token_dynamics.png").is_file()
