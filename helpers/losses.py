"""Loss functions of the GAN: small, pure, fp32, averaged over the batch.

Adversarial terms follow StackGAN (Zhang et al. 2017) in the stable logits form
of BCE, including its mismatched-text term (a real image with another image's
caption counts as fake). The contrastive terms follow LAFITE (Zhou et al. 2022):
InfoNCE between image-side embeddings and CLIP text features, computed in fp32
with cross-entropy and averaged over the batch (the bootcamp reference summed
them, which tied their scale to the batch size). The mode-seeking term is
MSGAN's (Mao et al. 2019): it rewards images that move when only the noise does.
The colour-consistency term is StackGAN-v2's (Zhang et al. 2018): each upper stage
keeps the colour statistics of the stage below it. The spectral term follows Durall
et al. (2020): the last stage's mean radial power spectrum follows the real batch's.

``d_stage_losses`` and ``g_stage_losses`` assemble one stage's terms from the
discriminator heads' record (``network.DiscOutput``); each returns a dict of
named terms plus their weighted ``total``, which the trainer logs under
``loss/d/stageN/...`` and ``loss/g/stageN/...``. A new term is one more entry
in one of these dicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .network import DiscOutput

Contrast = Callable[[Tensor, Tensor], Tensor]  # (image-side embedding [B, D], text feature [B, D]) -> InfoNCE scalar


class LossWeights(Protocol):
    """The weights the stage losses read (``train_config.TrainConfig`` has them, one field each)."""

    uncond_weight: float  # unconditional real/fake terms (0: off)
    r1_weight: float  # gamma of the R1 penalty on real images (0: off)
    ma_gp_weight: float  # k of the matching-aware gradient penalty (0: off)
    reg_every: int  # the penalties run every this many steps, weighted by it
    align_weight: float  # gamma: D's alignment InfoNCE (0: off)
    clip_weight: float  # lambda: the CLIP InfoNCE on generated images


def _bce(logits: Tensor, target: float) -> Tensor:
    """Mean BCE-with-logits of ``logits`` [B] against a constant target (0 or 1), fp32."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def d_adversarial_loss(real_logits: Tensor, fake_logits: Tensor, mismatched_logits: Tensor | None = None) -> Tensor:
    """Discriminator loss: real -> 1, fake -> 0 (and mismatched pairs -> 0).

    All logits are [B]. Without a mismatched term: BCE(real, 1) + BCE(fake, 0).
    With it, StackGAN's weighting: BCE(real, 1) + (BCE(fake, 0) + BCE(mismatched, 0)) / 2,
    so the "fake" side keeps the same total weight.
    """
    loss = _bce(real_logits, 1.0)
    if mismatched_logits is None:
        return loss + _bce(fake_logits, 0.0)
    return loss + 0.5 * (_bce(fake_logits, 0.0) + _bce(mismatched_logits, 0.0))


def g_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: BCE(D(fake), 1); fake_logits [B] -> scalar."""
    return _bce(fake_logits, 1.0)


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of conditioning augmentation, mean over all elements.

    mu, logvar: [B, cond_dim]. The per-element mean is StackGAN's convention.
    """
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


