"""The model config: presets, validation, dict round trip."""

import pytest

from helpers.config import ModelConfig, model_preset


@pytest.mark.parametrize("name", ["faces", "demo"])
def test_presets_round_trip_through_a_dict(name):
    cfg = model_preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolutions == [64, 128, 256]


def test_faces_preset_has_the_reference_sizes():
    cfg = model_preset("faces")
    assert (cfg.text_dim, cfg.z_dim, cfg.cond_dim, cfg.ng, cfg.nd, cfg.num_stages) == (512, 100, 128, 1024, 64, 3)
    assert cfg.stage_channels == [64, 32, 16]


def test_overrides_and_errors():
    assert model_preset("demo", num_stages=1).resolutions == [64]
    with pytest.raises(ValueError, match="unknown preset"):
        model_preset("huge")
    with pytest.raises(ValueError, match="num_stages must be 1, 2 or 3"):
        ModelConfig(num_stages=4)
    with pytest.raises(ValueError, match="multiple of 128"):
        ModelConfig(ng=100)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"ng": 1024, "colour": 3})
