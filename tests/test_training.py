"""The DeepSpeed engine through `slm reference`: learning, resume, export, guards, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slm.errors import SlmError
from slm.stages import reference
from slm.training.ds_config import deepspeed_config
from slm.training.metrics import read_metrics
from tests.conftest import TINY_MODEL


def weights(model_dir):
    return load_file(f"{model_dir}/model.safetensors")


def test_heldout_loss_falls_and_outputs_are_written(tiny_reference_cfg):
    cfg = tiny_reference_cfg(max_steps=12, eval_every=4, optim=dict(lr=1e-2, warmup_steps=2))
    record = reference.run(cfg)
    heldout = [
        m["heldout_loss"] for m in read_metrics(f"{cfg.out_dir}/metrics.jsonl") if m.get("heldout_loss") is not None
    ]
    assert len(heldout) == 3 and heldout[-1] < heldout[0] - 0.5
    stage = json.loads(Path(f"{cfg.out_dir}/stage.json").read_text())
    assert stage["status"] == "complete"
    # the eval points use a sample of the validation file, the final figure all of it (tests/test_heldout_sample.py)
    assert stage["metrics"]["final_heldout_rows"] == stage["metrics"]["validation_rows"] > 8
    assert abs(stage["metrics"]["final_heldout_loss"] - heldout[-1]) < 0.5
    assert Path(f"{cfg.out_dir}/learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["outputs"]["model"].endswith("model")


def test_resume_after_kill_equals_uninterrupted(tiny_reference_cfg):
    whole = reference.run(tiny_reference_cfg("whole", max_steps=7, checkpoint_every=2))
    cfg = tiny_reference_cfg("killed", max_steps=7, checkpoint_every=2)
    stopped = reference.run(cfg, stop_after=5)  # as if killed during step 6: newest checkpoint is step 4
    assert stopped == {"status": "stopped", "step": 5}
    resumed = reference.run(cfg)
    assert resumed["metrics"]["resumed_from"] == 4
    a, b = weights(whole["outputs"]["model"]), weights(resumed["outputs"]["model"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # the same data order: identical per-step losses, steps 1..7 each logged once
    la, lb = read_metrics(f"{whole['outputs']['metrics']}"), read_metrics(f"{resumed['outputs']['metrics']}")
    assert [m["step"] for m in lb] == list(range(1, 8))
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], abs=1e-6)


def test_export_loads_with_automodel_and_gives_same_logits(tiny_reference_cfg):
    cfg = tiny_reference_cfg(max_steps=2)
    record = reference.run(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(record["outputs"]["model"]).eval()
    from slm.models import build_model

    fresh = build_model(cfg.model, loaded.config.vocab_size)
    fresh.load_state_dict(loaded.state_dict())
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, fresh.eval()(x).logits)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(record["outputs"]["model"])) == loaded.config.vocab_size


def test_rerun_after_success_skips_and_force_redoes(tiny_reference_cfg):
    from pathlib import Path

    cfg = tiny_reference_cfg(max_steps=2)
    first = reference.run(cfg)
    weights_file = Path(first["outputs"]["model"]) / "model.safetensors"
    written = weights_file.stat().st_mtime_ns
    again = reference.run(cfg)
    assert again == first and weights_file.stat().st_mtime_ns == written  # skipped: nothing rewritten
    marker = Path(cfg.out_dir) / "left-by-the-first-run"
    marker.write_text("x")
    redone = reference.run(cfg, force=True)
    assert not marker.exists() and redone["status"] == "complete" and redone["metrics"]["resumed_from"] is None


def test_checkpoint_of_other_data_is_refused(tiny_reference_cfg, tiny_demo):
    cfg = tiny_reference_cfg(max_steps=6, checkpoint_every=2)
    reference.run(cfg, stop_after=2)
    other = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"path": str(tiny_demo.validation)})})
    with pytest.raises(SlmError, match=r"checkpoint belongs to another run; differs in .*data"):
        reference.run(other)


def test_finished_output_of_another_config_is_refused(tiny_reference_cfg):
    cfg = tiny_reference_cfg(max_steps=2)
    reference.run(cfg)
    with pytest.raises(SlmError, match="holds a finished reference run with another config; use --force"):
        reference.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})}))


def nan_from_step(first_bad: int, grad_accum: int = 1, only_micro: int | None = None):
    """The plain causal-LM step, whose loss turns NaN from optimizer step `first_bad` on (only in micro-step
    `only_micro` of that step, when given): through the model's graph, as a real divergence would."""
    from slm.training.loop import causal_lm_step

    calls = []

    def step(model, batch):
        calls.append(None)
        loss, extra = causal_lm_step(model, batch)
        step_no, micro = (len(calls) - 1) // grad_accum + 1, (len(calls) - 1) % grad_accum
        if step_no > first_bad or (step_no == first_bad and only_micro in (None, micro)):
            loss = loss * float("nan")
        return loss, extra

    return step