def info_nce(image_emb: Tensor, text_emb: Tensor, *, temperature: float | Tensor = 0.5) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``image_emb`` and ``text_emb``.

    image_emb [B, D], text_emb [B, D] (any scale: both are L2-normalised here, in
    fp32, with autocast turned off). Row i of each is a positive pair; the other rows of the batch are the
    negatives. The loss is the mean of the cross-entropy in both directions
    (text -> images and image -> texts) on cosine similarities / temperature.
    Perfectly aligned pairs at a low temperature give about 0; unrelated
    embeddings give about log(B). A batch of one gives exactly 0 (no negatives).
    ``temperature`` may also be a 0-dim tensor, a learned one (CLIP's 1 / exp(logit_scale)),
    which then receives its gradient.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image_emb and text_emb must both be [B, D], got {list(image_emb.shape)} and {list(text_emb.shape)}")
    if isinstance(temperature, Tensor):
        if temperature.ndim != 0:
            raise ValueError(f"a tensor temperature must be 0-dim, got shape {list(temperature.shape)}")
        temperature = temperature.float()
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # autocast off: called inside the trainer's autocast, the matmul would otherwise run in bf16/fp16
    with torch.autocast(image_emb.device.type, enabled=False):
        img = F.normalize(image_emb.float(), dim=1)
        txt = F.normalize(text_emb.float(), dim=1)
        logits = txt @ img.t() / temperature  # [B_text, B_image]
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def average_down(images: list[Tensor], size: int, *, caller: str) -> list[Tensor]:
    """Every image batch [B, 3, H, W] averaged over blocks down to [B, 3, size, size] (fp32), where a face's
    layout and colours show and its fine marks do not; every side must be a multiple of ``size``."""
    bad = [tuple(img.shape[-2:]) for img in images if img.shape[-1] % size or img.shape[-2] % size]
    if size < 1 or bad:
        raise ValueError(f"{caller} needs image sides that are multiples of size={size}, got {bad}")
    return [F.adaptive_avg_pool2d(img.float(), size) for img in images]


def mode_seeking_loss(images_a: list[Tensor], images_b: list[Tensor], z_a: Tensor, z_b: Tensor, *,
                      size: int | None = None, eps: float = 1e-5) -> Tensor:
    """MSGAN's mode-seeking term: 1 / (image distance / noise distance), averaged over stages.

    images_a[s], images_b[s]: [K, 3, H, W] in [-1, 1], generated from the same K texts
    with noise z_a and z_b [K, z_dim]. Per stage, the ratio is mean |a - b| / mean |z_a - z_b|;
    the loss is the mean over stages of 1 / (ratio + eps), large when G ignores z (mode
    collapse) and small when different noise gives different images. With ``size``, both
    images are first averaged down to ``size`` x ``size`` pixels (every side a multiple of
    it): the distance then counts changes of layout and colour, not fine marks, which a
    stage could otherwise add to look varied.
    """
    if len(images_a) != len(images_b) or not images_a:
        raise ValueError("images_a and images_b must be non-empty lists of the same length")
    if size is not None:
        images_a = average_down(images_a, size, caller="mode_seeking_loss")
        images_b = average_down(images_b, size, caller="mode_seeking_loss")
    z_gap = (z_a.float() - z_b.float()).abs().mean()
    terms = [1.0 / ((a.float() - b.float()).abs().mean() / z_gap + eps) for a, b in zip(images_a, images_b)]
    return torch.stack(terms).mean()


def color_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image colour mean [B, 3] and covariance [B, 3, 3] over the pixels of images [B, 3, H, W] (fp32)."""
    x = images.float().flatten(2)  # [B, 3, H*W]
    mean = x.mean(2)
    centred = x - mean.unsqueeze(2)
    return mean, centred @ centred.transpose(1, 2) / x.shape[2]


def color_consistency_loss(images: list[Tensor], *, covariance_weight: float = 5.0) -> Tensor:
    """StackGAN-v2's colour-consistency term, summed over the upper stages.

    images[s]: stage s's images [B, 3, H_s, W_s] in [-1, 1] (the sizes may differ). For
    every stage s >= 1: MSE between its per-image colour mean and that of stage s - 1,
    plus ``covariance_weight`` (StackGAN-v2: 5) x MSE between their colour covariances.
    The lower stage is detached: the upper stage follows it, not the other way round.
    A single stage gives 0.
    """
    total = images[0].new_zeros((), dtype=torch.float32)
    for lower, upper in itertools.pairwise(images):
        mean_l, cov_l = color_statistics(lower.detach())
        mean_u, cov_u = color_statistics(upper)
        total = total + F.mse_loss(mean_u, mean_l) + covariance_weight * F.mse_loss(cov_u, cov_l)
    return total


def layout_consistency_loss(images: list[Tensor], *, size: int) -> Tensor:
    """Each upper stage keeps the coarse picture of the stage below, summed over the upper stages.

    images[s]: stage s's images [B, 3, H_s, W_s] in [-1, 1], every side a multiple of
    ``size``. For every stage s >= 1: the mean absolute difference between its images
    and those of stage s - 1, both averaged down to ``size`` x ``size`` pixels, where a
    face's layout, pose and colours show and its details (eyes, strands, glasses'
    frames) do not. The lower stage is detached, as in ``color_consistency_loss``: the
    upper stage refines the picture below instead of drawing its own. One stage gives 0.
    """
    coarse = average_down(images, size, caller="layout_consistency_loss")
    total = images[0].new_zeros((), dtype=torch.float32)
    for lower, upper in itertools.pairwise(coarse):
        total = total + (upper - lower.detach()).abs().mean()
    return total


def radial_spectrum(images: Tensor) -> Tensor:
    """The mean radial power spectrum of images [B, 3, H, H] in [-1, 1] -> [H // 2 + 1] (fp32, sums to 1).

    Each image is made grey and its mean removed; its power spectrum (``torch.fft.fft2``) is
    summed over rings of integer radius (in cycles per image, along the axes up to H / 2, the
    sampling rate's half: the corners beyond it are left out) and divided by its total over those
    rings, so the result says how the images' power is shared between coarse and fine frequencies,
    not how much power they hold; then averaged over the batch.
    """
    size = images.shape[-1]
    grey = images.float().mean(1)
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs().pow(2)  # [B, H, H]
    f = torch.fft.fftfreq(size, d=1.0 / size, device=images.device)
    ring = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().round().long().flatten()
    inside = ring <= size // 2
    rings = images.new_zeros((power.shape[0], size // 2 + 1), dtype=torch.float32)
    rings = rings.index_add(1, ring[inside], power.flatten(1)[:, inside])
    rings = rings / rings.sum(1, keepdim=True).clamp_min(1e-12)
    return rings.mean(0)


def spectrum_loss(fake: Tensor, real: Tensor, *, eps: float = 1e-8) -> Tensor:
    """How differently fake and real images [B, 3, H, H] in [-1, 1] share their power across frequencies.

    The mean squared difference of the logarithms of their ``radial_spectrum`` over its rings (the
    radius-0 ring, the images' mean, is removed before and left out): 0 when the generated images are
    as smooth or as sharp as the real ones, ring by ring; a generator short of fine detail pays at
    the outer rings, where its share falls off decades below real faces'. Durall et al. (2020,
    "Watch your up-convolution") add such a term so that G reproduces real images' spectra; the
    real side is detached.
    """
    if fake.shape[-2:] != real.shape[-2:] or fake.shape[-1] != fake.shape[-2]:
        raise ValueError(f"spectrum_loss needs square images of one size, got {tuple(fake.shape)} and "
                         f"{tuple(real.shape)}")
    ours, theirs = radial_spectrum(fake)[1:], radial_spectrum(real.detach())[1:]
    return ((ours + eps).log() - (theirs + eps).log()).pow(2).mean()


# --------------------------------------------------------------------------- one stage, assembled


def d_stage_losses(
    real: DiscOutput, fake: DiscOutput, text: Tensor, *, weights: LossWeights, contrast: Contrast,
    r1: Tensor | None = None, ma_gp: Tensor | None = None,
) -> dict[str, Tensor]:
    """One discriminator's loss terms for a step.

    real: the heads on real images (``cond`` for their own condition, ``mismatched``
    for another sample's, or None to leave StackGAN's mismatched term out);
    fake: the heads on the detached fakes. text [B, D]: the real images' text
    features, for the alignment InfoNCE (``contrast``); r1: ``r1_penalty`` of the real
    batch, or None; ma_gp: ``matching_aware_penalty`` of it, or None. Terms: ``cond``
    (always), ``uncond`` (weight > 0), ``align`` (weight > 0), ``r1`` (when given, weighted
    gamma / 2), ``ma_gp`` (when given, weighted k), and ``total``, their weighted sum. The
    penalties are computed every ``reg_every`` steps only, so their weights are multiplied
    by it (StyleGAN2's lazy regularisation keeps the same average strength).
    """
    terms = dict(cond=d_adversarial_loss(real.cond, fake.cond, real.mismatched))
    total = terms["cond"]
    if weights.uncond_weight > 0:
        terms["uncond"] = d_adversarial_loss(real.uncond, fake.uncond)
        total = total + weights.uncond_weight * terms["uncond"]
    if weights.align_weight > 0:
        terms["align"] = contrast(real.align, text)
        total = total + weights.align_weight * terms["align"]
    if r1 is not None:
        terms["r1"] = r1
        total = total + 0.5 * weights.r1_weight * weights.reg_every * r1
    if ma_gp is not None:
        terms["ma_gp"] = ma_gp
        total = total + weights.ma_gp_weight * weights.reg_every * ma_gp
    terms["total"] = total
    return terms


def _input_gradients(output: Tensor, inputs: tuple[Tensor, ...], scale: float | None) -> list[Tensor]:
    """d output / d inputs (graph kept), in fp32. With ``scale`` (fp16 training: the GradScaler's
    current scale) the output is scaled before differentiating and the gradients unscaled after,
    as PyTorch's AMP recipe for gradient penalties does, so small fp16 gradients do not underflow."""
    if scale is None:
        return [g.float() for g in torch.autograd.grad(output, inputs, create_graph=True)]
    grads = torch.autograd.grad(output * scale, inputs, create_graph=True)
    return [g.float() / scale for g in grads]


def r1_penalty(real_logits: Tensor, real_images: Tensor, *, scale: float | None = None) -> Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of |d sum(real_logits) / d real_images|^2.

    real_logits [B] computed from real_images [B, 3, H, W] (which require grad); the
    graph is kept, so the penalty itself can be backpropagated into D's weights.
    ``scale``: the fp16 GradScaler's scale, or None (see ``_input_gradients``).
    """
    (grad,) = _input_gradients(real_logits.float().sum(), (real_images,), scale)
    return grad.pow(2).flatten(1).sum(1).mean()


def matching_aware_penalty(
    cond_logits: Tensor, real_images: Tensor, condition: Tensor, *, power: float = 6.0, scale: float | None = None,
) -> Tensor:
    """DF-GAN's matching-aware gradient penalty (Tao et al. 2022): mean over the batch of
    |(d cond_logits / d real_images, d cond_logits / d condition)| ** power.

    cond_logits [B]: D's conditional verdict on real images [B, 3, H, W] with their own
    condition [B, C] (both require grad). Flattening D around the matching pairs
    smooths it where generated pairs must go. DF-GAN: power 6, weight 2. ``scale``: as for
    ``r1_penalty``.
    """
    grads = _input_gradients(cond_logits.float().sum(), (real_images, condition), scale)
    norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
    return norm.pow(power).mean()


def g_stage_losses(
    fake: DiscOutput, text: Tensor, *, weights: LossWeights, contrast: Contrast, clip_embedding: Tensor | None = None,
) -> dict[str, Tensor]:
    """The generator's loss terms at one stage.

    fake: the discriminator's heads on the (not detached) fakes; text [B, D]: the
    text features they were generated from; clip_embedding [B, D]: CLIP's embedding
    of the fakes at a stage with the CLIP loss, else None. Terms: ``adv`` (the
    conditional plus weighted unconditional non-saturating terms), ``align`` (weight
    > 0), ``clip`` (when an embedding is given), and ``total``, their weighted sum.
    """
    adv = g_adversarial_loss(fake.cond)
    if weights.uncond_weight > 0:
        adv = adv + weights.uncond_weight * g_adversarial_loss(fake.uncond)
    terms = dict(adv=adv)
    total = adv
    if weights.align_weight > 0:
        terms["align"] = contrast(fake.align, text)
        total = total + weights.align_weight * terms["align"]
    if clip_embedding is not None:
        terms["clip"] = contrast(clip_embedding, text)
        total = total + weights.clip_weight * terms["clip"]
    terms["total"] = total
    return terms
