"""train.compile and train.activation_checkpointing (slm.training.speed): the same losses as the plain model on
CPU, refusals in one line where a backbone or the compiler cannot."""

from __future__ import annotations

import pytest

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.models import build_model
from slm.models.registry import BACKBONES
from slm.stages import reference
from slm.training.metrics import read_metrics
from slm.training.speed import checkpointing_backbones, compile_errors, enable_activation_checkpointing
from tests.conftest import TINY_MODEL
from tests.test_pretrain_eval import SEGMENT_OPTIONS

SHORT = dict(max_steps=3, checkpoint_every=3, eval_every=100, log_every=3, final_eval="sample")


def losses(cfg) -> list[float]:
    return [m["loss"] for m in read_metrics(reference.run(cfg)["outputs"]["metrics"])]


def no_validation(cfg):
    """Without held-out rows: no eval-mode forward, so a compiled model compiles one graph only."""
    return cfg.model_copy(update={"validation": None})


def test_activation_checkpointing_recomputes_each_layer_and_gives_the_same_losses(tiny_reference_cfg, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    plain_forward = modeling_llama.LlamaMLP.forward  # inside the checkpointed layer (not the layer's own forward)

    def counted(self, *args, **kwargs):
        calls.append(None)
        return plain_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    plain = losses(no_validation(tiny_reference_cfg("plain", **SHORT)))
    plain_calls = len(calls)
    calls.clear()
    checkpointed = losses(no_validation(tiny_reference_cfg("ac", activation_checkpointing=True, **SHORT)))
    # each layer runs again in backward: twice the MLP calls of the plain run (3 steps x 2 layers each)
    assert plain_calls == 3 * TINY_MODEL["num_layers"] and len(calls) == 2 * plain_calls
    assert checkpointed == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("backbone", [b for b in SEGMENT_OPTIONS if b != "llama"])
def test_activation_checkpointing_is_refused_by_name_where_a_backbone_lacks_it(backbone):
    model = build_model(
        ModelConfig(**TINY_MODEL, backbone=backbone, options=SEGMENT_OPTIONS[backbone]), vocab_size=64, seed=0
    )
    with pytest.raises(
        SlmError,
        match=rf"backbone '{backbone}' \(\w+\) does not support activation checkpointing; "
        r"backbones that do: llama; set train.activation_checkpointing=false",
    ):
        enable_activation_checkpointing(model)


def test_every_registered_backbone_is_known_to_support_checkpointing_or_not():
    """A new backbone that adds `supports_gradient_checkpointing` joins the list the refusal names."""
    assert set(BACKBONES) == set(SEGMENT_OPTIONS)
    assert checkpointing_backbones() == ["llama"]


def test_activation_checkpointing_refusal_stops_the_stage_before_training(tiny_reference_cfg):
    cfg = tiny_reference_cfg("infini-ac", activation_checkpointing=True, **SHORT)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": "infini"})})
    with pytest.raises(SlmError, match=r"train.activation_checkpointing: backbone 'infini'"):
        reference.run(cfg)


def test_compile_gives_the_same_losses_and_keeps_the_plain_weights(tiny_reference_cfg):
    """torch.compile (inductor, on this CPU) of the decoder: the losses of the eager model to 1e-5, and the exported
    model's weights under their plain names."""
    import torch._dynamo
    from safetensors.torch import load_file

    torch._dynamo.reset()
    plain = reference.run(no_validation(tiny_reference_cfg("eager", **SHORT)))
    compiled = reference.run(no_validation(tiny_reference_cfg("compiled", compile=True, **SHORT)))
    a, b = (read_metrics(r["outputs"]["metrics"]) for r in (plain, compiled))
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    wa, wb = (load_file(f"{r['outputs']['model']}/model.safetensors") for r in (plain, compiled))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)


def test_a_backend_that_cannot_compile_is_refused_in_one_line(tiny_reference_cfg, monkeypatch, tmp_path):
    """Inductor without a working C++ compiler (here: one that does not exist, caches off) fails at the first
    forward; train.compile turns that into one line naming the backbone, the device and the way out."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from slm.config import TrainConfig

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    model = build_model(ModelConfig(**TINY_MODEL), vocab_size=64, seed=0)
    model.get_decoder().compile()
    from slm.models.token_loss import token_losses

    with pytest.raises(SlmError) as err, compile_errors(TrainConfig(compile=True), model):
        token_losses(model, torch.randint(0, 64, (2, 16)))
    message = str(err.value)
    assert message.startswith("train.compile: torch.compile (inductor, torch ") and "\n" not in message
    assert "cannot compile the 'llama' model on cpu: " in message and message.endswith("set train.compile=false")
    torch._dynamo.reset()


FLASH_OPTIONS = {**SEGMENT_OPTIONS, "megalodon": {**SEGMENT_OPTIONS["megalodon"], "z_dim": 32, "value_dim": 32}}


@pytest.mark.parametrize("backbone", list(SEGMENT_OPTIONS))
def test_attention_goes_through_sdpa_and_its_fused_kernel(backbone, monkeypatch):
    """Every backbone's softmax attention is F.scaled_dot_product_attention with 4-D inputs, and a training forward
    and backward runs with SDPA restricted to its flash kernel (CPU's flash takes the masks that fam and beacon pass;
    on CUDA those go to the memory-efficient kernel). Megalodon's Q/K width differs from its value width by default,
    which flash does not take: checked with equal widths, and its default inputs are 4-D."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slm.models.token_loss import token_losses

    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        shapes.append((q.dim(), k.dim(), v.dim()))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    for options in (SEGMENT_OPTIONS[backbone], FLASH_OPTIONS[backbone]):
        shapes.clear()
        model = build_model(ModelConfig(**TINY_MODEL, backbone=backbone, options=options), vocab_size=64, seed=0)
        if options is FLASH_OPTIONS[backbone]:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                token_losses(model, ids).nanmean().backward()
        else:
            token_losses(model, ids).nanmean().backward()
        assert shapes and set(shapes) == {(4, 4, 4)}, (backbone, shapes)
