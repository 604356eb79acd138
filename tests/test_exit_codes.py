"""Exit codes of the real `slm` process (README "Exit codes"): 0 ok, 2 bad input or bad data, 1 a bug, 130 aborted.

The commands run as subprocesses (`python -m slm.cli`, the console script's `main()`), since the bug
this guards against lived in `main()`: a `typer.Exit(code)` came back from the app as a return value
and was dropped, so `slm shards verify` exited 0 on a bad shard. A process costs seconds (importing
slm registers every backbone), so each group of cases runs its processes concurrently in a fixture
and the tests only read the results; the remaining cases call `cli.run_cli`, the function whose
return value `main()` passes to `sys.exit`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from slm import cli
from slm.shards.layout import DONE_DIR, shard_name
from slm.shards.manifest import load_manifest

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_concurrently(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """`slm ARGS...` for each named argument list, all at once; their results by name."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "slm.cli", *map(str, args)],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


# ----------------------------------------------------------------------------- input errors


@pytest.fixture(scope="module")
def input_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_codes")
    typo = root / "ref.yaml"
    typo.write_text("out_dir: o\ntokenizer: t\ncorpus: {path: a.jsonl}\ntrain: {max_stpes: 3}\n")
    return typo, run_concurrently(
        {
            "version": ["--version"],
            "unknown_key": ["reference", "--config", typo],
            "missing_config": ["pretrain"],
        },
        cwd=root,
    )


def test_version_exits_0(input_cases):
    out = input_cases[1]["version"]
    assert out.returncode == 0 and out.stdout.startswith("slm "), out.stderr


def test_unknown_config_key_exits_2_with_one_line(input_cases):
    typo, results = input_cases
    out = results["unknown_key"]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and str(typo) in lines[0] and "train.max_stpes" in lines[0]
    )
    assert "Traceback" not in out.stderr


def test_missing_config_exits_2(input_cases):
    out = input_cases[1]["missing_config"]
    assert (
        out.returncode == 2
        and out.stderr.strip() == "error: --config FILE is required (a YAML file of PretrainConfig keys)"
    )


# ----------------------------------------------------------------------------- shards verify


def _truncate(d: Path, names: list[str]) -> str:
    victim = d / names[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    return names[0]


def _flip_byte(d: Path, names: list[str]) -> str:
    victim = d / names[1]
    data = bytearray(victim.read_bytes())
    data[-50] ^= 0xFF  # same size: only the sha256 can tell
    victim.write_bytes(bytes(data))
    return names[1]


def _delete(d: Path, names: list[str]) -> str:
    (d / names[-1]).unlink()
    return names[-1]


def _unlisted(d: Path, names: list[str]) -> str:
    extra = shard_name(len(names) + 7)
    shutil.copyfile(d / names[0], d / extra)
    return extra


def _nan_count(d: Path, names: list[str]) -> str:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shards"][names[0]]["nan_tokens"] += 3  # the data are intact, the manifest disagrees
    (d / "manifest.json").write_text(json.dumps(manifest))
    return names[0]


DAMAGE = {"truncated": _truncate, "byte_flipped": _flip_byte, "deleted": _delete, "unlisted": _unlisted}
WHY = {"truncated": "truncated", "byte_flipped": "sha256", "deleted": "missing", "unlisted": "not listed"}


@pytest.fixture(scope="module")
def verify_cases(scored, tmp_path_factory):
    """One copy of the scored shards per case, damaged one way each (or not), verified concurrently."""
    root = tmp_path_factory.mktemp("verify")
    names = sorted(load_manifest(scored["shards"]).shards)
    assert len(names) >= 3
    dirs, victims = {}, {}
    for case in ["good", *DAMAGE]:
        dirs[case] = root / case
        shutil.copytree(scored["shards"], dirs[case])
    for case, damage in DAMAGE.items():
        victims[case] = damage(dirs[case], names)
    results = run_concurrently({case: ["shards", "verify", d] for case, d in dirs.items()}, cwd=root)
    return dirs, victims, results


def test_verify_good_shards_exits_0(verify_cases):
    dirs, _, results = verify_cases
    out = results["good"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{dirs['good']}: all shards whole"


@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_damaged_shard_exits_2_naming_it(verify_cases, case):
    _, victims, results = verify_cases
    out = results[case]
    assert out.returncode == 2, out.stdout + out.stderr
    bad = [line for line in out.stdout.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith(f"BAD {victims[case]}: ") and WHY[case] in bad[0], out.stdout
    assert "all shards whole" not in out.stdout and "Traceback" not in out.stderr


# ---------------------------------------------------------------------- in-process: run_cli is what main() exits with


def _shard_copy(scored, tmp_path) -> tuple[Path, list[str]]:
    d = tmp_path / "shards"
    shutil.copytree(scored["shards"], d)
    return d, sorted(load_manifest(d).shards)


def test_verify_nan_count_differing_from_manifest_is_2(scored, tmp_path, capsys):
    d, names = _shard_copy(scored, tmp_path)
    _nan_count(d, names)
    assert cli.run_cli(["shards", "verify", str(d)]) == 2
    out = capsys.readouterr().out
    assert f"BAD {names[0]}: " in out and "NaN token losses" in out
    assert cli.run_cli(["shards", "verify", "--quick", str(d)]) == 0  # --quick reads no data


def test_verify_reports_leftover_temp_files_but_passes(scored, tmp_path, capsys):
    d, names = _shard_copy(scored, tmp_path)
    # a crash (SIGKILL) inside slm.utils.io.atomic_open leaves `.NAME.XXXXXXXX.tmp` behind
    (d / f".{names[0]}.k2j4l5n6.tmp").write_bytes(b"partial")
    (d / DONE_DIR / f".{names[0]}.json.q8w7e6r5.tmp").write_bytes(b"{")
    assert cli.run_cli(["shards", "verify", str(d)]) == 0
    out = capsys.readouterr().out
    warns = [line for line in out.splitlines() if line.startswith("WARN ")]
    assert len(warns) == 2 and all("leftover temp file" in w for w in warns)
    assert any(w.startswith(f"WARN {DONE_DIR}/") for w in warns) and "all shards whole" in out


@pytest.mark.parametrize(
    "args",
    [["shards", "nope"], ["shards", "verify"], ["--no-such-option"], ["shards", "stats", "d", "--ratio", "many"]],
)
def test_usage_error_is_2_without_traceback(capsys, args):
    assert cli.run_cli(args) == 2
    err = capsys.readouterr().err
    assert ("Error: " in err or "error: " in err) and "Traceback" not in err


def test_debug_shows_the_traceback_and_keeps_2(capsys, tmp_path):
    assert cli.run_cli(["--debug", "shards", "verify", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("shard directory not found")


@pytest.mark.parametrize(
    "raised, status, stderr",
    [
        (RuntimeError("boom"), 1, "this is a bug in slm"),
        (KeyboardInterrupt(), 130, "aborted"),
        (typer.Exit(3), 3, ""),
    ],
)
def test_run_cli_turns_every_outcome_into_a_status(monkeypatch, capsys, tmp_path, raised, status, stderr):
    from slm.shards import reader

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(reader, "verify_shards", fail)
    assert cli.run_cli(["shards", "verify", str(tmp_path)]) == status
    err = capsys.readouterr().err
    assert stderr in err
    assert ("Traceback" in err) == (status == 1)
