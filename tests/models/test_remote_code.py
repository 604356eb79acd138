"""Exports load with plain transformers (`trust_remote_code=True`) in a process that cannot import slm, and give
the logits slm gives; the exported code is generated from slm's own modules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tokens
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import slm.models
from slm.config import ModelConfig
from slm.models import beacon, build_model, fam, infini, megalodon
from slm.models.remote_code import SHARED_MODULES, standalone_source

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MODELS = {
    "infini": lambda: infini.InfiniForCausalLM(infini.InfiniConfig(**SMALL, segment_len=8)),
    "megalodon": lambda: megalodon.MegalodonForCausalLM(
        megalodon.MegalodonConfig(**SMALL, chunk_len=8, cema_ndim=4, norm_num_groups=4)
    ),
    "fam": lambda: fam.FamForCausalLM(fam.FamConfig(**SMALL, block_len=8, fam_len=2)),
    "beacon": lambda: beacon.BeaconForCausalLM(
        beacon.BeaconConfig(**SMALL, num_key_value_heads=2, window_len=8, condensing_ratio=4)
    ),
}

# runs in a fresh interpreter in which every `import slm...` fails
HIDDEN_SLM = r"""
import json, sys
class HideSlm:
    def find_spec(self, name, path=None, target=None):
        if name == "slm" or name.startswith("slm."):
            raise ImportError(f"{name} is hidden in this test")
sys.meta_path.insert(0, HideSlm())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name, directory in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    ids = torch.load(directory + "/ids.pt")
    with torch.no_grad():
        out[name] = {"logits": model(ids).logits.tolist(), "class": type(model).__module__}
    if name == "infini":  # a model loaded this way saves and loads again
        model.save_pretrained(directory + "-again")
        AutoModelForCausalLM.from_pretrained(directory + "-again", trust_remote_code=True)
        out[name]["tokens"] = AutoTokenizer.from_pretrained(directory)("pass key 123")["input_ids"]
open(sys.argv[2], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_demo):
    root, dirs = tmp_path_factory.mktemp("exports"), {}
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo.tokenizer)
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        torch.save(tokens(VOCAB, 2, 19, seed=3), root / name / "ids.pt")
        dirs[name] = str(root / name)
    # a grafted export too
    LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)).save_pretrained(root / "llama")
    build_model(
        ModelConfig(backbone="fam", init_from=str(root / "llama"), options={"block_len": 8}), VOCAB
    ).save_pretrained(root / "graft")
    torch.save(tokens(VOCAB, 2, 19, seed=4), root / "graft" / "ids.pt")
    dirs["graft"] = str(root / "graft")
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules")}
    result = root / "remote.json"
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_SLM, json.dumps(dirs), str(result)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dirs, json.loads(result.read_text()), tokenizer


@pytest.mark.parametrize("name", [*MODELS, "graft"])
def test_export_loads_without_slm_and_matches(exports, name):
    dirs, remote, _ = exports
    assert remote[name]["class"].startswith("transformers_modules.")  # the exported code, not slm's
    mine = AutoModelForCausalLM.from_pretrained(dirs[name]).eval()  # with slm imported: slm's own class
    assert type(mine).__module__.startswith("slm.models.")
    with torch.no_grad():
        logits = mine(torch.load(dirs[name] + "/ids.pt")).logits
    assert (torch.tensor(remote[name]["logits"], dtype=logits.dtype) - logits).abs().max() < 1e-6


def test_export_files_and_auto_map(exports):
    dirs, remote, tokenizer = exports
    config = json.loads(Path(dirs["beacon"] + "/config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_slm_beacon.BeaconConfig",
        "AutoModelForCausalLM": "modeling_slm_beacon.BeaconForCausalLM",
    }
    names = sorted(os.listdir(dirs["beacon"]))
    assert {"modeling_slm_beacon.py", *(f"slm_{m}.py" for m in SHARED_MODULES)} <= set(names)
    assert remote["infini"]["tokens"] == tokenizer("pass key 123")["input_ids"]


@pytest.mark.parametrize("backbone", ["infini", "megalodon", "fam", "beacon"])
def test_exported_code_is_the_package_module_made_standalone(backbone):
    module = slm.models.get_backbone(backbone).model_cls.__module__
    code = standalone_source(module)
    imports = [line for line in code.splitlines() if line.startswith(("from ", "import "))]
    assert (
        not [line for line in imports if line.startswith(("from slm", "import slm"))]
        and "register_backbone(" not in code
    )
    assert any(line.startswith("from .slm_layers import") for line in imports)
    original = Path(sys.modules[module].__file__).read_text()
    body = [line for line in original.splitlines() if not line.startswith(("from slm", "register_backbone", "    "))]
    kept = code.splitlines()
    assert all(line in kept for line in body if line.startswith(("class ", "def ")))  # every class and function kept
