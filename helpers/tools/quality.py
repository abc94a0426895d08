"""What the generator learns, measured on held-out toy faces: the quality harness.

``python -m helpers quality`` trains variants of the recipe for a fixed budget on
toy faces and measures each at points along the way (e.g. 250 / 500 / 1000 steps,
so a table shows how fast quality comes, not only where it ends). Every variant
starts from the same seed and sees the same data order; a point is a resume of
the run before it, which continues exactly.

At each point, on captions of the held-out split (faces the demo CLIP and the
generator never saw), ``measure_quality`` reports:

- **attribute accuracy** and **per-attribute recall** (and its minimum): the toy-face
  attribute classifier judges images generated from held-out captions against the
  attributes of each caption's face;
- **periodic-artifact index** (``periodic_artifact_index``): how strong a periodic grid at the
  upsampling periods is: the power spectrum's spikes at multiples of N/8 above their neighbourhood,
  as a share of all the images' power, generated over real toy faces (1 = as real); beside it the
  spike contrast, each spike over its neighbourhood, which also reads images softer than real faces
  as a grid (``artifact_controls`` measures both on real faces changed in known ways);
- **fine detail** (``fine_detail``): the share of the power spectrum beyond a quarter of the
  sampling rate (periods under 4 px), generated over real (below 1: blurrier than real faces);
- **eye counts** (``eye_count_distance``): how differently generated and real toy faces read to a
  detector of toy faces' eyes (0, 1, 2, 3, 4+ found; total variation, 0 = as real), for all images
  and for those asked for eyeglasses against the real faces that wear them: glasses drawn as a bar
  over the eyes read none, glasses drawn as a row of repeated eyes read three or more;
- **FID / KID** against the held-out real faces, with the extractor named (offline:
  the demo CLIP's image tower, and a seeded random conv net that no variant trains
  against);
- **diversity ratio**: pairwise distance between seeds of one prompt over that of
  real faces with the same attributes (1 = as varied as real faces), at the last stage
  and at each stage (where variety is lost), and for each image's mean colour alone, and
  (``regions``, and ``regions_per_stage`` for every stage) in the face's box and in
  the image's border on their own;
- **condition probe** (``condition_probe``): how well a linear probe reads each
  attribute from the condition the generator's stages receive, from its mean and as
  sampled (with conditioning augmentation's noise): what G cannot know, it cannot draw;
- **seconds per step**: after every variant has trained, each one's step is timed
  alone (``time_steps``: the median of 20 steps after 3 warm-up ones), so that no
  measurement or other variant shares the machine with the timing.

One JSON per variant (``WORK/NAME.json``) and one side-by-side table (``WORK/table.md``).
``build-demo`` measures the demo generator with the same ``measure_quality``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import write_json

if TYPE_CHECKING:
    from ..network import Generator

ARTIFACT_DIVISOR = 8  # spikes of stride-2 upsampling stacks sit at multiples of N / 8 of the spectrum
FINE_DETAIL_CUTOFF = 0.25  # cycles per pixel: ``fine_detail`` reads the power of periods shorter than 4 px
# ``eye_counts`` works at 128 px, inside the rows and columns (top, bottom, left, right) where toy faces' eyes
# lie, with room either side for eyes drawn where none belong (in 256 px units: the face's centre at 128 +- 12,
# 134 +- 10, its eyes 0.02-0.08 of its half-height above it and 0.38-0.46 of its half-width either side: rows
# 59-72, columns 45-83 at 128 px), at a score that finds two eyes in about 9 of 10 real faces without glasses
EYE_RESOLUTION, EYE_BAND, EYE_THRESHOLD = 128, (52, 80, 16, 112), 0.25
# ``diversity["regions"]`` splits the 64 px pairwise distance into the face's box (rows and columns, top, bottom,
# left, right, in 64 px units: a toy face's centre lies at 32 +- 3, 33.5 +- 2.5 and its skin reaches up to 14 px
# to either side and 19 px up and down) and the border (10 px: background, and at the bottom the shirt and long hair)
FACE_BOX, BORDER = (14, 54, 16, 48), 10
DEFAULT_POINTS = (250, 500, 1000)
# What the base keeps of the demo build's schedule beyond ``reference_recipe``: DiffAugment translation and
# the mode-seeking term at weight 1 on every stage, as the build had when the README's tables were measured
# (the build has since dropped translation and weights the term 3x on the 64 px stage only)
BASE_SCHEDULE: dict[str, Any] = dict(diffaugment="translation", mode_seeking_weight=1.0, mode_seeking_stages=None)


# --------------------------------------------------------------------------- measurements


def pairwise_distance(images: Tensor) -> float:
    """Mean pairwise RMS pixel distance of images [N, 3, H, W] (or any [N, ...] of their pixels) in [-1, 1] (N >= 2)."""
    flat = images.flatten(1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def region_masks(size: int) -> dict[str, Tensor]:
    """Boolean [size, size] masks of a toy face's ``face`` box and the image's ``border`` (``FACE_BOX`` and
    ``BORDER`` are in 64 px units, scaled to ``size``)."""
    k = size / 64
    top, bottom, left, right = (round(v * k) for v in FACE_BOX)
    face = torch.zeros(size, size, dtype=torch.bool)
    face[top:bottom, left:right] = True
    b = round(BORDER * k)
    border = torch.ones(size, size, dtype=torch.bool)
    border[b:size - b, b:size - b] = False
    return {"face": face, "border": border}


def power_spectrum(images: Tensor) -> Tensor:
    """Mean power spectrum of images [N, 3, H, W] in [-1, 1] (grey, each image's mean removed) -> [H, W]."""
    grey = images.double().mean(1)
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    return torch.fft.fft2(grey).abs().pow(2).mean(0)


def _spikes(images: Tensor, divisor: int) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """For (a, b) in 0..divisor-1 (not both 0), at the frequency (a N / divisor, b N / divisor) of S, the
    mean power spectrum of images [N, 3, H, H] in [-1, 1]: ({(a, b): S there / median of its 5x5
    neighbourhood}, {(a, b): (S there - that median, at least 0) / S summed over every frequency})."""
    S = power_spectrum(images)
    n = S.shape[-1]
    total = S.sum().clamp_min(1e-12)
    step = max(n // divisor, 1)
    offsets = [(a, b) for a in range(-2, 3) for b in range(-2, 3) if (a, b) != (0, 0)]
    ratios, excess = {}, {}
    for u in range(0, n, step):
        for v in range(0, n, step):
            if (u, v) == (0, 0):
                continue
            around = torch.stack([S[(u + a) % n, (v + b) % n] for a, b in offsets]).median()
            ratios[(u // step, v // step)] = float(S[u, v] / around.clamp_min(1e-12))
            excess[(u // step, v // step)] = float((S[u, v] - around).clamp_min(0) / total)
    return ratios, excess


def _spike_ratios(images: Tensor, divisor: int) -> dict[tuple[int, int], float]:
    """The first of ``_spikes``: each spike over the median of its neighbourhood."""
    return _spikes(images, divisor)[0]


def _by_period(ratios: dict[tuple[int, int], float], divisor: int, reduce: Callable = np.mean) -> dict[str, float]:
    """``reduce`` (the mean; ``sum`` for the spikes' power) of per-frequency values of ``_spikes`` per period:
    frequency (a, b) belongs to divisor / gcd(a, b, divisor) px."""
    groups: dict[str, list[float]] = {}
    for (a, b), ratio in ratios.items():
        groups.setdefault(str(divisor // math.gcd(a, b, divisor)), []).append(ratio)
    return {k: float(reduce(v)) for k, v in sorted(groups.items(), key=lambda kv: int(kv[0]))}


def spectral_spikes(images: Tensor, *, divisor: int = ARTIFACT_DIVISOR) -> float:
    """How much the power spectrum rises at the frequencies (u, v) in multiples of N / divisor
    (not both 0), over the median of its 5x5 neighbourhood there: the mean of those ratios.

    images [N, 3, H, H] in [-1, 1]. Upsampling by stride-2 transposed convolutions leaves a
    periodic pattern whose spectrum has spikes exactly there; natural images have none.
    """
    return float(np.mean(list(_spike_ratios(images, divisor).values())))


def spectral_spikes_by_period(images: Tensor, *, divisor: int = ARTIFACT_DIVISOR) -> dict[str, float]:
    """``spectral_spikes`` split by the shortest period (px) whose patterns hold each frequency:
    {"2": ..., "4": ..., "8": ...} for divisor 8. Frequency (a, b) x N / divisor belongs to period
    divisor / gcd(a, b, divisor). A pattern of period p px has spikes in p's group and in the shorter
    periods' groups, never in the longer ones': at the final size the last x2 upsampling of a
    stack leaves 2 px patterns, the one before it 4 px patterns, and so on.
    """
    return _by_period(_spike_ratios(images, divisor), divisor)


def periodic_artifact_index(generated: Tensor, real: Tensor, *, divisor: int = ARTIFACT_DIVISOR) -> dict[str, Any]:
    """How strong a periodic grid at the upsampling periods is in generated images [N, 3, H, H] in [-1, 1],
    against real images of the same size: ``ratio``, the index (1 = as real faces; 0 = no spikes at all).

    At each frequency in multiples of N / divisor (not both 0), the mean power spectrum's excess over the
    median of its 5x5 neighbourhood is a spike's power; their sum as a share of all the images' power is
    the grid's share, and the index is the generated images' share over the real ones'. ``by_period``:
    the same ratio for each period's spikes (grouped as in ``spectral_spikes_by_period``).

    ``contrast``: each spike over its neighbourhood's median instead (``spectral_spikes``: ``generated``,
    ``real``, their ``ratio`` and its ``by_period``). Its neighbourhood is the images' own fine detail, so
    it reads softness as a grid: real toy faces softened by a 3-tap blur score about 15x real faces on it
    and 1.0x on the index, while a 4 px grid of one grey level raises the index to about 4x
    (``artifact_controls``).
    """
    g_ratios, g_excess = _spikes(generated, divisor)  # each spectrum once
    r_ratios, r_excess = _spikes(real, divisor)
    g, r = float(np.mean(list(g_ratios.values()))), float(np.mean(list(r_ratios.values())))
    g_by, r_by = _by_period(g_ratios, divisor), _by_period(r_ratios, divisor)
    ge_by, re_by = _by_period(g_excess, divisor, sum), _by_period(r_excess, divisor, sum)
    contrast = dict(generated=g, real=r, ratio=g / r, by_period={k: g_by[k] / r_by[k] for k in g_by})
    return dict(ratio=sum(g_excess.values()) / max(sum(r_excess.values()), 1e-12),
                by_period={k: ge_by[k] / max(re_by[k], 1e-12) for k in ge_by}, contrast=contrast)


def artifact_controls(n: int = 600, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """What the artifact index, its spike contrast and the fine detail read for toy faces changed in known
    ways: ``n`` faces of toy seed ``seed + 1`` (256 px, each change quantized to 8 bits as a generated PNG
    is) against ``n`` faces of toy seed ``seed``.

    {change: {"index", "contrast", "fine_detail"}, each x real faces}, for the faces as they are, softened
    (``network.Blur``'s [1, 2, 1] filter), at half resolution (box-downsampled, bilinear x2 back: a perfect
    128 px image upsampled), and with a 4 px checkerboard of one grey level (amplitude 1 / 127.5) added to
    the faces and to the softened ones. No change but the grid adds a periodic pattern.
    """
    from ..features import downsample
    from ..network import Blur
    from ..pictures import dequantize, quantize
    from .train_classifier import toyface_arrays

    real = dequantize(toyface_arrays(n, seed=seed, size=256)[0], channels_last=True)
    faces = dequantize(toyface_arrays(n, seed=seed + 1, size=256)[0], channels_last=True)
    rows, cols = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    grid = (((rows // 2) % 2) * 2 - 1).float() * (((cols // 2) % 2) * 2 - 1).float() / 127.5
    soft = Blur()(faces)
    changed = {
        "real faces": faces,
        "softened": soft,
        "half resolution": F.interpolate(downsample(faces, 128), scale_factor=2, mode="bilinear", align_corners=False),
        "grid of 1 grey level": faces + grid,
        "softened, with that grid": soft + grid,
    }
    out = {}
    for name, images in changed.items():
        images = dequantize(quantize(images.clamp(-1, 1)))
        index = periodic_artifact_index(images, real)
        out[name] = dict(index=index["ratio"], contrast=index["contrast"]["ratio"],
                         fine_detail=fine_detail(images, real)["ratio"])
    return out


def fine_detail_share(images: Tensor, *, cutoff: float = FINE_DETAIL_CUTOFF) -> float:
    """The share of the mean power spectrum of images [N, 3, H, W] in [-1, 1] (``power_spectrum``) at
    radial frequencies above ``cutoff`` cycles per pixel (0.25: periods shorter than 4 px): 0 for
    smooth images, 1 for a 2 px grid, about 0.8 for white noise."""
    S = power_spectrum(images)
    fy = torch.fft.fftfreq(S.shape[0], dtype=S.dtype)
    fx = torch.fft.fftfreq(S.shape[1], dtype=S.dtype)
    fine = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff
    return float(S[fine].sum() / S.sum().clamp_min(1e-12))


def fine_detail(generated: Tensor, real: Tensor, *, cutoff: float = FINE_DETAIL_CUTOFF) -> dict[str, float]:
    """``fine_detail_share`` of generated and of real images (same size) and their ratio (1 = as real;
    below 1: blurrier than real faces). The detail the spike contrast's neighbourhoods lack."""
    g, r = fine_detail_share(generated, cutoff=cutoff), fine_detail_share(real, cutoff=cutoff)
    return dict(generated=g, real=r, ratio=g / max(r, 1e-12), cutoff=cutoff)


def eye_counts(images: Tensor, *, threshold: float = EYE_THRESHOLD) -> Tensor:
    """How many eyes each toy face shows: images [N, 3, H, W] in [-1, 1] (H a multiple of 128) -> [N] int64.
    (``eye_map``: where.)"""
    return eye_map(images, threshold=threshold).flatten(1).sum(1)


def eye_map(images: Tensor, *, threshold: float = EYE_THRESHOLD) -> Tensor:
    """Where ``eye_counts`` finds eyes: images [N, 3, H, W] in [-1, 1] -> [N, 128, 128] bool, one pixel per eye.

    A toy face's eye is a dark iris with its white either side. At 128 px, an eye's score is the white
    3 px to its left and right (the dimmer side, each a 3-row mean of the dimmest channel, so skin
    does not count as white) less the darkness at its centre (3 x 3 mean of the brightest channel);
    eyes are the peaks above ``threshold`` at least 5 px apart inside ``EYE_BAND``, where toy faces'
    eyes lie whatever the face's position. A heuristic read against real toy faces, not a verdict on
    one image: it finds two eyes in about 9 of 10 real faces without glasses and 6 of 10 with them
    (frames add or hide some), none behind sunglasses; a generator that draws glasses as a bar over
    the eyes reads 0 and one that draws a row of repeated eyes reads 3 or more (``eye_count_distance``).
    In generated faces it also counts eye-like marks that are not eyes, such as a light halo between
    dark hair and skin: anything it finds beyond a real face's two is structure real faces lack.
    """
    from ..features import downsample

    if images.shape[-1] % EYE_RESOLUTION or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"eye counts need square images of {EYE_RESOLUTION} px or a multiple of it, "
                         f"got {tuple(images.shape[-2:])}")
    x = (downsample(images.float(), EYE_RESOLUTION) + 1) / 2
    white = F.avg_pool2d(x.min(1, keepdim=True).values, (3, 1), stride=1, padding=(1, 0))[:, 0]
    dark = F.avg_pool2d(x.max(1, keepdim=True).values, 3, stride=1, padding=1)[:, 0]
    score = torch.minimum(white.roll(3, dims=2), white.roll(-3, dims=2)) - dark
    top, bottom, left, right = EYE_BAND
    band = torch.zeros_like(score[0], dtype=torch.bool)
    band[top:bottom, left:right] = True
    n = score.shape[-1]
    tie_break = 1e-6 * torch.arange(n * n, dtype=score.dtype).view(n, n) / n**2  # one peak per flat top
    score = score.masked_fill(~band, -1.0) + tie_break
    return (score == F.max_pool2d(score[:, None], 9, stride=1, padding=4)[:, 0]) & (score > threshold)


def eye_count_distance(
    generated: Tensor, real: Tensor, *, groups: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Any]:
    """How differently generated and real toy faces read to ``eye_counts``: the total variation distance
    between their shares of 0, 1, 2, 3 and 4 or more eyes (0 = the same shares, 1 = none in common).

    generated [N, 3, H, W] and real [M, 3, H, W] in [-1, 1]. groups: ``{name: (generated_mask [N] bool,
    real_mask [M] bool)}``, e.g. the images asked for eyeglasses and the real faces that wear them.
    Returns ``{"distance", "generated", "real", "groups": {name: {...}}}``, each share list indexed by count.
    """
    g_counts, r_counts = eye_counts(generated).clamp_max(4), eye_counts(real).clamp_max(4)

    def entry(g: Tensor, r: Tensor) -> dict[str, Any]:
        if not len(g) or not len(r):
            return dict(distance=None, generated=None, real=None, images=(len(g), len(r)))
        gs = torch.bincount(g, minlength=5).double() / len(g)
        rs = torch.bincount(r, minlength=5).double() / len(r)
        return dict(distance=float((gs - rs).abs().sum() / 2), generated=gs.tolist(), real=rs.tolist(),
                    images=(len(g), len(r)))

    out = entry(g_counts, r_counts)
    out["groups"] = {name: entry(g_counts[gm], r_counts[rm]) for name, (gm, rm) in (groups or {}).items()}
    return out


@torch.no_grad()
def _balanced_probe(x: Tensor, y: Tensor, fit: Tensor, *, steps: int = 100, l2: float = 1e-4) -> float:
    """Balanced accuracy on rows ``~fit`` of a class-balanced logistic regression fitted on rows ``fit``.

    x [N, D] float; y [N] bool; fit [N] bool. 0.5 is chance, 1 a perfect reading.
    """
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    y_fit, share = y[fit].float(), y[fit].float().mean().clamp(1e-3, 1 - 1e-3)
    balance = torch.where(y[fit], 0.5 / share, 0.5 / (1 - share))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[fit] @ w + b, y_fit, weight=balance) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        said, truth = (x[~fit] @ w + b) > 0, y[~fit]
    recalls = [float((said[truth == v] == v).float().mean()) for v in (True, False) if (truth == v).any()]
    return float(np.mean(recalls))


def condition_probe(
    generator: Generator, text: Tensor, values: Tensor, names: list[str], image_ids: Tensor, *, seed: int = 0,
) -> dict[str, Any]:
    """How well each attribute can be read, linearly, from the condition G's stages receive.

    generator: a ``network.Generator``; text [N, text_dim]: caption features (several per
    image); values [N, A] bool: each caption's image's attributes, named ``names``;
    image_ids [N]: the image of each row. For each attribute, a class-balanced logistic
    regression is fitted on the rows of three images in four and judged on the rest
    (balanced accuracy, 0.5 = chance) twice: on the condition's mean and on the
    condition as sampled (one seeded draw of conditioning augmentation's noise, at the
    model's ``ca_noise``). A generator cannot reliably draw what its condition does not
    carry, so the sampled column bounds what G can learn to show.
    Returns ``{"mean": {name: acc}, "sampled": {name: acc}, "min_mean", "min_sampled"}``.
    """
    rng = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(text), generator.cfg.cond_dim, generator=rng)
    with torch.no_grad():
        sampled, mu, _ = generator.ca(text.float(), eps)
    images = torch.unique(image_ids)
    fit_images = images[torch.randperm(len(images), generator=rng)[: len(images) * 3 // 4]]
    fit = torch.isin(image_ids, fit_images)
    out: dict[str, Any] = {}
    for key, x in (("mean", mu), ("sampled", sampled)):
        out[key] = {n: _balanced_probe(x, values[:, j], fit) for j, n in enumerate(names)
                    if 0 < int(values[fit, j].sum()) < int(fit.sum())}
        out[f"min_{key}"] = min(out[key].values()) if out[key] else None
    return out


def measure_quality(
    checkpoint: str | os.PathLike | None,
    features: str | os.PathLike,
    *,
    num_captions: int = 200,
    seeds: int = 4,
    seed: int = 0,
    diversity_prompts: int = 100,
    diversity_seeds: int = 8,
    real_pool_faces: int = 4000,
    clip: Any = None,
) -> dict[str, Any]:
    """Attribute accuracy and recall, artifacts, FID/KID and diversity of a generator trained on toy faces.

    Accuracy: ``num_captions`` held-out captions (test split of ``features``, one
    per image) x ``seeds`` images, each with noise of its own (a few noise vectors
    shared by every caption would make the measure hinge on those few draws); every
    stage's images are judged by the toy faces attribute classifier against the
    attributes of the caption's image (beside it, the majority baseline: each
    attribute answered with its commonest value).
    The last stage's images also give the periodic-artifact index, the fine detail, the
    eye counts (``eye_count_distance``, at 128 px and up: all images, those asked for
    eyeglasses against the real faces that wear them, and the rest) and FID/KID against the
    test split's real images at that size (``clip``: the features' CLIP, for its image
    features; without it only the random-conv extractor).
    Diversity: for ``diversity_prompts`` held-out captions, the mean pairwise RMS
    distance (64 px) between ``diversity_seeds`` generated images (noise of their own
    again), divided by the same distance between real toy faces that have exactly the
    caption's attributes (looked for among ``real_pool_faces`` freshly drawn ones).
    About 1 means as varied as real faces; near 0 means mode collapse. ``per_stage`` gives the
    same ratio for every stage's images (each brought to 64 px), to show where it is lost;
    ``mean_colour_per_stage`` the ratio for each image's mean colour alone.
    """
    from .. import metrics
    from ..attributes import attribute_accuracy, load_attribute_classifier
    from ..config import BASE_RESOLUTION
    from ..features import FeaturesDataset, downsample, read_features
    from ..pictures import dequantize, quantize
    from ..sample import generate_from_features, load_generator
    from ..toyfaces import IMAGE_SIZE, TOY_ATTRIBUTES, iter_toyfaces

    data = read_features(features)
    attrs = data.get("attributes")
    if attrs is None:
        raise ValueError(f"{features} has no attributes: measure_quality needs toy faces features")
    model = load_generator(checkpoint)
    test = FeaturesDataset(features, split="test", num_stages=1)
    if len(test) < 2:
        raise ValueError("the features file needs a test split with at least 2 images")
    names = list(attrs["names"])
    values = torch.as_tensor(attrs["values"], dtype=torch.bool)[test.rows]
    order = [names.index(a) for a in TOY_ATTRIBUTES]
    values = values[:, order]
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(test), generator=rng)[:num_captions]
    caption_rows = [int(torch.randint(max(1, int(test.caption_counts[i])), (), generator=rng)) for i in picks]
    text = torch.stack([test.text_features[i, r] for i, r in zip(picks.tolist(), caption_rows)])
    feats = text.repeat_interleave(seeds, dim=0)
    wanted = values[picks].repeat_interleave(seeds, dim=0)
    seed_list = [seed + n for n in range(len(feats))]  # each image its own noise, as for diversity below
    images = generate_from_features(model, feats, seed_list)
    classifier = load_attribute_classifier()
    per_stage = {}
    for s, imgs in enumerate(images):
        acc = attribute_accuracy(imgs, wanted, classifier=classifier)
        per_stage[str(model.resolutions[s])] = acc

    # Artifacts and FID/KID of the last stage against every real test face at its size.
    size = model.resolutions[-1]
    real = torch.cat([downsample(torch.stack([test.image(i) for i in range(a, min(a + 256, len(test)))]), size)
                      for a in range(0, len(test), 256)])
    fake = dequantize(quantize(images[-1]))  # the PNG a user would see
    glasses = TOY_ATTRIBUTES.index("Eyeglasses")
    eyes = eye_count_distance(fake, real, groups={  # None below 128 px, where an eye is a few pixels
        "Eyeglasses": (wanted[:, glasses], values[:, glasses]),
        "no Eyeglasses": (~wanted[:, glasses], ~values[:, glasses]),
    }) if size % EYE_RESOLUTION == 0 else None
    extractors = [metrics.RandomConvFeatures()]
    if clip is not None:
        extractors.append(metrics.ClipImageFeatures(clip))
    distances = {}
    for extractor in extractors:
        real_f = metrics.extract_features(quantize(real), extractor)
        fake_f = metrics.extract_features(quantize(fake), extractor)
        kid, kid_std = metrics.kernel_inception_distance(real_f, fake_f, seed=seed)
        distances[extractor.name] = dict(fid=metrics.frechet_distance(real_f, fake_f), kid=kid, kid_std=kid_std)

    # Diversity against real faces with the same attributes.
    real_pool: dict[tuple[bool, ...], list[Tensor]] = {}
    needed = {tuple(values[i].tolist()) for i in picks[:diversity_prompts].tolist()}
    for image, a, _ in iter_toyfaces(real_pool_faces, seed=seed + 7777):
        key = tuple(a[n] for n in TOY_ATTRIBUTES)
        if key in needed and len(real_pool.setdefault(key, [])) < diversity_seeds:
            real_pool[key].append(dequantize(np.array(image.reduce(IMAGE_SIZE // BASE_RESOLUTION)), channels_last=True))
    stage_d: list[list[float]] = [[] for _ in model.resolutions]  # every stage's images, judged at 64 px
    masks = region_masks(BASE_RESOLUTION)
    region_d = [{name: [] for name in masks} for _ in model.resolutions]  # every stage's, in the face's box ...
    region_real: dict[str, list[float]] = {name: [] for name in masks}  # ... and the border, and real faces'
    colour_d: list[list[float]] = [[] for _ in model.resolutions]  # ... and each image's mean colour only
    real_d, real_colour_d = [], []
    for k, i in enumerate(picks[:diversity_prompts].tolist()):
        key = tuple(values[i].tolist())
        if len(real_pool.get(key, [])) < 2:
            continue
        feat = test.text_features[i, 0:1].repeat(diversity_seeds, 1)
        first = seed + len(seed_list) + k * diversity_seeds  # noise no other prompt or image shares
        stages = generate_from_features(model, feat, list(range(first, first + diversity_seeds)))
        for s, g in enumerate(stages):
            small = downsample(g, BASE_RESOLUTION)
            stage_d[s].append(pairwise_distance(small))
            colour_d[s].append(pairwise_distance(g.mean((2, 3), keepdim=True)))
            for name, mask in masks.items():
                region_d[s][name].append(pairwise_distance(small[:, :, mask]))
        alike = torch.stack(real_pool[key])  # not `real`: the artifact index below reads the test faces
        real_d.append(pairwise_distance(alike))
        real_colour_d.append(pairwise_distance(alike.mean((2, 3), keepdim=True)))
        for name, mask in masks.items():
            region_real[name].append(pairwise_distance(alike[:, :, mask]))
    gen_d = stage_d[-1]
    diversity: dict[str, Any] = dict(
        generated=float(np.mean(gen_d)) if gen_d else None,
        real=float(np.mean(real_d)) if real_d else None,
        prompts=len(gen_d),
    )
    if gen_d:
        diversity["ratio"] = diversity["generated"] / diversity["real"]
    # where variety is lost: each stage's ratio (the last one is ``ratio``); None without prompts
    diversity["per_stage"] = {str(r): float(np.mean(d)) / diversity["real"] if d else None
                              for r, d in zip(model.resolutions, stage_d)}
    # the same ratio for each image's mean colour alone (background, skin and hair dominate it): whether
    # an upper stage keeps the colours the stage below chose
    diversity["mean_colour_per_stage"] = {str(r): float(np.mean(d) / np.mean(real_colour_d)) if d else None
                                          for r, d in zip(model.resolutions, colour_d)}
    # the ratio in the face's box and in the border, for every stage (``regions``: the last one's): which of the
    # two lacks variety, and at which stage it is lost
    diversity["regions_per_stage"] = {
        str(r): {name: float(np.mean(d[name]) / np.mean(region_real[name])) if d[name] else None for name in masks}
        for r, d in zip(model.resolutions, region_d)}
    diversity["regions"] = diversity["regions_per_stage"][str(model.resolutions[-1])]

    # What the condition carries: every caption of every held-out face.
    counts = torch.as_tensor(test.caption_counts)
    keep = torch.arange(test.text_features.shape[1]).unsqueeze(0) < counts.unsqueeze(1)  # [N_img, C]
    probe = condition_probe(
        model.generator, test.text_features[keep], values.unsqueeze(1).expand(-1, keep.shape[1], -1)[keep],
        list(TOY_ATTRIBUTES), torch.arange(len(test)).unsqueeze(1).expand_as(keep)[keep], seed=seed,
    )
    last = per_stage[str(size)]
    # What answering every image with each attribute's commonest value would score: the
    # level a generator that ignores the text reaches.
    rate = wanted.float().mean(0)
    baseline = float(torch.maximum(rate, 1 - rate).mean())
    recalls = [r for r in last["recall"].values() if r is not None]
    return dict(
        attribute_accuracy=last["mean"], majority_baseline=baseline, per_attribute=last["per_attribute"],
        recall=last["recall"], min_recall=min(recalls) if recalls else None, per_stage=per_stage,
        artifact_index=periodic_artifact_index(fake, real), fine_detail=fine_detail(fake, real), eyes=eyes,
        distances=distances, resolution=size,
        diversity=diversity, condition_probe=probe, captions=len(picks), seeds=seeds, checkpoint_step=model.step,
    )


# --------------------------------------------------------------------------- the harness


def toyface_folder(work_dir: str | os.PathLike, *, num_faces: int = 12000, seed: int = 0) -> Path:
    """``WORK/toyfaces``: ``num_faces`` drawn toy faces with captions, drawn once (``build-demo``'s too)."""
    from ..toyfaces import write_toyfaces

    faces = Path(work_dir) / "toyfaces"
    if not (faces / "attributes.csv").is_file():  # written last: its presence means the folder is complete
        write_toyfaces(faces, n=num_faces, seed=seed)
    return faces


def toyface_features(
    work_dir: str | os.PathLike, *, num_faces: int = 12000, seed: int = 0, clip: Any = None, device: Any = None,
) -> Path:
    """``WORK/features.pt``: the toy faces of ``toyface_folder`` extracted with ``clip``, made once.

    The same faces, split and captions as ``build-demo`` (seed 0): the shipped demo
    CLIP learned from the training split only, so the test split stays held out.
    """
    from ..extract import extract_features

    features = Path(work_dir) / "features.pt"
    if not features.is_file():
        faces = toyface_folder(work_dir, num_faces=num_faces, seed=seed)
        extract_features(faces, features, clip=clip, captions_per_image=10, split="auto", seed=seed, device=device)
    return features


def variant_config(overrides: dict[str, Any] | list[str], *, steps: int, seed: int = 0, stages: int | None = None):
    """A variant for ``steps`` steps: the demo build's config (``build_demo.demo_train_config``) with every
    recipe switch at its reference value (``train_config.reference_recipe``) and ``BASE_SCHEDULE``'s
    augmentation and mode-seeking term (the base every variant is compared with), then the variant's
    overrides."""
    import dataclasses

    from ..train_config import apply_overrides, reference_recipe
    from .build_demo import demo_train_config

    cfg = apply_overrides(reference_recipe(demo_train_config(steps, seed=seed)), BASE_SCHEDULE)
    if stages is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_stages=stages),
                                  clip_stages=sorted({0, stages - 1}))
    big = max(steps, 1)
    cfg = dataclasses.replace(cfg, preview_every=big, checkpoint_every=big, snapshot_every=big, log_every=10)
    return apply_overrides(cfg, overrides)


def run_variant(
    name: str, overrides: dict[str, Any] | list[str], features: str | os.PathLike, work_dir: str | os.PathLike, *,
    points: tuple[int, ...] = DEFAULT_POINTS, seed: int = 0, stages: int | None = None, clip: Any = None,
    on_log: Any = None,
) -> dict[str, Any]:
    """Train variant ``name`` (the base with ``overrides``, see ``variant_config``) and measure it at each of ``points``.

    Returns (and writes to ``WORK/NAME.json``) the config and one measurement per point.
    A rerun continues from the variant's last checkpoint and skips points already measured.
    """
    from ..train import read_metrics, train

    work = Path(work_dir)
    run_dir, out = work / "runs" / name, work / f"{name}.json"
    report: dict[str, Any] = dict(name=name, overrides=overrides, stages=stages, seed=seed, points=[])
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("overrides") == overrides and previous.get("stages") == stages:
            report = previous
    done = {p["step"] for p in report["points"]}
    for point in sorted(points):
        if point in done:
            continue
        cfg = variant_config(overrides, steps=point, seed=seed, stages=stages)
        resume = (run_dir / "checkpoints" / "latest.pt").is_file()
        t0 = time.perf_counter()
        result = train(features, run_dir, None if resume else cfg, overrides={"steps": point} if resume else {},
                       resume=resume, clip=clip, progress=False)
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "perf/images_per_s" in r]
        s_per_step = statistics.median(cfg.batch_size / r["perf/images_per_s"] for r in rows) if rows else None
        quality = measure_quality(result.checkpoint, features, seed=seed, clip=clip)
        report["config"] = cfg.to_dict()
        report["points"].append(dict(step=point, seconds_per_step=s_per_step, train_seconds=wall, **quality))
        write_json(out, report)
        if on_log is not None:
            on_log(f"{name} @ {point}: " + summary_line(report["points"][-1]))
    return report


def time_steps(cfg: Any, features: str | os.PathLike, *, clip: Any, steps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one training step of ``cfg`` on batches of ``features`` (a fresh trainer, CPU)."""
    import dataclasses

    from torch.utils.data import DataLoader

    from ..features import FeaturesDataset
    from ..trainer import Trainer

    data = FeaturesDataset(features, split="train", num_stages=cfg.model.num_stages)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_dim=data.dim))
    trainer = Trainer(cfg, clip=clip)
    loader = iter(DataLoader(data, batch_size=cfg.batch_size, shuffle=False, drop_last=True))
    times = []
    for i in range(warmup + steps):
        batch = next(loader)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summary_line(point: dict[str, Any]) -> str:
    """One line of a measurement: accuracy, minimum recall, artifact index and spike contrast, fine detail, eyes,
    FIDs, diversity."""
    fids = ", ".join(f"FID {k.split(' ')[0]} {v['fid']:.3g}" for k, v in point["distances"].items())
    index, contrast = _artifacts(point)
    return (f"accuracy {point['attribute_accuracy']:.3f}, min recall {point['min_recall']:.2f}, "
            f"artifacts {index}x real (spike contrast {contrast}x), "
            f"fine detail {_fine_detail(point)}x real, eyes {_eyes(point)} from real, {fids}, "
            f"diversity {point['diversity'].get('ratio', float('nan')):.2f}")


def _artifacts(point: dict[str, Any]) -> tuple[str, str]:
    """The artifact index and its spike contrast, as printed. A report written before the index read the
    grid's power holds the contrast as ``ratio`` and the index as ``power_ratio`` ("-" in the oldest)."""
    index = point["artifact_index"]
    if "contrast" in index:
        power, contrast = index["ratio"], index["contrast"]["ratio"]
    else:
        power, contrast = index.get("power_ratio"), index["ratio"]
    return "-" if power is None else f"{power:.2f}", f"{contrast:.2f}"


def _fine_detail(point: dict[str, Any]) -> str:
    """``fine_detail``'s ratio as printed ("-" in a report written before it existed)."""
    detail = point.get("fine_detail")
    return "-" if detail is None else f"{detail['ratio']:.2f}"


def _eyes(point: dict[str, Any]) -> str:
    """``eyes``' distance from real faces, and that of the images asked for eyeglasses, as printed ("-" in a
    report written before it existed)."""
    eyes = point.get("eyes")
    if eyes is None:
        return "-"
    glasses = eyes["groups"].get("Eyeglasses", {}).get("distance")
    return f"{eyes['distance']:.2f}" + ("" if glasses is None else f" (glasses {glasses:.2f})")


def format_table(reports: list[dict[str, Any]]) -> str:
    """The side-by-side markdown table of every variant at every measured point."""
    extractors = sorted({k for r in reports for p in r["points"] for k in p["distances"]})
    head = ["variant", "settings", "steps", "accuracy", "min recall", "artifacts / real", "spike contrast / real",
            "fine detail / real", "eyes vs real (glasses)"]
    head += [f"FID ({e.split(' (')[0]})" for e in extractors] + ["diversity", "s / step (timed alone)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in reports:
        settings = " ".join(r["overrides"]) if isinstance(r["overrides"], list) else str(r["overrides"] or "")
        for p in r["points"]:
            fids = [f"{p['distances'][e]['fid']:.3g}" if e in p["distances"] else "-" for e in extractors]
            cells = [r["name"], settings or "(the reference recipe)", str(p["step"]), f"{p['attribute_accuracy']:.3f}",
                     f"{p['min_recall']:.2f}", *_artifacts(p), _fine_detail(p),
                     _eyes(p), *fids,
                     f"{p['diversity'].get('ratio', float('nan')):.2f}",
                     f"{r['timed_seconds_per_step']:.3f}" if r.get("timed_seconds_per_step") else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(work_dir: str | os.PathLike) -> Path:
    """``WORK/table.md`` from every ``WORK/*.json`` variant report."""
    from ..files import atomic_write_bytes

    work = Path(work_dir)
    reports = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    reports = [r for r in reports if "points" in r]
    return atomic_write_bytes(work / "table.md", (format_table(reports) + "\n").encode())


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), required=True,
                        help="a variant: its name, then --set style overrides of the base (the demo build's "
                             "config with the reference recipe) "
                             "(e.g. --variant base --variant tau01 temperature=0.1); repeat for more")
    parser.add_argument("--points", default=",".join(map(str, DEFAULT_POINTS)),
                        help="steps at which to measure, comma-separated (default: %(default)s)")
    parser.add_argument("--stages", type=int, default=None,
                        help="train this many stages only (a reduced budget, e.g. 1 = the 64 px stage)")
    parser.add_argument("--work-dir", default="runs/quality", help="features, runs, one JSON per variant, table.md")
    parser.add_argument("--num-faces", type=int, default=12000, help="toy faces to draw (once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from ..clip_encoder import load_clip
    from ..console import say

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    points = tuple(int(p) for p in str(args.points).split(",") if p.strip())
    clip = load_clip("demo", device="cpu")
    features = toyface_features(args.work_dir, num_faces=args.num_faces, seed=args.seed, clip=clip)
    reports = [run_variant(name, list(overrides), features, args.work_dir, points=points, seed=args.seed,
                           stages=args.stages, clip=clip, on_log=say) for name, *overrides in args.variant]
    torch.set_flush_denormal(True)  # as training runs on the CPU
    for report in reports:  # timed alone, after every run and measurement is done
        cfg = variant_config(report["overrides"], steps=1, seed=args.seed, stages=report["stages"])
        report["timed_seconds_per_step"] = time_steps(cfg, features, clip=clip)
        write_json(Path(args.work_dir) / f"{report['name']}.json", report)
        say(f"{report['name']}: {report['timed_seconds_per_step']:.3f} s per step")
    say(f"table: {write_table(args.work_dir)}")
    return 0