def test_non_finite_loss_stops_with_a_clear_message(tiny_reference_cfg, monkeypatch):
    import slm.stages.reference as stage

    monkeypatch.setattr(stage, "causal_lm_step", nan_from_step(1))
    with pytest.raises(SlmError, match=r"loss is nan at step 1 \(non-finite\)"):
        reference.run(tiny_reference_cfg(max_steps=2))


def test_non_finite_loss_mid_interval_stops_before_a_checkpoint_holds_it(tiny_reference_cfg, monkeypatch):
    """The guard reads the losses once per log_every steps and before every checkpoint: a NaN in one micro-step of
    step 5 (logged at step 8) stops the run at the step-6 checkpoint, which is never written; metrics.jsonl keeps
    steps 1-4, the step-3 checkpoint is intact, and the rerun resumes from it."""
    import slm.stages.reference as stage
    from slm.training.checkpoint import whole_checkpoints

    cfg = tiny_reference_cfg("nan", max_steps=8, log_every=4, checkpoint_every=3, eval_every=100, grad_accum=2)
    monkeypatch.setattr(stage, "causal_lm_step", nan_from_step(5, grad_accum=2, only_micro=1))
    with pytest.raises(SlmError, match=r"loss is nan at step 5 \(non-finite\)") as err:
        reference.run(cfg)
    assert "\n" not in str(err.value)
    ckpts = Path(cfg.out_dir) / "checkpoints"
    assert [p.name for p in whole_checkpoints(ckpts)] == ["step-00000003"]
    assert not any("00000006" in p.name for p in ckpts.iterdir())  # not even a partial one
    assert [m["step"] for m in read_metrics(f"{cfg.out_dir}/metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.undo()
    resumed = reference.run(cfg)
    assert resumed["metrics"]["resumed_from"] == 3
    assert all(torch.isfinite(w).all() for w in weights(resumed["outputs"]["model"]).values())


def test_losses_read_once_per_interval_equal_the_per_step_reads(tiny_reference_cfg):
    """log_every=4 reads the device once per 4 steps; its metrics.jsonl has one line per step with the losses,
    learning rates, token counts and held-out figures of log_every=1 (a read every step), and the same keys but
    for tokens_per_s, which only logging steps carry."""
    every = read_metrics(reference.run(tiny_reference_cfg("every", max_steps=7, grad_accum=2))["outputs"]["metrics"])
    batched = reference.run(tiny_reference_cfg("batched", max_steps=7, grad_accum=2, log_every=4))
    batched = read_metrics(batched["outputs"]["metrics"])
    assert [m["step"] for m in batched] == [m["step"] for m in every] == list(range(1, 8))
    assert [m["loss"] for m in batched] == pytest.approx([m["loss"] for m in every], abs=1e-6)
    assert [m["step"] for m in batched if "tokens_per_s" in m] == [4, 7]
    for a, b in zip(every, batched):
        assert set(a) - {"tokens_per_s"} == set(b) - {"tokens_per_s"}
        for k in set(a) - {"tokens_per_s", "loss"}:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_vocab_mismatch_between_tokenizer_and_checkpoint(tiny_reference_cfg, tmp_path):
    from slm.config import ModelConfig
    from slm.models import build_model

    # the tiny sizes (explicit sizes that disagree with init_from are refused first), a vocab of 50
    small = build_model(ModelConfig(**TINY_MODEL), vocab_size=50)
    small.save_pretrained(tmp_path / "small")
    cfg = tiny_reference_cfg(max_steps=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(tmp_path / "small")})})
    with pytest.raises(
        SlmError, match=r"vocabulary mismatch: tokenizer .* has \d+ tokens, the model's embedding has 50"
    ):
        reference.run(cfg)


