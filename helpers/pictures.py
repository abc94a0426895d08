"""Pictures of generated images: grids, stage panels, previews, interpolation strips, PNG files.

Every function takes the generator's output, image tensors [B, 3, H, W] in
[-1, 1], and returns PIL images (or uint8 arrays); nothing here runs a model.
Layouts put a white ``padding`` between tiles and, when labels are given, a
band of text above each row (the prompt) and above each column (a seed, a
stage size, an interpolation weight). Without labels a grid of R rows and C
columns of S px tiles is ``C*S + (C+1)*padding`` wide and ``R*S + (R+1)*padding``
high, like torchvision's ``make_grid``. The training preview (``preview_picture``)
labels its rows (stages) on the left and writes each caption beneath its column.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .files import atomic_write_bytes

PADDING = 2  # px between tiles and around the grid
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


# --------------------------------------------------------------------------- conversions


def quantize(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] (or one [3, H, W]) in [-1, 1] -> uint8 tensor of the same shape, 0..255.

    The one rounding rule of the project (what a PNG stores): values outside [-1, 1]
    are clipped, rounding is to the nearest level; the device is kept.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images [B, 3, H, W] or [3, H, W], got {list(images.shape)}")
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dequantize(pixels: Tensor | np.ndarray, *, channels_last: bool = False) -> Tensor:
    """uint8 pixels 0..255 -> float images in [-1, 1], the inverse of ``quantize``.

    pixels [..., 3, H, W] (or [..., H, W, 3] with ``channels_last``, as PIL and NumPy
    store them; the result is then moved to [..., 3, H, W]).
    """
    x = pixels if isinstance(pixels, Tensor) else torch.tensor(pixels)  # a copy: NumPy's array may be read-only
    if channels_last:
        x = x.movedim(-1, -3)
    return x.float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> np.ndarray:
    """Images [B, 3, H, W] (or one [3, H, W]) in [-1, 1] -> uint8 array [B, H, W, 3] (or [H, W, 3]) for PIL."""
    return quantize(images).cpu().movedim(-3, -1).numpy()


def to_pil(image: Tensor) -> Image.Image:
    """One image [3, H, W] in [-1, 1] -> an RGB PIL image of H x W."""
    if image.ndim != 3:
        raise ValueError(f"to_pil takes one image [3, H, W], got {list(image.shape)}; use to_pil_list")
    return Image.fromarray(to_uint8(image))


def to_pil_list(images: Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] -> a list of B RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def png_bytes(image: Image.Image, *, optimize: bool = False) -> bytes:
    """The PNG encoding of ``image`` (for an ipywidgets Image or a download; ``optimize``: smaller, slower)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def save_png(image: Image.Image | Tensor, path: str | os.PathLike, *, optimize: bool = False) -> Path:
    """Write ``image`` (a PIL image, or one tensor [3, H, W] in [-1, 1]) as a PNG file.

    Written to a temporary file and renamed, so a reader never sees half a
    file; parent folders are created. Returns the path.
    """
    if isinstance(image, Tensor):
        image = to_pil(image)
    return atomic_write_bytes(path, png_bytes(image, optimize=optimize))


def resize_tile(image: Image.Image, size: int) -> Image.Image:
    """A square image scaled to ``size`` px: nearest-neighbour when enlarging (the
    pixels stay visible, so a 64 px stage looks like 64 px), box filter when shrinking."""
    if image.width == size and image.height == size:
        return image
    enlarge = size > image.width
    return image.resize((size, size), Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX)


# --------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag")
    return int(bottom) + 3


def _text_width(text: str) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font())


