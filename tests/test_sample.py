"""Sampling: seeded determinism, shapes per stage, bad inputs, the command line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.__main__ import main
from helpers.checkpoint import CheckpointError
from helpers.clip_encoder import LongPromptWarning
from helpers.config import ModelConfig
from helpers.errors import UserError
from helpers.network import build_models
from helpers import sample
from helpers.sample import (
    MAX_IMAGES,
    generate,
    interpolate_prompts,
    load_generator,
    sample_noise,
    save_generator,
    select_stages,
    slerp,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The woman has blond hair.", "The man has a beard and wears eyeglasses."]


def _size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, its file closed again."""
    with Image.open(path) as image:
        return image.size


def make_checkpoint(path, *, num_stages=3, text_dim=32, seed=0):
    """A sampling export of a random tiny generator (CLIP spec tiny-random, dim 32)."""
    cfg = ModelConfig(text_dim=text_dim, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=num_stages)
    generator, _ = build_models(cfg, seed=seed)
    with torch.no_grad():  # larger weights than the init, so different noise gives visibly different images
        for p in generator.parameters():
            p.mul_(10.0) if p.ndim > 1 else None
    return save_generator(path, generator, clip_spec="tiny-random", step=3)


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "g3.pt", num_stages=3)


@pytest.fixture(scope="module")
def ckpt1(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "g1.pt", num_stages=1)


@pytest.fixture(scope="module")
def model3(ckpt3):
    return load_generator(ckpt3, device="cpu")


# --------------------------------------------------------------------------- loading


def test_load_generator_gives_eval_mode_and_metadata(model3):
    assert not model3.generator.training
    assert all(not m.training for m in model3.generator.modules())
    assert not any(p.requires_grad for p in model3.generator.parameters())
    assert model3.clip_spec == "tiny-random" and model3.step == 3 and model3.num_stages == 3
    assert model3.device == torch.device("cpu")


def test_demo_model_not_built_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "DEMO_GENERATOR", tmp_path / "demo_generator.pt")
    with pytest.raises(UserError, match="build-demo.*--checkpoint"):
        load_generator(None)