def test_continue_from_a_checkpoint_starts_where_it_ended(tiny_reference_cfg):
    base = reference.run(tiny_reference_cfg("base", max_steps=10, optim=dict(lr=1e-2, warmup_steps=2)))
    cfg = tiny_reference_cfg("continued", max_steps=2, eval_every=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": base["outputs"]["model"]})})
    cont = reference.run(cfg)
    fresh = reference.run(tiny_reference_cfg("fresh", max_steps=2, eval_every=1))
    assert (
        read_metrics(cont["outputs"]["metrics"])[0]["heldout_loss"]
        < read_metrics(fresh["outputs"]["metrics"])[0]["heldout_loss"] - 0.5
    )


def test_zero3_trains_and_exports(tiny_reference_cfg):
    record = reference.run(tiny_reference_cfg("z3", max_steps=3, zero_stage=3))
    loaded = AutoModelForCausalLM.from_pretrained(record["outputs"]["model"])
    assert all(p.numel() > 0 for p in loaded.parameters())


def test_deepspeed_config_follows_the_typed_config():
    from slm.config import TrainConfig

    cfg = TrainConfig.model_validate(
        dict(
            micro_batch_size=3,
            grad_accum=4,
            zero_stage=2,
            max_steps=50,
            optim=dict(lr=1e-3, warmup_steps=5, grad_clip=0.5),
        )
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5 and ds["scheduler"]["params"]["total_num_steps"] == 50
    # precision auto: bf16 autocast on a GPU, fp32 on CPU; DeepSpeed's bf16-weights mode never
    assert ds["torch_autocast"] == {"enabled": torch.cuda.is_available(), "dtype": "bfloat16"}
    assert ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_is_autocast_through_deepspeed_with_fp32_weights(tiny_reference_cfg, monkeypatch, zero):
    """precision bf16 (here on CPU, as a GPU would run it): the forward's matrix products run in bf16 under
    DeepSpeed's torch_autocast while weights, gradients and AdamW states stay fp32; AdamW has taken exactly one step
    per optimizer step (DeepSpeed's bf16-weights mode with ZeRO 0 takes one more at start), and the losses follow the
    fp32 run's within bf16's precision."""
    from transformers.models.llama import modeling_llama

    from slm.training import loop

    seen = {}
    plain_forward = modeling_llama.LlamaMLP.forward

    def forward(self, x):
        out = plain_forward(self, x)
        seen.setdefault("mlp_out", out.dtype)
        return out

    plain_fit = loop.Trainer.fit

    def fit(self, resume=True):
        result = plain_fit(self, resume)
        inner = self.engine.optimizer
        while not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer  # ZeRO's optimizer wraps the torch AdamW
        seen["adam_steps"] = {int(st["step"]) for st in inner.state.values()}
        seen["weights"] = {p.dtype for p in self.model.parameters()}
        return result

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    monkeypatch.setattr(loop.Trainer, "fit", fit)
    train = dict(max_steps=6, checkpoint_every=6, log_every=6, eval_every=100, zero_stage=zero)
    train["optim"] = dict(lr=1e-2, warmup_steps=1)
    fp32 = reference.run(tiny_reference_cfg(f"fp32-{zero}", precision="fp32", **train))
    assert seen.pop("mlp_out") == torch.float32
    bf16 = reference.run(tiny_reference_cfg(f"bf16-{zero}", precision="bf16", **train))
    assert seen["mlp_out"] == torch.bfloat16 and seen["weights"] == {torch.float32} and seen["adam_steps"] == {6}
    a, b = (read_metrics(r["outputs"]["metrics"]) for r in (fp32, bf16))
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=5e-3)
    assert {w.dtype for w in weights(bf16["outputs"]["model"]).values()} == {torch.float32}  # exported as trained


def test_checkpoint_restores_each_ranks_random_generators(tmp_path):
    """Every rank saves its own generator states (DeepSpeed's client state is rank 0's only) and gets them back."""
    import random

    import deepspeed
    import numpy as np

    from slm.config import TrainConfig
    from slm.training.checkpoint import load_latest, rng_file, save_checkpoint
    from slm.training.distributed import init_distributed

    init_distributed()
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=deepspeed_config(TrainConfig(), 1)
    )
    fingerprints = {"data": "d1"}
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    saved = save_checkpoint(engine, tmp_path, 3, {"step": 3, "fingerprints": fingerprints}, keep=2)
    assert rng_file(saved, 0).is_file()
    after_save = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert load_latest(engine, tmp_path, fingerprints)["step"] == 3
    after_load = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(after_load[0], after_save[0], rtol=0, atol=0)
    assert np.array_equal(after_load[1], after_save[1]) and after_load[2] == after_save[2]

    rng_file(saved, 0).unlink()  # e.g. saved by fewer ranks than resume it
    with pytest.raises(SlmError, match=r"step-00000003: no random-generator state for rank 0 \(rng-rank00000.pt\)"):
        load_latest(engine, tmp_path, fingerprints)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_checkpoints_resume_through_the_weights_only_reader(tiny_reference_cfg, zero):
    """DeepSpeed's ZeRO optimizer files hold a few of its own classes (loss scaler, fragment map, stage enum):
    TRUSTED_GLOBALS lets the weights-only reader rebuild them, and resume continues from the checkpoint."""
    cfg = tiny_reference_cfg(f"z{zero}", max_steps=3, checkpoint_every=2, zero_stage=zero)
    reference.run(cfg, stop_after=2)
    assert reference.run(cfg)["metrics"]["resumed_from"] == 2


