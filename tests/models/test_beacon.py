"""What only the `beacon` backbone has (Activation Beacon): beacons that carry earlier windows, the
stepwise-expansion window mask, beacon projections copied from the regular ones (CPU, tiny sizes,
float64 for equivalences). The properties every backbone shares are in test_backbone_properties.py."""

import torch
from backbone_cases import CASES
from helpers import change_token, llama_copy, tokens

import slm.models.beacon as bcn
from slm.models.beacon import BeaconForCausalLM

CASE = CASES["beacon"]
V = CASE.vocab
make_model = CASE.make


@torch.no_grad()
def test_beacons_change_the_model_and_carry_information():
    model = make_model()
    ids = tokens(V, 1, 32, seed=6)
    llama = llama_copy(model)
    ours, ref = model(ids).logits, llama(ids).logits
    assert (ours[:, :8] - ref[:, :8]).abs().max() < 1e-8  # first window: no memory yet = plain attention
    assert (ours[:, 8:] - ref[:, 8:]).abs().max() > 1e-3  # later windows see beacons, not raw tokens
    ids2 = change_token(ids, 2, V)
    later = model(ids2).logits
    assert (later[:, 24:] - ours[:, 24:]).abs().max() > 1e-6  # window 0 reaches window 3 only through beacons


@torch.no_grad()
def test_window_mask_stepwise_expansion():
    m = bcn.window_mask(n_mem=3, n_old=0, n_raw=4, n_beacons=2, ratio=2, device="cpu")
    assert m.shape == (6, 3 + 4 + 2)
    assert m[:, :3].all()  # everyone sees the memory
    assert torch.equal(m[:4, 3:7], torch.ones(4, 4, dtype=torch.bool).tril())  # raw: causal within the window
    assert not m[:4, 7:].any()  # raw tokens never see the window's own beacons
    assert m[4, 3:].tolist() == [True, True, False, False, True, False]  # beacon 0: raw 0-1, itself
    assert m[5, 3:].tolist() == [True, True, True, True, True, True]  # beacon 1: raw 0-3, beacons 0-1
    m = bcn.window_mask(n_mem=0, n_old=5, n_raw=2, n_beacons=0, ratio=2, device="cpu")
    assert m.tolist() == [[True] * 6 + [False], [True] * 7]


def test_beacon_projections_start_as_copies():
    torch.manual_seed(0)
    attn = BeaconForCausalLM(CASE.config()).model.layers[1].self_attn
    for p in ("q", "k", "v", "o"):
        assert torch.equal(getattr(attn, f"beacon_{p}_weight"), getattr(attn, f"{p}_proj").weight)
        assert getattr(attn, f"beacon_{p}_weight") is not getattr(attn, f"{p}_proj").weight  # copied, not tied
