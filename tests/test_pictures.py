"""Pictures: tensor/PIL conversions, grids, stage panels, previews, interpolation strips, PNG files."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.pictures import (
    PADDING,
    image_grid,
    interpolation_strip,
    png_bytes,
    preview_picture,
    prompt_grid,
    save_png,
    stage_panel,
    tile_grid,
    to_pil,
    to_pil_list,
    to_uint8,
    wrap_text,
)


def images(b, size, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_to_uint8_maps_the_range_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0]).view(1, 1, 5).expand(3, 1, 5)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255, 0, 255]
    assert to_uint8(images(2, 8)).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="3, H, W"):
        to_uint8(torch.zeros(2, 4, 8, 8))


def test_pil_conversions_keep_pixels():
    batch = images(2, 16)
    pil = to_pil(batch[1])
    assert pil.size == (16, 16) and pil.mode == "RGB"
    assert np.array_equal(np.asarray(pil), to_uint8(batch)[1])
    assert [p.size for p in to_pil_list(batch)] == [(16, 16), (16, 16)]
    with pytest.raises(ValueError, match="to_pil_list"):
        to_pil(batch)


def test_save_png_is_atomic_and_round_trips(tmp_path):
    image = images(1, 16)[0]
    path = save_png(image, tmp_path / "sub" / "one.png")
    assert np.array_equal(np.asarray(Image.open(path)), to_uint8(image))
    assert [p.name for p in path.parent.iterdir()] == ["one.png"]  # no temporary file left
    assert png_bytes(to_pil(image)).startswith(b"\x89PNG")


def test_grid_size_without_labels_matches_make_grid():
    grid = image_grid(images(6, 32), cols=3)
    assert grid.size == (3 * 32 + 4 * PADDING, 2 * 32 + 3 * PADDING)
    assert image_grid(images(6, 32), cols=3, size=16).size == (3 * 16 + 4 * PADDING, 2 * 16 + 3 * PADDING)


def test_prompt_grid_rows_are_prompts_and_columns_seeds():
    batch = images(4, 32)
    plain = prompt_grid(batch, ["a", "b"], [7, 8], labels=False)
    labelled = prompt_grid(batch, ["a woman with blond hair", "a man"], [7, 8])
    assert plain.size == (2 * 32 + 3 * PADDING, 2 * 32 + 3 * PADDING)
    assert labelled.width == plain.width and labelled.height > plain.height
    # image p * n + j sits in row p, column j
    tile = np.asarray(plain)[PADDING + 32 + PADDING :][:32, PADDING : PADDING + 32]
    assert np.array_equal(tile, to_uint8(batch)[2])
    with pytest.raises(ValueError, match="3 images for 2 prompts x 2 seeds"):
        prompt_grid(batch[:3], ["a", "b"], [7, 8])


def test_stage_panel_shows_every_stage_at_one_size():
    stages = [images(2, 64), images(2, 128), images(2, 256)]
    panel = stage_panel(stages)
    assert panel.size == (3 * 256 + 4 * PADDING, 2 * 256 + 3 * PADDING)
    small = stage_panel(stages, size=64)
    assert small.size == (3 * 64 + 4 * PADDING, 2 * 64 + 3 * PADDING)
    # the 64 px stage is shown as it is at size 64
    assert np.array_equal(np.asarray(small)[PADDING : PADDING + 64, PADDING : PADDING + 64], to_uint8(stages[0])[0])
    assert stage_panel(stages, size=64, row_labels=["x", "y"]).height > small.height
    with pytest.raises(ValueError, match="different numbers"):
        stage_panel([images(2, 64), images(3, 128)])


def test_interpolation_strip_layout():
    strip = interpolation_strip([images(5, 64)])
    assert strip.size == (5 * 64 + 6 * PADDING, 64 + 2 * PADDING)
    two_rows = interpolation_strip([images(5, 64), images(5, 128)], size=64)
    assert two_rows.size == (5 * 64 + 6 * PADDING, 2 * 64 + 3 * PADDING)
    titled = interpolation_strip([images(5, 64)], prompts=("a woman", "a man"))
    assert titled.width == strip.width and titled.height > strip.height


def test_wrap_text_fits_the_width():
    from helpers.pictures import _text_width

    lines = wrap_text("The woman is young and has blond hair, and arched eyebrows. " * 3, 120, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(_text_width(line) <= 120 for line in lines)
    assert wrap_text("x" * 200, 50)[0].endswith("...")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_stages", [1, 3])
def test_preview_picture_labels_stages_and_captions(batch, num_stages):
    stages = [images(batch, 16 * 2**i, seed=i) for i in range(num_stages)]  # stage i: 16 * 2**i px
    captions = ["The woman is young and has blond hair, and arched eyebrows."] * batch
    size = stages[-1].shape[-1]
    bare = tile_grid([t for s in stages for t in to_pil_list(s)], cols=batch, size=size)  # the same tiles, no labels
    assert bare.size == (batch * size + (batch + 1) * PADDING, num_stages * size + (num_stages + 1) * PADDING)
    picture = preview_picture(stages, captions)
    assert picture.mode == "RGB"
    assert picture.width > bare.width and picture.height > bare.height  # a label column and a caption band
    # the tiles sit as in the bare grid, shifted right by the label column
    shift = picture.width - bare.width
    assert np.array_equal(np.asarray(picture)[: bare.height, shift:], np.asarray(bare))
    # the label column has ink on every row: "16 px", "32 px", ...
    labels = np.asarray(picture)[: bare.height, :shift]
    for r in range(num_stages):
        assert (labels[PADDING + r * (size + PADDING) :][:size] < 128).any()
    # so has the caption band beneath every column
    band = np.asarray(picture)[bare.height :, shift:]
    for c in range(batch):
        assert (band[:, PADDING + c * (size + PADDING) :][:, :size] < 128).any()


def test_preview_picture_size_and_bad_inputs():
    stages = [images(2, 64), images(2, 128)]
    small = preview_picture(stages, ["a", "b"], size=32)
    assert small.height > 2 * 32 + 3 * PADDING and small.width > 2 * 32 + 3 * PADDING
    named = preview_picture(stages, ["a", "b"], size=32, row_labels=["a much longer label", "x"])
    assert named.width > small.width and named.height == small.height
    long = preview_picture(stages, ["a", "a caption long enough to wrap over several lines of a narrow tile"], size=32)
    assert long.height > small.height and long.width == small.width
    with pytest.raises(ValueError, match="for 3 captions"):
        preview_picture(stages, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 row labels for 1 stages"):
        preview_picture(stages[:1], ["a", "b"], row_labels=["x", "y"])
    with pytest.raises(ValueError, match="no stages"):
        preview_picture([], ["a"])


def test_dequantize_inverts_quantize():
    from helpers.pictures import dequantize, quantize

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(quantize(dequantize(pixels)), pixels)
    hwc = pixels.permute(0, 2, 3, 1).numpy()
    assert torch.equal(dequantize(hwc, channels_last=True), dequantize(pixels))
    assert dequantize(pixels).min() >= -1 and dequantize(pixels).max() <= 1