class _RunsCode:
    """A pickle payload: unpickling it runs `touch <path>` (what a foreign checkpoint file could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("planted", ["rng-rank00000.pt", "mp_rank_00_model_states.pt"])
def test_foreign_pickle_in_a_checkpoint_is_refused_and_never_run(tiny_reference_cfg, tmp_path, planted, capsys):
    """Resume reads every checkpoint file with torch.load(weights_only=True): a pickle that calls os.system
    is refused in one line naming the file and the call, and the call never happens."""
    from slm import cli
    from slm.training.checkpoint import UntrustedCheckpoint, safe_torch_load, whole_checkpoints

    cfg = tiny_reference_cfg("planted", max_steps=4, checkpoint_every=2)
    reference.run(cfg, stop_after=2)
    (latest,) = whole_checkpoints(tmp_path / "planted" / "checkpoints")
    assert set(safe_torch_load(latest / "rng-rank00000.pt")) == {"torch", "numpy", "python"}  # tensors and numbers
    ran = tmp_path / "it-ran"
    torch.save({"module": _RunsCode(ran)}, latest / planted)

    with pytest.raises(UntrustedCheckpoint, match=rf"{planted}: refused to load: it asks to run posix.system") as err:
        reference.run(cfg)
    assert "weights_only=True" in str(err.value) and "\n" not in str(err.value)
    assert not ran.exists()

    config = tmp_path / "planted.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert cli.run_cli(["reference", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"{planted}: refused to load" in lines[-1]
    assert not ran.exists()

    torch.load(latest / planted, weights_only=False)  # the control: a plain pickle load runs the payload
    assert ran.exists()


ZERO3_OPTIONS = {
    "infini": {"segment_len": 16},
    "megalodon": {"chunk_len": 16, "cema_ndim": 4, "norm_num_groups": 4},
    "fam": {"block_len": 16, "fam_len": 4},
    "beacon": {"window_len": 16, "condensing_ratio": 4},
}


@pytest.mark.parametrize("backbone", sorted(ZERO3_OPTIONS))
def test_zero3_trains_every_backbone(tiny_reference_cfg, backbone):
    """ZeRO-3 partitions every parameter: a backbone that reads a weight outside its module's forward (which
    gathers it) sees an empty tensor. Each trains two steps to a finite loss and exports whole weights."""
    cfg = tiny_reference_cfg(f"z3-{backbone}", max_steps=2, eval_every=2, checkpoint_every=2, zero_stage=3)
    model = cfg.model.model_copy(update={"backbone": backbone, "options": ZERO3_OPTIONS[backbone]})
    record = reference.run(cfg.model_copy(update={"model": model}))
    assert math.isfinite(record["metrics"]["final_heldout_loss"])
    loaded = AutoModelForCausalLM.from_pretrained(record["outputs"]["model"], trust_remote_code=True)
    assert all(p.numel() > 0 for p in loaded.parameters())