def wrap_text(text: str, width: int, *, max_lines: int = 3) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` px wide (ellipsis after ``max_lines``)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and _text_width(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    # a single word wider than the band is cut, not allowed to spill over
    return [_clip_text(ln, width) for ln in lines]


def _clip_text(text: str, width: int) -> str:
    if _text_width(text) <= width:
        return text
    while text and _text_width(text + "...") > width:
        text = text[:-1]
    return text + "..."


# --------------------------------------------------------------------------- layouts


def tile_grid(
    tiles: Sequence[Image.Image],
    *,
    cols: int,
    size: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    padding: int = PADDING,
) -> Image.Image:
    """Lay PIL ``tiles`` out row by row, ``cols`` per row, each scaled to ``size`` px.

    ``row_labels`` (one per row) are written above their row, ``col_labels``
    (one per column) above the first row, ``title`` above everything.
    ``size`` defaults to the largest tile.
    """
    if not tiles:
        raise ValueError("no images to lay out")
    if cols <= 0:
        raise ValueError(f"cols must be positive, got {cols}")
    rows = -(-len(tiles) // cols)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    size = size or max(max(t.width, t.height) for t in tiles)
    width = cols * size + (cols + 1) * padding
    line_h = _line_height()
    text_w = width - 2 * padding

    title_lines = wrap_text(title, text_w, max_lines=4) if title else []
    col_lines = [_clip_text(c, size) for c in col_labels] if col_labels is not None else []
    row_lines = [wrap_text(r, text_w) for r in row_labels] if row_labels is not None else [[] for _ in range(rows)]
    height = padding + len(title_lines) * line_h + (line_h if col_lines else 0)
    height += sum(len(lines) * line_h + size + padding for lines in row_lines)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = padding
    for line in title_lines:
        draw.text((padding, y), line, fill=INK, font=_font())
        y += line_h
    if col_lines:
        for c, label in enumerate(col_lines):
            x = padding + c * (size + padding) + (size - _text_width(label)) / 2
            draw.text((x, y), label, fill=INK, font=_font())
        y += line_h
    for r in range(rows):
        for line in row_lines[r]:
            draw.text((padding, y), line, fill=INK, font=_font())
            y += line_h
        for c, tile in enumerate(tiles[r * cols : (r + 1) * cols]):
            canvas.paste(resize_tile(tile, size), (padding + c * (size + padding), y))
        y += size + padding
    return canvas


def image_grid(
    images: Tensor,
    *,
    cols: int,
    size: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    padding: int = PADDING,
) -> Image.Image:
    """Images [B, 3, H, W] in [-1, 1] -> a grid, ``cols`` per row, in batch order (see ``tile_grid``)."""
    return tile_grid(
        to_pil_list(images), cols=cols, size=size, row_labels=row_labels, col_labels=col_labels,
        title=title, padding=padding,
    )


def prompt_grid(
    images: Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    labels: bool = True,
    size: int | None = None,
) -> Image.Image:
    """The sampling grid: one row per prompt, one column per seed.

    images [len(prompts) * len(seeds), 3, H, W] in [-1, 1], prompt-major
    (image ``i * len(seeds) + j`` is prompt i with seed j), as ``generate`` returns them.
    With ``labels`` each row carries its prompt and each column its seed.
    """
    if images.shape[0] != len(prompts) * len(seeds):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts x {len(seeds)} seeds")
    return image_grid(
        images,
        cols=len(seeds),
        size=size,
        row_labels=list(prompts) if labels else None,
        col_labels=[f"seed {s}" for s in seeds] if labels else None,
    )


def stage_panel(
    stages: Sequence[Tensor],
    *,
    size: int | None = None,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Every stage of the same samples side by side (64 | 128 | 256), all shown at ``size`` px.

    stages: per-stage images, stage i [B, 3, 64 * 2**i, same] in [-1, 1]; one
    row per sample, one column per stage. ``size`` defaults to the largest
    stage, so smaller stages are enlarged pixel for pixel. With ``row_labels``
    (one per sample) the columns are labelled with their resolution too.
    """
    if not stages:
        raise ValueError("no stages to show")
    batch = stages[0].shape[0]
    if any(s.shape[0] != batch for s in stages):
        raise ValueError(f"stages hold different numbers of images: {[s.shape[0] for s in stages]}")
    per_stage = [to_pil_list(s) for s in stages]
    tiles = [per_stage[k][b] for b in range(batch) for k in range(len(stages))]
    col_labels = [f"{s.shape[-1]} px" for s in stages] if row_labels is not None else None
    size = size or max(s.shape[-1] for s in stages)
    return tile_grid(tiles, cols=len(stages), size=size, row_labels=row_labels, col_labels=col_labels)


def interpolation_strip(
    stages: Sequence[Tensor],
    *,
    prompts: tuple[str, str] | None = None,
    size: int | None = None,
) -> Image.Image:
    """A prompt interpolation: columns go from prompt A to prompt B, one row per stage given.

    stages: per-stage images, each [steps, 3, H, W] in [-1, 1] (as
    ``interpolate_prompts`` returns them). With ``prompts`` the strip is titled
    "A: ... / B: ..." and the columns carry their interpolation weight.
    """
    if not stages:
        raise ValueError("no stages to show")
    steps = stages[0].shape[0]
    tiles = [tile for s in stages for tile in to_pil_list(s)]
    size = size or max(s.shape[-1] for s in stages)
    labelled = prompts is not None
    weights = [k / (steps - 1) if steps > 1 else 0.0 for k in range(steps)]
    return tile_grid(
        tiles,
        cols=steps,
        size=size,
        title=f"A: {prompts[0]}  ->  B: {prompts[1]}" if labelled else None,
        col_labels=[f"{w:.2f}" for w in weights] if labelled else None,
        row_labels=[f"{s.shape[-1]} px" for s in stages] if labelled and len(stages) > 1 else None,
    )


def preview_picture(
    images: Sequence[Tensor],
    captions: Sequence[str],
    *,
    size: int | None = None,
    row_labels: Sequence[str] | None = None,
    caption_lines: int = 5,
    padding: int = PADDING,
) -> Image.Image:
    """A training preview that explains itself: one row per stage, one column per caption.

    images: per stage [N, 3, h, h] in [-1, 1] (stage i is 64 * 2**i px), N = len(captions).
    Every tile is shown at ``size`` px (default: the largest stage, so smaller stages are
    enlarged pixel for pixel). Each row is labelled on the left with its stage's size
    ("64 px") or with ``row_labels``; each caption is wrapped beneath its column (at most
    ``caption_lines`` lines). The tiles sit as in the bare ``tile_grid`` of the same images,
    shifted right by the label column.
    """
    if not images:
        raise ValueError("no stages to show")
    n = len(captions)
    if n == 0 or any(s.shape[0] != n for s in images):
        raise ValueError(f"{[s.shape[0] for s in images]} images per stage for {n} captions")
    labels = list(row_labels) if row_labels is not None else [f"{s.shape[-1]} px" for s in images]
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} row labels for {len(images)} stages")
    size = size or max(s.shape[-1] for s in images)
    grid = tile_grid([tile for s in images for tile in to_pil_list(s)], cols=n, size=size, padding=padding)
    line_h = _line_height()
    label_w = int(max(_text_width(label) for label in labels)) + 2 * padding
    # a little narrower than the tile, so neighbouring captions never touch
    wrapped = [wrap_text(c, max(size - 3 * padding, 1), max_lines=caption_lines) for c in captions]
    band = max(len(lines) for lines in wrapped) * line_h + 2 * padding

    canvas = Image.new("RGB", (label_w + grid.width, grid.height + band), BACKGROUND)
    canvas.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):  # vertically centred on its row
        y = padding + r * (size + padding) + (size - line_h) / 2
        draw.text((padding, y), label, fill=INK, font=_font())
    for c, lines in enumerate(wrapped):  # beneath its column, left-aligned with the tile
        x = label_w + padding + c * (size + padding)
        for k, line in enumerate(lines):
            draw.text((x, grid.height + padding + k * line_h), line, fill=INK, font=_font())
    return canvas
