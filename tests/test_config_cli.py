"""The config system and the CLI surface: one-line errors naming file, key and expectation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slm.config import ReferenceConfig, TrainConfig, load_config, parse_override
from slm.errors import SlmError


def slm_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slm.cli", *args], capture_output=True, text=True, cwd=cwd)


def write(path, text):
    path.write_text(text)
    return path


def test_help_lists_every_stage_and_version():
    out = slm_cli("--help")
    assert out.returncode == 0
    for command in ("reference", "score", "pretrain", "eval", "run", "shards", "jobs"):
        assert command in out.stdout
    version = slm_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("slm ")


@pytest.mark.parametrize("command", ["reference", "score", "pretrain", "eval"])
def test_every_stage_takes_config_and_set(command):
    out = slm_cli(command, "--help")
    assert "--config" in out.stdout and "--set" in out.stdout


def test_misspelled_key_names_file_and_key(tmp_path):
    cfg = write(tmp_path / "ref.yaml", "out_dir: o\ntokenizer: t\ncorpus: {path: a.jsonl}\ntrain: {max_stpes: 3}\n")
    with pytest.raises(SlmError) as e:
        load_config(cfg, ReferenceConfig)
    assert str(cfg) in str(e.value) and "train.max_stpes" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_key_and_expectation(tmp_path):
    cfg = write(tmp_path / "ref.yaml", "out_dir: o\ntokenizer: t\ncorpus: {path: a.jsonl}\ntrain: {max_steps: many}\n")
    with pytest.raises(SlmError, match=r"key 'train.max_steps': Input should be a valid integer.*'many'"):
        load_config(cfg, ReferenceConfig)


def test_missing_required_key_and_missing_file(tmp_path):
    with pytest.raises(SlmError, match=r"key 'tokenizer': required key is missing"):
        load_config(write(tmp_path / "r.yaml", "out_dir: o\ncorpus: {path: a}\n"), ReferenceConfig)
    with pytest.raises(SlmError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", ReferenceConfig)


def test_set_overrides_are_typed_and_validated(tmp_path):
    cfg = write(tmp_path / "r.yaml", "out_dir: o\ntokenizer: t\ncorpus: {path: a.jsonl}\n")
    loaded = load_config(cfg, ReferenceConfig, ["train.optim.lr=3e-4", "train.max_steps=7", "model.backbone=infini"])
    assert loaded.train.optim.lr == 3e-4 and loaded.train.max_steps == 7 and loaded.model.backbone == "infini"
    with pytest.raises(SlmError, match=r"--set train.lr=1.*key 'train.lr': unknown key"):
        load_config(cfg, ReferenceConfig, ["train.lr=1"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(SlmError, match="expected dotted.key=value"):
        parse_override("novalue")


def test_cli_error_is_one_line_exit_2_without_traceback(tmp_path):
    cfg = write(tmp_path / "r.yaml", "out_dir: o\ntokenizer: t\ncorpus: {path: a.jsonl}\nmodel: {hiden_size: 3}\n")
    out = slm_cli("reference", "--config", str(cfg))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.hiden_size" in lines[0]
    assert "Traceback" not in out.stderr
    debug = slm_cli("--debug", "reference", "--config", str(cfg))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_invalid_yaml_names_the_line(tmp_path):
    cfg = write(tmp_path / "r.yaml", "out_dir: o\ntrain: {max_steps: [1,\n")
    with pytest.raises(SlmError, match=r"r.yaml: not valid YAML at line"):
        load_config(cfg, ReferenceConfig)


def test_train_config_defaults_are_valid():
    assert TrainConfig().optim.warmup_steps >= 0
