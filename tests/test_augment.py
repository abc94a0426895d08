"""DiffAugment: shapes, determinism, differentiability, policies."""

import pytest
import torch

from helpers.augment import diff_augment, parse_policy, rand_cutout, rand_translation


def images(b=3, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_empty_policy_is_the_identity():
    x = images()
    assert diff_augment(x, "") is x


def test_shape_kept_and_seeded_draws_repeat():
    x = images()
    a = diff_augment(x, generator=torch.Generator().manual_seed(1))
    b = diff_augment(x, generator=torch.Generator().manual_seed(1))
    c = diff_augment(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gradients_flow_through_every_augmentation():
    x = images().requires_grad_(True)
    diff_augment(x, "color,translation,cutout", generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_moves_content_and_cutout_zeroes_a_square():
    x = torch.ones(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    shifted = rand_translation(x, g, ratio=0.25)
    assert shifted.shape == x.shape
    assert set(shifted.unique().tolist()) <= {0.0, 1.0}  # integer shifts, zero fill
    cut = rand_cutout(x, g, ratio=0.5)
    zeros_per_image = (cut[:, 0] == 0).flatten(1).sum(1)
    assert (zeros_per_image > 0).all() and (zeros_per_image <= 64).all()  # at most an 8x8 square
    assert torch.equal(cut[:, 0] == 0, cut[:, 2] == 0)  # the same square in every channel


def test_translation_ratio_bounds_the_shift():
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 32, 32] = 1  # one lit pixel per image
    g = torch.Generator().manual_seed(0)
    for translation, most in ((1 / 64, 1), (0.125, 8)):
        moved = diff_augment(x, "translation", generator=g, translation=translation)
        where = moved[:, 0].flatten(1).argmax(1)
        dy, dx = where // 64 - 32, where % 64 - 32
        assert dy.abs().max() == most and dx.abs().max() == most  # every shift up to the bound, none beyond


def test_probability_leaves_the_other_images_as_they_are():
    x = torch.zeros(400, 1, 32, 32)
    x[:, :, 16, 16] = 1
    always = diff_augment(x, "translation", generator=torch.Generator().manual_seed(0))
    assert torch.equal(always, diff_augment(x, "translation", generator=torch.Generator().manual_seed(0),
                                            probability=1.0))  # 1: the same draws as without it
    for p, low, high in ((0.5, 0.40, 0.60), (0.0, 0.0, 0.0)):
        out = diff_augment(x, "translation", generator=torch.Generator().manual_seed(0), probability=p)
        moved = (out != x).flatten(1).any(1).float().mean().item()
        assert low <= moved <= high, (p, moved)  # about p of the images shifted, the rest untouched
    y = images(b=64, size=16).requires_grad_(True)
    out = diff_augment(y, "color,translation,cutout", generator=torch.Generator().manual_seed(0), probability=0.5)
    out.sum().backward()
    assert (out == y).flatten(1).all(1).any() and y.grad.abs().sum() > 0  # some images pass through every part


def test_unknown_policy_is_a_clear_error():
    assert parse_policy(" color , cutout ") == ["color", "cutout"]
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        diff_augment(images(), "colour")


def test_random_resized_crop_is_the_identity_at_full_scale_and_differentiable():
    from helpers.augment import random_resized_crop

    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_resized_crop(x, g, min_scale=1.0), x, atol=1e-5, rtol=0)
    y = random_resized_crop(x, torch.Generator().manual_seed(1), min_scale=0.5)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
