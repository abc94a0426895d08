"""The pictures the notebooks show before they are run (a maintainer tool).

A notebook opened on GitHub has no outputs (they are stripped before commit), so each one
shows a picture from ``assets/`` in a markdown cell. This module draws them, from the toy
faces and the embedded demo model only (no data set, no network, CPU):

- ``notebook_01_pairs.png``: toy faces with one of their captions (what a features file holds);
- ``notebook_02_stages.png``: the demo generator's three stages of the same faces, 64 | 128 | 256 px;
- ``notebook_03_preview.png``: a training preview of the demo generator: one row per stage, one
  column per preview caption (``assets/preview_captions.txt``), a fixed noise;
- ``notebook_05_scored.png``: real toy faces and the demo's faces for the same captions (what
  FID, CLIP score, R-precision and attribute accuracy compare).

Notebook 04 shows ``demo_grid.png``, which ``python -m helpers build-demo`` draws. Rebuild
these after the demo model changes, from the repository root::

    python -m helpers.tools.notebook_figures

The pictures depend only on the shipped demo files and fixed seeds, so a rebuild on the same
machine writes the same bytes. Each is a few hundred pixels wide and stored with a 256-colour
palette (no dithering: it looks the same and is a third of the size), well under 150 KB.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..assets import ASSETS, PREVIEW_CAPTIONS
from ..pictures import dequantize, preview_picture, save_png, stage_panel
from ..toyfaces import toy_face

TOY_SEED = 0  # the toy faces of notebook 01's smoke mode (toyfaces:N draws seed 0)
NOISE_SEED = 0  # the demo's noise: image j of a prompt uses seed NOISE_SEED + j
STAGE_PROMPTS = (
    "The woman has blond hair and wears eyeglasses.",
    "The man has black hair and a goatee, and is smiling.",
)
COLUMNS = 4  # faces per picture (notebooks 01, 03, 05)
TILE = 96  # px per face in the captioned pictures; captions wrap to this width


def toy_pairs(n: int, *, seed: int = TOY_SEED, start: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Toy faces ``start .. start + n - 1`` of ``seed`` and their first captions:
    (images [n, 3, 256, 256] in [-1, 1], n captions)."""
    faces = [toy_face(seed, i) for i in range(start, start + n)]
    pixels = np.stack([np.asarray(image.convert("RGB")) for image, _, _ in faces])  # [n, 256, 256, 3] uint8
    images = dequantize(pixels, channels_last=True)
    return images, [captions[0] for _, _, captions in faces]


def figure_pairs() -> Image.Image:
    """Notebook 01: toy faces with one of their captions each."""
    images, captions = toy_pairs(COLUMNS)
    return preview_picture([images], captions, size=TILE)  # labelled "256 px", the stored size


def figure_stages(model) -> Image.Image:
    """Notebook 02: every stage of two faces drawn by the demo generator (rows: prompts)."""
    from ..sample import generate

    images = generate(list(STAGE_PROMPTS), n=1, seed=NOISE_SEED, model=model)
    return stage_panel(images, size=128, row_labels=list(STAGE_PROMPTS))


def figure_preview(model, captions: Sequence[str]) -> Image.Image:
    """Notebook 03: the demo generator as a training preview shows it (rows: stages)."""
    from ..sample import generate

    images = generate(list(captions), n=1, seed=NOISE_SEED, model=model)
    return preview_picture(images, captions, size=TILE)


def figure_scored(model) -> Image.Image:
    """Notebook 05: real toy faces (top) and the demo's faces for their captions (bottom)."""
    from ..sample import generate

    real, captions = toy_pairs(COLUMNS, seed=TOY_SEED + 1)  # faces the demo was not trained on
    fake = generate(captions, n=1, seed=NOISE_SEED, model=model)[-1]
    return preview_picture([real, fake], captions, size=TILE, row_labels=["real", "generated"])


def small(picture: Image.Image) -> Image.Image:
    """``picture`` with a 256-colour palette (median cut, no dithering): a third of the PNG size."""
    return picture.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def build(out_dir: str | Path = ASSETS, *, device: str = "cpu") -> dict[str, Path]:
    """Draw every notebook picture into ``out_dir``; returns {name: path}."""
    from ..sample import load_generator

    torch.set_num_threads(1)  # one thread: the order of the sums, hence the bytes, does not follow the core count
    model = load_generator(None, device=device)
    captions = PREVIEW_CAPTIONS.read_text(encoding="utf-8").splitlines()[:COLUMNS]
    figures = {
        "notebook_01_pairs.png": figure_pairs(),
        "notebook_02_stages.png": figure_stages(model),
        "notebook_03_preview.png": figure_preview(model, captions),
        "notebook_05_scored.png": figure_scored(model),
    }
    return {name: save_png(small(picture), Path(out_dir) / name) for name, picture in figures.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.tools.notebook_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder to write the PNGs into (default: assets/)")
    args = parser.parse_args(argv)
    for name, path in build(args.out).items():
        picture = Image.open(path)
        print(f"{path}  {picture.width}x{picture.height}  {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
