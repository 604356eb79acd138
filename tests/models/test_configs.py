"""The streaming backbones' configs share StreamingConfig: the same size keys, checked the same way."""

from __future__ import annotations

import pytest

from slm.models.beacon import BeaconConfig
from slm.models.config_base import StreamingConfig
from slm.models.fam import FamConfig
from slm.models.infini import InfiniConfig
from slm.models.megalodon import MegalodonConfig

CONFIGS = [InfiniConfig, MegalodonConfig, FamConfig, BeaconConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("hidden_size", True, "hidden_size=True: must be an integer >= 1"),
        ("num_hidden_layers", 0, "num_hidden_layers=0: must be an integer >= 1"),
        ("max_position_embeddings", 2.5, "max_position_embeddings=2.5: must be an integer >= 1"),
        ("rope_theta", "x", "rope_theta='x': must be a positive number"),
        ("rms_norm_eps", 0.0, "rms_norm_eps=0.0: must be a positive number"),
        ("initializer_range", -0.1, "initializer_range=-0.1: must be >= 0"),
    ],
)
def test_shared_size_keys_are_checked_alike(cls, key, value, expected):
    assert issubclass(cls, StreamingConfig)
    with pytest.raises(ValueError, match="^" + expected.replace("(", r"\(").replace(".", r"\.")):
        cls(**{key: value})


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_build_and_round_trip(cls, tmp_path):
    config = cls()
    config.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict() and again.num_key_value_heads >= 1
