"""DiffAugment (Zhao et al. 2020): differentiable augmentation for data-efficient GANs.

The same policy is applied to real and to generated images wherever the
discriminator sees them (its own step and the generator's step), so D never
learns the augmentation as a cue and G receives gradients through it. Each
image in a batch gets its own random parameters, drawn from an optional
``torch.Generator`` so a training run can be reproduced and resumed exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Augmentation = Callable[[Tensor, "torch.Generator | None"], Tensor]


def _rand(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform [0, 1) number per image: [B, 1, 1, 1], fp32 on x's device."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device, dtype=torch.float32)


def rand_brightness(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add a per-image offset in [-0.5, 0.5)."""
    return x + (_rand(x, generator) - 0.5).to(x.dtype)


def rand_saturation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale the distance from the per-pixel grey value by a factor in [0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, generator) * 2).to(x.dtype) + mean


def rand_contrast(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale the distance from the image mean by a factor in [0.5, 1.5)."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5).to(x.dtype) + mean


def rand_translation(x: Tensor, generator: torch.Generator | None = None, *, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ``ratio`` of its size (integer pixels), filling with zeros."""
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1, 1), generator=generator, device=x.device)
    gb, gy, gx = torch.meshgrid(
        torch.arange(B, device=x.device), torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij"
    )
    gy = torch.clamp(gy + dy + 1, 0, H + 1)  # +1: index into the zero-padded image
    gx = torch.clamp(gx + dx + 1, 0, W + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)


def rand_cutout(x: Tensor, generator: torch.Generator | None = None, *, ratio: float = 0.5) -> Tensor:
    """Zero a square of ``ratio`` times the image size at a random position in each image."""
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), generator=generator, device=x.device)
    ox = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), generator=generator, device=x.device)
    gb, gy, gx = torch.meshgrid(
        torch.arange(B, device=x.device), torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij"
    )
    gy = torch.clamp(gy + oy - ch // 2, 0, H - 1)
    gx = torch.clamp(gx + ox - cw // 2, 0, W - 1)
    mask = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


def random_resized_crop(x: Tensor, generator: torch.Generator | None = None, *, min_scale: float = 0.8) -> Tensor:
    """A random square crop of each image (side ``min_scale``..1 of the image, anywhere inside it),
    resized back to the image's size (bilinear): [B, C, H, W] -> same shape, differentiable.

    LAFITE augments generated images this way before its CLIP loss, so the generator cannot
    fit the frozen CLIP's response to exact pixel positions.
    """
    B = x.shape[0]
    scale = min_scale + (1 - min_scale) * _rand(x, generator).view(B, 1)  # [B, 1] crop side / image side
    where = torch.cat([_rand(x, generator).view(B, 1), _rand(x, generator).view(B, 1)], dim=1)
    shift = (1 - scale) * (2 * where - 1)  # [B, 2] crop centre in [-(1 - s), 1 - s]: the crop stays inside
    scale = scale.view(B)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


POLICIES: dict[str, list[Augmentation]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def parse_policy(policy: str) -> list[str]:
    """``"color,translation,cutout"`` -> its parts; ``""`` -> []; unknown names are an error."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; choose from {sorted(POLICIES)} (comma-separated)")
    return names


def diff_augment(x: Tensor, policy: str = "color,translation,cutout", *, generator: torch.Generator | None = None,
                 translation: float = 0.125, probability: float = 1.0) -> Tensor:
    """Augment images [B, 3, H, W] (any range, usually [-1, 1]) -> same shape, differentiable.

    ``policy`` is a comma-separated subset of ``color``, ``translation``,
    ``cutout`` applied in that order; an empty policy returns ``x`` unchanged.
    ``translation`` bounds the shift as a fraction of the image's size (DiffAugment's 1/8).
    ``probability``: each image gets each augmentation with this chance and passes through it
    unchanged otherwise (ADA, Karras et al. 2020: below 1, D also sees images as they are, so G
    cannot match the real faces' augmented distribution without matching their own, e.g. where
    the faces sit); 1 (DiffAugment) draws exactly as without it.
    """
    for name in parse_policy(policy):
        for fn in POLICIES[name]:
            apply = _rand(x, generator) < probability if probability < 1 else None  # [B, 1, 1, 1]
            out = fn(x, generator, ratio=translation) if fn is rand_translation else fn(x, generator)
            x = out if apply is None else torch.where(apply, out, x)
    return x
