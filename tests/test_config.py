"""The model config: presets, validation, dict round trip."""

import pytest

from helpers import config
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
    with pytest.raises(ValueError, match=r"num_stages must be one of 1 \(64 px\), 2 \(128 px\), 3 \(256 px\)"):
        ModelConfig(num_stages=4)
    with pytest.raises(ValueError, match="multiple of 128"):
        ModelConfig(ng=100)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"ng": 1024, "colour": 3})


def test_the_stage_schedule_is_one_set_of_numbers():
    assert config.STAGE_CHOICES == (1, 2, 3) and config.stage_resolutions() == [64, 128, 256]
    assert config.STORED_IMAGE_SIZE == config.stage_resolution(config.MAX_STAGES - 1) == 256
    assert config.describe_stages(2) == "1 (64 px), 2 (128 px)"
    with pytest.raises(ValueError, match="stage must be in"):
        config.stage_resolution(config.MAX_STAGES)


def test_no_module_recomputes_the_stage_schedule():
    """Stage sizes, stage counts and the stored size come from helpers.config: adding a stage is a
    change to the config and the networks only. Looks at code, not docstrings (which state shapes)."""
    import ast
    from pathlib import Path

    def schedule_literal(node: ast.AST) -> bool:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):  # 64 * 2**i
            left, right = node.left, node.right
            return (isinstance(left, ast.Constant) and left.value == 64 and isinstance(right, ast.BinOp)
                    and isinstance(right.op, ast.Pow))
        if isinstance(node, (ast.Tuple, ast.List)):  # (1, 2, 3) stage numbers or [64, 128, 256] sizes
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            return values == [64, 128, 256] or (isinstance(node, ast.Tuple) and values == [1, 2, 3])
        return False

    package = Path(config.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py")) if path.name != "config.py"
        for node in ast.walk(ast.parse(path.read_text())) if schedule_literal(node)
    ]
    assert not offenders, offenders
