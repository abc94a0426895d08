"""Loss functions on known inputs."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import losses


def test_adversarial_losses_on_known_logits():
    big = torch.full((4,), 20.0)
    assert losses.d_adversarial_loss(big, -big).item() == pytest.approx(0.0, abs=1e-6)  # D is right
    assert losses.d_adversarial_loss(-big, big).item() == pytest.approx(40.0, rel=1e-4)  # D is wrong
    zero = torch.zeros(3)
    assert losses.d_adversarial_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    # the mismatched term shares the fake side's weight (StackGAN): real + (fake + mismatched) / 2
    assert losses.d_adversarial_loss(zero, zero, zero).item() == pytest.approx(2 * math.log(2))
    assert losses.d_adversarial_loss(big, -big, big).item() == pytest.approx(10.0, rel=1e-4)
    assert losses.g_adversarial_loss(big).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.g_adversarial_loss(zero).item() == pytest.approx(math.log(2))


def test_adversarial_losses_are_fp32_batch_means():
    logits = torch.randn(6, dtype=torch.bfloat16)
    loss = losses.g_adversarial_loss(logits)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.softplus(-logits.float()).mean().item(), rel=1e-5)
    assert losses.g_adversarial_loss(logits.repeat(5)).item() == pytest.approx(loss.item(), rel=1e-5)


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(3, 8)
    assert losses.kl_loss(zeros, zeros).item() == pytest.approx(0.0)
    # per element: 0.5 * (mu^2 + e^logvar - 1 - logvar); mu = 1, logvar = 0 -> 0.5
    assert losses.kl_loss(torch.ones(3, 8), zeros).item() == pytest.approx(0.5)
    assert losses.kl_loss(torch.randn(3, 8), torch.randn(3, 8)).item() > 0


def test_info_nce_aligned_pairs_at_low_temperature_is_near_zero():
    x = F.normalize(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    assert losses.info_nce(x, x, temperature=0.01).item() < 1e-3
    assert losses.info_nce(3.0 * x, x, temperature=0.01).item() < 1e-3  # scale does not matter


@pytest.mark.parametrize("batch", [4, 16, 64])
def test_info_nce_of_unrelated_embeddings_is_about_log_batch(batch):
    g = torch.Generator().manual_seed(batch)
    a, b = torch.randn(batch, 512, generator=g), torch.randn(batch, 512, generator=g)
    # nearly orthogonal random vectors: every logit is about 0, so the loss is about log(B)
    assert losses.info_nce(a, b, temperature=0.5).item() == pytest.approx(math.log(batch), rel=0.1)


def test_info_nce_is_symmetric_fp32_and_differentiable():
    a = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(5, 16)
    loss = losses.info_nce(a.to(torch.bfloat16), b.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    assert losses.info_nce(a, b).item() == pytest.approx(losses.info_nce(b, a).item(), rel=1e-5)
    losses.info_nce(a, b).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert losses.info_nce(a[:1], b[:1]).item() == pytest.approx(0.0)  # no negatives in a batch of one


def test_info_nce_rejects_bad_inputs():
    with pytest.raises(ValueError, match="must both be"):
        losses.info_nce(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="temperature"):
        losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="0-dim"):
        losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=torch.ones(1))


def test_info_nce_with_clip_learned_temperature():
    # The demo CLIP trains with CLIP's logit scale s (temperature 1 / exp(s), exp(s) capped at
    # 100); this is the formula its own loss used before it called info_nce.
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    for value in (math.log(1 / 0.07), 0.0, math.log(200.0)):  # CLIP's start, scale 1, past the cap
        logit_scale, old_scale = torch.tensor(value, requires_grad=True), torch.tensor(value, requires_grad=True)
        loss = losses.info_nce(image, text, temperature=1 / logit_scale.exp().clamp(max=100))
        logits = old_scale.exp().clamp(max=100) * image @ text.T
        labels = torch.arange(6)
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        (loss + expected).backward()
        assert logit_scale.grad.item() == pytest.approx(old_scale.grad.item(), rel=1e-4, abs=1e-7)
        assert (logit_scale.grad != 0) == (value < math.log(100))  # the cap stops the gradient, as in CLIP
    # a float and an equal 0-dim tensor give the same loss
    assert losses.info_nce(image, text, temperature=torch.tensor(0.5)).item() == pytest.approx(
        losses.info_nce(image, text, temperature=0.5).item(), rel=1e-6
    )


def test_mode_seeking_loss_on_known_images():
    z_a, z_b = torch.zeros(2, 8), torch.ones(2, 8)  # mean |z_a - z_b| = 1
    a = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8)]
    b = [torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 8, 8), 0.25)]
    # ratios 0.5 and 0.25 -> mean of 1/0.5 and 1/0.25
    assert losses.mode_seeking_loss(a, b, z_a, z_b).item() == pytest.approx(3.0, rel=1e-4)
    # the same image whatever the noise (collapse) costs the most
    assert losses.mode_seeking_loss(a, a, z_a, z_b).item() == pytest.approx(1e5)
    # its gradient pushes the two images apart
    moving = torch.full((1, 3, 4, 4), 0.1, requires_grad=True)
    losses.mode_seeking_loss([torch.zeros(1, 3, 4, 4)], [moving], z_a[:1], z_b[:1]).backward()
    assert (moving.grad < 0).all()
    with pytest.raises(ValueError, match="same length"):
        losses.mode_seeking_loss(a, b[:1], z_a, z_b)


def test_mode_seeking_loss_at_a_coarse_size_ignores_fine_marks():
    z_a, z_b = torch.zeros(1, 8), torch.ones(1, 8)
    plain = torch.zeros(1, 3, 8, 8)
    checker = (torch.arange(8).view(8, 1) + torch.arange(8)).remainder(2).float().expand(1, 3, 8, 8) - 0.5
    # a 2 px pattern is far from a flat image at full size, and the same image at 4 px
    assert losses.mode_seeking_loss([plain], [checker], z_a, z_b).item() == pytest.approx(2.0, rel=1e-4)
    assert losses.mode_seeking_loss([plain], [checker], z_a, z_b, size=4).item() == pytest.approx(1e5)
    # a change of layout (one half brighter) counts the same at either size
    half = plain.clone()
    half[..., :4] = 0.5
    assert losses.mode_seeking_loss([plain], [half], z_a, z_b, size=4).item() == pytest.approx(4.0, rel=1e-4)
    assert losses.mode_seeking_loss([plain], [half], z_a, z_b).item() == pytest.approx(4.0, rel=1e-4)
    with pytest.raises(ValueError, match="multiples of size=3"):
        losses.mode_seeking_loss([plain], [half], z_a, z_b, size=3)


def test_color_statistics_on_known_images():
    two = torch.stack([torch.full((3, 4, 4), 0.5), torch.zeros(3, 4, 4)])
    two[1, 0, :2] = 1.0  # image 1, red channel: half the pixels 1, half 0
    mean, cov = losses.color_statistics(two)
    assert torch.allclose(mean, torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]]))
    assert torch.allclose(cov[0], torch.zeros(3, 3))  # a flat image has no colour spread
    assert cov[1, 0, 0].item() == pytest.approx(0.25) and cov[1, 1:].abs().sum() == 0


def test_color_consistency_loss_keeps_the_lower_stages_colours():
    torch.manual_seed(0)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    same_colours = F.interpolate(low, scale_factor=2, mode="nearest")  # the same pixels, 4 times each
    assert losses.color_consistency_loss([low, same_colours]).item() == pytest.approx(0.0, abs=1e-10)
    assert losses.color_consistency_loss([low]).item() == 0.0  # one stage: nothing to keep
    # a colour shift of 0.3 in one channel: MSE of the means over 2 x 3 entries
    shifted = same_colours.clone()
    shifted[:, 0] += 0.3
    assert losses.color_consistency_loss([low, shifted]).item() == pytest.approx(0.09 / 3, rel=1e-4)
    # a doubled contrast moves the covariance, weighted x5 (StackGAN-v2)
    _, cov = losses.color_statistics(low)
    contrast = losses.color_consistency_loss([low, 2 * same_colours - same_colours.mean((2, 3), keepdim=True)])
    assert contrast.item() == pytest.approx(5 * F.mse_loss(4 * cov, cov).item(), rel=1e-4)
    # three stages: both upper stages count; only the upper side of each pair gets a gradient
    stages = [low.clone().requires_grad_(True), shifted.clone().requires_grad_(True),
              F.interpolate(shifted, scale_factor=2).requires_grad_(True)]
    total = losses.color_consistency_loss(stages)
    assert total.item() == pytest.approx(0.09 / 3, rel=1e-4)  # stage 2 keeps stage 1's colours: no cost
    total.backward()
    assert stages[0].grad is None and stages[1].grad.abs().sum() > 0


def test_layout_consistency_loss_keeps_the_lower_stages_coarse_picture():
    torch.manual_seed(0)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    refined = F.interpolate(low, scale_factor=2, mode="nearest")
    refined = refined + 0.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8)  # detail finer than 4 px
    assert losses.layout_consistency_loss([low, refined], size=4).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.layout_consistency_loss([low], size=4).item() == 0.0  # one stage: nothing to keep
    # a change the coarse picture shows costs its mean absolute size there
    moved = refined.clone()
    moved[:, :, :8] += 0.4  # the top half brighter
    assert losses.layout_consistency_loss([low, moved], size=4).item() == pytest.approx(0.2, rel=1e-4)
    # ... while the colour-consistency term cannot see the same picture flipped upside down
    flipped = F.interpolate(low, scale_factor=2, mode="nearest").flip(2)
    assert losses.color_consistency_loss([low, flipped]).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.layout_consistency_loss([low, flipped], size=4).item() > 0.1
    # three stages: each upper stage follows the one below; only the upper side of a pair gets a gradient
    stages = [low.clone().requires_grad_(True), moved.clone().requires_grad_(True),
              F.interpolate(moved, scale_factor=2).requires_grad_(True)]
    total = losses.layout_consistency_loss(stages, size=4)
    assert total.item() == pytest.approx(0.2, rel=1e-4)  # stage 2 keeps stage 1's picture: no cost
    total.backward()
    assert stages[0].grad is None and stages[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="size"):
        losses.layout_consistency_loss([low, refined], size=3)


def test_info_nce_runs_in_fp32_inside_autocast():
    # Called from the trainer inside autocast: the similarity matmul must still be fp32.
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(24, 64, generator=g), torch.randn(24, 64, generator=g)
    expected = losses.info_nce(image, text, temperature=0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = losses.info_nce(image, text, temperature=0.07)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, expected)


def test_stage_losses_assemble_the_terms_with_their_weights():
    from helpers.network import DiscOutput

    big, zero, text = torch.full((4,), 20.0), torch.zeros(4), F.normalize(torch.randn(4, 8), dim=1)
    aligned = DiscOutput(uncond=big, cond=big, align=text * 3, mismatched=-big)  # a D that is right everywhere
    fooled = DiscOutput(uncond=zero, cond=zero, align=torch.randn(4, 8))

    def contrast(a, b):
        return losses.info_nce(a, b, temperature=0.1)

    def weights(uncond, align, clip=0.0):
        return SimpleNamespace(uncond_weight=uncond, align_weight=align, clip_weight=clip)

    d = losses.d_stage_losses(aligned, DiscOutput(-big, -big, text), text, weights=weights(2.0, 5.0), contrast=contrast)
    assert set(d) == {"cond", "uncond", "align", "total"}
    assert d["cond"].item() == pytest.approx(0.0, abs=1e-6) and d["uncond"].item() == pytest.approx(0.0, abs=1e-6)
    assert d["total"].item() == pytest.approx(d["cond"].item() + 2 * d["uncond"].item() + 5 * d["align"].item())
    off = losses.d_stage_losses(fooled, fooled, text, weights=weights(0.0, 0.0), contrast=contrast)
    assert set(off) == {"cond", "total"} and off["cond"].item() == pytest.approx(2 * math.log(2))  # no mismatched

    g = losses.g_stage_losses(fooled, text, weights=weights(1.0, 0.0, 10.0), contrast=contrast, clip_embedding=text)
    assert set(g) == {"adv", "clip", "total"}
    assert g["adv"].item() == pytest.approx(2 * math.log(2))  # conditional + unconditional at logit 0
    assert g["total"].item() == pytest.approx(g["adv"].item() + 10 * g["clip"].item())
    assert "clip" not in losses.g_stage_losses(fooled, text, weights=weights(1.0, 1.0, 10.0), contrast=contrast)


def test_matching_aware_penalty_on_a_linear_discriminator():
    """D(x, c) = <w, x> + <v, c>: the gradient is (w, v) everywhere, so the penalty is |(w, v)|^6."""
    w, v = torch.randn(3, 4, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    c = torch.randn(2, 5, requires_grad=True)
    logits = (x * w).flatten(1).sum(1) + c @ v
    penalty = losses.matching_aware_penalty(logits, x, c)
    norm = torch.cat([w.flatten(), v]).detach().norm()
    assert penalty.item() == pytest.approx(norm.item() ** 6, rel=1e-5)
    assert losses.matching_aware_penalty((x * w).flatten(1).sum(1) + c @ v, x, c, power=2).item() == pytest.approx(
        norm.item() ** 2, rel=1e-5)
    penalty.backward()  # the graph is kept: the penalty trains D


def test_penalties_under_a_loss_scale_equal_the_unscaled_ones():
    """fp16 training differentiates the scaled verdict (no underflow) and unscales: same penalty."""
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    c = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 8, 8)
    logits = (torch.tanh(x) * w).flatten(1).sum(1) + (c ** 2).sum(1)
    for penalty, args in ((losses.r1_penalty, (logits, x)), (losses.matching_aware_penalty, (logits, x, c))):
        plain = penalty(*args)
        scaled = penalty(*args, scale=65536.0)
        assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


def test_radial_spectrum_shares_each_images_power_between_rings():
    size = 16
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = torch.cos(2 * math.pi * 3 * x / size)  # 3 cycles per image along x: all power on ring 3
    images = wave.expand(2, 3, size, size).clone()
    rings = losses.radial_spectrum(images)
    assert rings.shape == (size // 2 + 1,) and rings.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert rings[3].item() == pytest.approx(1.0, rel=1e-5)
    # brightness, contrast and position do not move it: only how the power is shared
    assert torch.allclose(losses.radial_spectrum(0.3 * images.roll(5, dims=3) + 0.2), rings, atol=1e-5)
    checker = ((x + y) % 2 * 2 - 1).float().expand(1, 3, size, size)  # the 2 px grid sits in a corner
    assert losses.radial_spectrum(checker).sum().item() == 0.0  # beyond the rings: left out, not counted


def test_spectrum_loss_asks_blurred_images_for_their_fine_detail():
    torch.manual_seed(0)
    sharp = (torch.rand(4, 3, 32, 32) > 0.5).float().repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :32, :32]
    sharp = sharp * 2 - 1
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (blur[:, None] * blur[None, :] / 256).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(sharp, (2, 2, 2, 2), mode="circular"), kernel, groups=3)
    assert losses.spectrum_loss(sharp, sharp.flip(0)).item() < 0.05  # other images, the same sharpness
    assert losses.spectrum_loss(blurred, sharp).item() > 1.0
    # a step down its gradient moves the blurred images' power outwards; the real side gets none
    fake, real = blurred.clone().requires_grad_(True), sharp.clone().requires_grad_(True)
    losses.spectrum_loss(fake, real).backward()
    assert real.grad is None
    outer = slice(8, None)
    before = losses.radial_spectrum(blurred)[outer].sum()
    after = losses.radial_spectrum(blurred - 0.05 * fake.grad / fake.grad.abs().max())[outer].sum()
    assert after > before
    with pytest.raises(ValueError, match="square images of one size"):
        losses.spectrum_loss(blurred, F.avg_pool2d(sharp, 2))