def test_missing_truncated_and_foreign_checkpoints(tmp_path, ckpt1):
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(ckpt1).read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_generator(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        load_generator(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_generator(foreign)


def test_text_dim_mismatch_is_a_clear_error(tmp_path):
    path = make_checkpoint(tmp_path / "g16.pt", num_stages=1, text_dim=16)
    with pytest.raises(UserError, match="16-d text features.*32-d"):
        generate("a face", model=path, device="cpu")


# --------------------------------------------------------------------------- determinism


def test_shapes_and_range_for_every_stage_count(ckpt1, model3, tmp_path):
    model2 = load_generator(make_checkpoint(tmp_path / "g2.pt", num_stages=2), device="cpu")
    for model, sizes in ((ckpt1, [64]), (model2, [64, 128]), (model3, [64, 128, 256])):
        images = generate(PROMPTS, n=2, seed=0, model=model, device="cpu")
        assert [tuple(i.shape) for i in images] == [(4, 3, s, s) for s in sizes]
        assert all(i.device.type == "cpu" and i.dtype == torch.float32 for i in images)
        assert all(i.min() >= -1 and i.max() <= 1 for i in images)


def test_same_prompt_and_seed_give_the_same_image(model3):
    a = generate(PROMPTS[0], n=2, seed=11, model=model3)
    b = generate(PROMPTS[0], n=2, seed=11, model=model3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = generate(PROMPTS[0], n=2, seed=12, model=model3)
    assert not torch.equal(a[-1], c[-1])
    assert torch.allclose(a[-1][1], c[-1][0], atol=1e-3)  # seed 11 + 1 == seed 12 + 0


def test_image_does_not_depend_on_the_rest_of_the_batch(model3):
    batch = generate(PROMPTS, n=3, seed=5, model=model3)  # prompt-major: image 1 * 3 + 2 is prompt 1, seed 7
    alone = generate(PROMPTS[1], n=1, seed=7, model=model3)
    chunked = generate(PROMPTS, n=3, seed=5, model=model3, batch_size=2)
    for stage in range(3):
        assert torch.allclose(batch[stage][5], alone[stage][0], atol=1e-3)  # float rounding only
        assert torch.allclose(batch[stage], chunked[stage], atol=1e-3)
    assert not torch.allclose(batch[-1][0], batch[-1][3], atol=1e-3)  # same seed, other prompt


def test_sample_noise_rows_depend_only_on_their_seed():
    z, eps = sample_noise([3, 4, 5], z_dim=6, cond_dim=4)
    z1, eps1 = sample_noise([4], z_dim=6, cond_dim=4)
    assert torch.equal(z[1], z1[0]) and torch.equal(eps[1], eps1[0])
    zt, et = sample_noise(range(50), z_dim=16, cond_dim=4, truncation=0.5)
    assert zt.abs().max() <= 0.5 and et.abs().max() <= 0.5 and zt.std() > 0.1
    with pytest.raises(UserError, match="truncation"):
        sample_noise([0], z_dim=2, cond_dim=2, truncation=0.0)


def test_slerp_stays_on_the_sphere_and_hits_the_ends():
    a, b = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 32)
    assert torch.allclose(path.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(slerp(a, a, [0.0, 0.5]), a.expand(2, -1), atol=1e-5)


def test_interpolation_uses_fixed_noise_and_ends_at_the_prompts(model3):
    strip = interpolate_prompts(PROMPTS[0], PROMPTS[1], steps=3, seed=4, model=model3)
    assert [tuple(i.shape) for i in strip] == [(3, 3, 64, 64), (3, 3, 128, 128), (3, 3, 256, 256)]
    ends = generate(PROMPTS, n=1, seed=4, model=model3)
    assert torch.allclose(strip[-1][0], ends[-1][0], atol=1e-4)
    assert torch.allclose(strip[-1][2], ends[-1][1], atol=1e-4)
    with pytest.raises(UserError, match="steps"):
        interpolate_prompts(PROMPTS[0], PROMPTS[1], steps=1, model=model3)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("prompts", ["", "   ", [], ["a face", ""]])
def test_empty_prompts_are_refused(model3, prompts):
    with pytest.raises(UserError, match="empty|no prompt"):
        generate(prompts, model=model3)


def test_long_prompt_is_truncated_with_a_visible_warning(model3):
    long_prompt = "The woman has blond hair and wears eyeglasses. " * 12
    with pytest.warns(LongPromptWarning, match="77"):
        images = generate(long_prompt, seed=0, model=model3)
    assert images[-1].shape[0] == 1


@pytest.mark.parametrize("n", [0, -2, MAX_IMAGES + 1, 2.5])
def test_bad_image_counts_are_refused(model3, n):
    with pytest.raises(UserError, match="number of images|more than"):
        generate("a face", n=n, model=model3)


def test_count_cap_counts_every_prompt(model3):
    with pytest.raises(UserError, match=str(MAX_IMAGES)):
        generate(["a", "b", "c"], n=MAX_IMAGES // 2, model=model3)


def test_stage_selection():
    assert select_stages(None, 3) == [2] and select_stages("all", 2) == [0, 1] and select_stages("2", 3) == [1]
    with pytest.raises(UserError, match="has 1 stage.*stage 3 does not exist"):
        select_stages(3, 1)
    with pytest.raises(UserError):
        select_stages("large", 3)


# --------------------------------------------------------------------------- command line


def test_cli_writes_a_grid_of_the_expected_size(ckpt3, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", PROMPTS[0], "--checkpoint", str(ckpt3), "--n", "2", "--seed", "0", "--no-labels", "--out", str(out)])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _size(out) == (2 * 256 + 3 * 2, 256 + 2 * 2)


def test_cli_stage_panel_labels_and_interpolation(ckpt3, tmp_path, capsys):
    panel = tmp_path / "panel.png"
    assert main(["sample", "a face", "--checkpoint", str(ckpt3), "--stage", "all", "--size", "64",
                 "--seed", "1", "--no-labels", "--out", str(panel)]) == 0
    assert _size(panel) == (3 * 64 + 4 * 2, 64 + 2 * 2)
    labelled = tmp_path / "labelled.png"
    assert main(["sample", *PROMPTS, "--checkpoint", str(ckpt3), "--stage", "1", "--n", "2", "--out", str(labelled)]) == 0
    width, height = _size(labelled)
    assert width == 2 * 64 + 3 * 2 and height > 2 * 64 + 3 * 2  # prompts and seeds written in
    strip = tmp_path / "strip.png"
    assert main(["sample", *PROMPTS, "--interpolate", "--steps", "4", "--stage", "1", "--checkpoint", str(ckpt3),
                 "--no-labels", "--out", str(strip)]) == 0
    assert _size(strip) == (4 * 64 + 5 * 2, 64 + 2 * 2)
    capsys.readouterr()


@pytest.mark.parametrize(
    "args, reason",
    [
        (["", "--n", "1"], "empty"),
        (["a face", "--n", "0"], "positive"),
        (["a face", "--n", "100000"], "more than"),
        (["a face", "--stage", "3"], "stage 3 does not exist"),
        (["a face", "--interpolate"], "two prompts"),
        (["a face", "--seed", "-1"], "seed"),
        (["a face", "--out", "picture.jpg"], r"\.png file"),
    ],
)
def test_cli_bad_input_exits_with_one_line(ckpt1, tmp_path, capsys, monkeypatch, args, reason):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *args, "--checkpoint", str(ckpt1)] + ([] if "--out" in args else ["--out", "x.png"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert re.search(reason, err), err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_missing_checkpoint_and_missing_demo(tmp_path, capsys, monkeypatch):
    assert main(["sample", "a face", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
    monkeypatch.setattr(sample, "DEMO_GENERATOR", tmp_path / "demo_generator.pt")
    assert main(["sample", "a face", "--out", str(tmp_path / "x.png")]) == 2
    assert "build-demo" in capsys.readouterr().err


def test_python_m_helpers_sample_end_to_end(ckpt1, tmp_path):
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "helpers", "sample", "a young woman", "--checkpoint", str(ckpt1),
         "--n", "3", "--no-labels", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "seed" in result.stderr  # a random seed is reported so the picture can be made again
    assert _size(out) == (3 * 64 + 4 * 2, 64 + 2 * 2)
