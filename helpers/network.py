"""Networks: the multi-stage generator and one discriminator per stage.

StackGAN++ (Zhang et al. 2018) conditioned on CLIP features, with the
discriminator alignment head of LAFITE (Zhou et al. 2022); sizes follow the
OUTTA 2023 bootcamp reference, with its bugs fixed:

- conditioning augmentation is linear (the reference's ReLU collapsed it);
- the alignment head sees image features only (the reference fed it the
  condition, so it could match the text without looking at the image);
- every head returns logits (losses use the stable logits form of BCE);
- nothing assumes a batch size or a 4x4 map; stages are built from a schedule.

This module holds nn.Modules and pure tensor functions only: no I/O, no
optimisers, no stored devices.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, stage_resolution

LEAK = 0.2  # LeakyReLU slope of the discriminators (DCGAN / StackGAN)


# --------------------------------------------------------------------------- blocks


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 convolution keeping the size; no bias because BatchNorm follows."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)


class Blur(nn.Module):
    """The [1, 2, 1] / 4 binomial low-pass in both directions, per channel (edges replicated):
    [B, C, H, W] -> [B, C, H, W]. Its response is exactly 0 at the Nyquist frequency, so a map
    leaves it without any 2 px periodic pattern; it halves the amplitude at a 4 px period and keeps
    85% at 8 px (BlurPool, Zhang 2019; the FIR filter StyleGAN applies after each upsampling)."""

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 16)[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel.to(x.dtype).expand(x.shape[1], 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


class MinibatchStd(nn.Module):
    """ProGAN's minibatch standard deviation: [B, C, H, W] -> [B, C + 1, H, W].

    The batch is split into groups of ``group`` images (one group of all B when B is no
    multiple of it); the extra channel holds, for every image, the standard deviation
    over its group of each feature, averaged over channels and positions: near 0 when
    the group's images look alike, so a discriminator can tell a batch with less variety
    than real images have (Karras et al. 2018; StyleGAN's group of 4).
    """

    def __init__(self, group: int = 4) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        g = self.group if B % self.group == 0 else B
        spread = x.float().view(-1, g, C, H, W).var(1, unbiased=False).add(1e-8).sqrt().flatten(1).mean(1)  # [B / g]
        extra = spread.repeat_interleave(g)[:, None, None, None].expand(B, 1, H, W).to(x.dtype)
        return torch.cat([x, extra], dim=1)


class GLU(nn.Module):
    """[B, 2C, H, W] -> [B, C, H, W]: the first C channels gated by the sigmoid of the last C.

    The values of ``nn.GLU(dim=1)``, written as ``a * sigmoid(b)`` because PyTorch's fused GLU
    returns its input gradient in the NCHW layout whatever the input's: with channels-last
    features, the BatchNorm before it then takes a mixed-layout backward path, about ten times
    slower on the CPU. Written out, every gradient keeps the input's layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class UpBlock(nn.Sequential):
    """[B, in_ch, H, W] -> [B, out_ch, 2H, 2W], by ``mode``:

    - ``deconv``: 4x4 stride-2 transposed conv, BatchNorm, ReLU (the reference; its uneven
      kernel overlap leaves a periodic pattern, Odena et al. 2016);
    - ``nearest``: nearest-neighbour x2, 3x3 conv, BatchNorm, ReLU;
    - ``nearest_glu``: nearest x2, 3x3 conv to 2 * out_ch, BatchNorm, GLU (StackGAN-v2's up-block);
    - ``bilinear``, ``bilinear_glu``: the same with bilinear x2 (the [1, 3, 3, 1] / 4 kernel,
      StyleGAN's low-pass up-filter). x2 upsampling mirrors the input's spectrum above the input's
      Nyquist frequency, the fine grid the following conv must learn to cancel: nearest x2 keeps
      about 30% of white noise's power there, bilinear x2 about 7%.

    ``blur``: the block's output passes ``Blur``. Upsampling makes even and odd output pixels
    different functions of the input; after the nonlinearity that difference is a 2 px pattern in
    the features, which later stages carry up as 4 and 8 px patterns. The filter removes it where it
    is made, after the nonlinearity, so no up-block hands a 2 px grid to the next layer.
    """

    def __init__(self, in_ch: int, out_ch: int, mode: str = "deconv", *, blur: bool = False) -> None:
        if mode == "deconv":
            layers: list[nn.Module] = [
                nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        elif mode in ("nearest", "nearest_glu", "bilinear", "bilinear_glu"):
            interpolation, _, glu = mode.partition("_")
            width = 2 * out_ch if glu else out_ch
            corners = {"align_corners": False} if interpolation == "bilinear" else {}
            up = nn.Upsample(scale_factor=2, mode=interpolation, **corners)
            layers = [up, conv3x3(in_ch, width), nn.BatchNorm2d(width),
                      GLU() if glu else nn.ReLU(inplace=True)]
        else:
            raise ValueError(f"unknown upsampling mode {mode!r}")
        super().__init__(*layers, *([Blur()] if blur else []))


class ResBlock(nn.Module):
    """x + F(x) with F = conv-BN-ReLU-conv-BN; [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ImageHead(nn.Sequential):
    """[B, C, H, W] features -> [B, 3, H, W] image in [-1, 1] (3x3 conv + tanh; with ``image_skip``
    an upper stage adds the stage below's pre-tanh image, upsampled, between the two)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, 3, kernel_size=3, padding=1), nn.Tanh())


def tile(vector: Tensor, like: Tensor) -> Tensor:
    """Repeat ``vector`` [B, C] over the spatial size of ``like`` [B, *, H, W] -> [B, C, H, W]."""
    return vector[:, :, None, None].expand(-1, -1, like.shape[2], like.shape[3])


def conv_tiled(vector: Tensor, weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``conv2d(tile(vector), weight, padding=1)`` over an [H, W] map, without the big convolution.

    vector [B, C]; weight [O, C, 3, 3]; -> [B, O, H, W] (H, W >= 2). With zero padding,
    a tiled input gives one value per (top | middle | bottom) x (left | middle | right)
    position class, so a 3x3 map holds every distinct output.
    """
    H, W = size
    small = F.conv2d(vector[:, :, None, None].expand(-1, -1, 3, 3), weight, padding=1)  # [B, O, 3, 3]
    rows = torch.cat([small[:, :, :1], small[:, :, 1:2].expand(-1, -1, H - 2, -1), small[:, :, 2:]], dim=2)
    return torch.cat([rows[..., :1], rows[..., 1:2].expand(-1, -1, -1, W - 2), rows[..., 2:]], dim=3)


# --------------------------------------------------------------------------- generator


class ConditioningAugmentation(nn.Module):
    """CLIP feature -> (condition, mu, logvar), each [B, cond_dim].

    A linear layer (no activation) gives the mean and log-variance of a Gaussian;
    the condition is a reparameterised sample ``mu + noise * exp(logvar / 2) * eps``
    (``noise``: ``ModelConfig.ca_noise``, 1 in StackGAN; at 0 the condition is ``mu``).
    """

    def __init__(self, text_dim: int, cond_dim: int, noise: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(text_dim, 2 * cond_dim)
        self.noise = noise

    def forward(
        self, text_emb: Tensor, eps: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """text_emb [B, text_dim]; eps [B, cond_dim] standard normal (drawn here if None)."""
        mu, logvar = self.fc(text_emb).chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        condition = mu + self.noise * torch.exp(0.5 * logvar) * eps if self.noise else mu
        return condition, mu, logvar


class InitStage(nn.Module):
    """Stage 1: [condition, z] -> linear -> [B, ng, 4, 4] -> 4 x UpBlock -> [B, ng/16, 64, 64]."""

    def __init__(self, in_dim: int, ng: int, upsample: str = "deconv", *, blur: bool = False) -> None:
        super().__init__()
        self.ng = ng
        self.fc = nn.Sequential(
            nn.Linear(in_dim, ng * 4 * 4, bias=False),
            nn.BatchNorm1d(ng * 4 * 4),
            nn.ReLU(inplace=True),
        )
        self.up = nn.Sequential(*[UpBlock(ng // 2**i, ng // 2 ** (i + 1), upsample, blur=blur) for i in range(4)])

    def forward(self, condition: Tensor, z: Tensor) -> Tensor:
        x = self.fc(torch.cat([condition, z], dim=1)).view(-1, self.ng, 4, 4)
        return self.up(x)


class NextStage(nn.Module):
    """Stage 2 or 3: [B, C, H, W] features + condition -> [B, C/2, 2H, 2W] features.

    The condition is tiled over the map and concatenated, joined by a 3x3 conv,
    refined by residual blocks, then upsampled x2.
    """

    def __init__(
        self, channels: int, cond_dim: int, num_res_blocks: int, upsample: str = "deconv", *, blur: bool = False
    ) -> None:
        super().__init__()
        self.join = nn.Sequential(
            conv3x3(channels + cond_dim, channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.res = nn.Sequential(*[ResBlock(channels) for _ in range(num_res_blocks)])
        self.up = UpBlock(channels, channels // 2, upsample, blur=blur)

    def forward(self, features: Tensor, condition: Tensor) -> Tensor:
        # join(cat[tile(c), x]) computed as conv(x) + conv(tile(c)): the second term is
        # constant away from the border, so it is evaluated on a 3x3 map and stretched
        # (see conv_tiled). Same result, without convolving cond_dim constant channels
        # at full resolution (most of the join's cost).
        conv = self.join[0]
        w_cond, w_feat = conv.weight.split([condition.shape[1], features.shape[1]], dim=1)
        x = F.conv2d(features, w_feat, padding=1) + conv_tiled(condition, w_cond, features.shape[-2:])
        if conv.bias is not None:  # present once BatchNorm is folded into the conv
            x = x + conv.bias.view(1, -1, 1, 1)
        x = self.join[1:](x)
        return self.up(self.res(x))


class GeneratorOutput(NamedTuple):
    """What the generator gives for a batch (a tuple: ``images, mu, logvar = G(...)`` works)."""

    images: list[Tensor]  # one per stage: [B, 3, 64 * 2**i, 64 * 2**i] in [-1, 1]
    mu: Tensor  # [B, cond_dim] mean of the conditioning Gaussian (the condition D is given)
    logvar: Tensor  # [B, cond_dim] its log-variance (for the KL term)


class Generator(nn.Module):
    """Text feature + noise -> images at 64, 128, 256 px (as many as ``num_stages``).

    forward(text_emb [B, text_dim] L2-normalised, z [B, z_dim] ~ N(0, I),
            ca_noise [B, cond_dim] ~ N(0, I) or None, generator=None)
      -> GeneratorOutput(images: list of [B, 3, 64 * 2**i, 64 * 2**i] in [-1, 1],
                         mu [B, cond_dim], logvar [B, cond_dim])

    ``ca_noise`` (the conditioning-augmentation noise) is drawn from ``generator``
    when not given, so the model itself never touches a global seed.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ca = ConditioningAugmentation(cfg.text_dim, cfg.cond_dim, cfg.ca_noise)
        channels = cfg.stage_channels  # e.g. [64, 32, 16] for ng = 1024
        stages: list[nn.Module] = [InitStage(cfg.cond_dim + cfg.z_dim, cfg.ng, cfg.upsample, blur=cfg.up_blur)]
        upper_dim = cfg.cond_dim + (cfg.z_dim if cfg.z_every_stage else 0)  # what stages 2 and 3 tile
        upper_up = cfg.upper_upsample or cfg.upsample
        stages += [NextStage(c, upper_dim, cfg.num_res_blocks, upper_up, blur=cfg.up_blur) for c in channels[:-1]]
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList([ImageHead(c) for c in channels])

    def forward(
        self,
        text_emb: Tensor,
        z: Tensor,
        ca_noise: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> GeneratorOutput:
        self._check_text(text_emb)
        if z.shape != (text_emb.shape[0], self.cfg.z_dim):
            raise ValueError(f"z must be [{text_emb.shape[0]}, {self.cfg.z_dim}], got {list(z.shape)}")
        condition, mu, logvar = self.ca(text_emb, ca_noise, generator=generator)
        features = self.stages[0](condition, z)
        drawn = self.heads[0][0](features)  # the image before tanh
        images = [self.heads[0][1](drawn)]
        upper = torch.cat([condition, z], dim=1) if self.cfg.z_every_stage else condition
        for stage, (conv, tanh) in zip(self.stages[1:], self.heads[1:]):
            features = stage(features, upper)
            below = drawn
            drawn = conv(features)
            if self.cfg.image_skip:  # draw on the stage below's picture
                drawn = drawn + F.interpolate(below, scale_factor=2, mode="bilinear", align_corners=False)
            images.append(tanh(drawn))
        return GeneratorOutput(images, mu, logvar)

    def condition_mean(self, text_emb: Tensor) -> Tensor:
        """text_emb [B, text_dim] -> mu [B, cond_dim]: the noise-free condition of a text (what D is given)."""
        self._check_text(text_emb)
        return self.ca(text_emb, torch.zeros(text_emb.shape[0], self.cfg.cond_dim, device=text_emb.device))[1]

    def _check_text(self, text_emb: Tensor) -> None:
        if text_emb.ndim != 2 or text_emb.shape[1] != self.cfg.text_dim:
            raise ValueError(f"text_emb must be [B, {self.cfg.text_dim}], got {list(text_emb.shape)}")


# --------------------------------------------------------------------------- discriminator


def down_block(in_ch: int, out_ch: int, *, norm: bool = True) -> nn.Sequential:
    """[B, in_ch, H, W] -> [B, out_ch, H/2, W/2]: 4x4 stride-2 conv, BatchNorm, LeakyReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers)


def same_block(in_ch: int, out_ch: int, *, norm: bool = True) -> nn.Sequential:
    """[B, in_ch, H, W] -> [B, out_ch, H, W]: 3x3 conv, BatchNorm, LeakyReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers)


class DiscOutput(NamedTuple):
    """What a discriminator's heads say about a batch of images: one record per batch."""

    uncond: Tensor  # [B] unconditional real/fake logit
    cond: Tensor | None  # [B] conditional logit (None when no condition was given)
    align: Tensor | None  # [B, text_dim] alignment embedding, from the image alone (None: not asked)
    mismatched: Tensor | None = None  # [B] conditional logit for another sample's condition (None: not asked)


class StageDiscriminator(Protocol):
    """The interface the trainer uses: run the trunk once per image batch, then every head on it.

    A new discriminator (another trunk, another head) implements these two methods
    and the losses and the trainer need no change.
    """

    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> trunk features (any shape the heads take)."""
        ...

    def heads(
        self, features: Tensor, condition: Tensor | None = None, *, mismatched: Tensor | None = None, align: bool = True,
    ) -> DiscOutput:
        """features of one batch, condition [B, cond_dim] (and optionally a mismatched one) -> ``DiscOutput``
        (``align=False``: no alignment embedding, for a batch whose embedding no loss reads)."""
        ...


class Discriminator(nn.Module):
    """Discriminator for stage ``stage`` (0-based), images [B, 3, 64 * 2**stage, same].

    trunk: 4 stride-2 convs -> [B, 8nd, H/16, W/16];
    prior: ``stage`` stride-2 convs doubling channels down to 4x4, then ``stage``
           3x3 convs halving them back -> [B, 8nd, 4, 4] (the reference's layout);
    heads on those features (``heads``, one ``DiscOutput``): unconditional logit,
    conditional logit (condition tiled and concatenated; also for a mismatched
    condition when given), alignment embedding (image features only).
    A ``StageDiscriminator``: the trainer calls ``features`` and ``heads`` only.
    """

    def __init__(self, cfg: ModelConfig, stage: int) -> None:
        super().__init__()
        if not 0 <= stage < cfg.num_stages:
            raise ValueError(f"stage must be in [0, {cfg.num_stages}), got {stage}")
        nd, top, norm = cfg.nd, 8 * cfg.nd, cfg.d_norm == "batch"
        self.resolution = stage_resolution(stage)
        self.trunk = nn.Sequential(
            down_block(3, nd, norm=False),
            down_block(nd, 2 * nd, norm=norm),
            down_block(2 * nd, 4 * nd, norm=norm),
            down_block(4 * nd, top, norm=norm),
        )
        widths = [top * 2**i for i in range(stage + 1)]  # e.g. 512, 1024, 2048
        prior = [down_block(a, b, norm=norm) for a, b in zip(widths[:-1], widths[1:])]
        prior += [same_block(a, b, norm=norm) for a, b in zip(widths[:0:-1], widths[-2::-1])]
        self.prior = nn.Sequential(*prior)
        self.minibatch_std = MinibatchStd(cfg.d_minibatch_std) if cfg.d_minibatch_std else nn.Identity()
        width = top + (1 if cfg.d_minibatch_std else 0)  # the heads' input: the 4x4 features (+ their spread)
        self.uncond_head = nn.Conv2d(width, 1, kernel_size=4, stride=4)
        self.cond_head = nn.Sequential(same_block(width + cfg.cond_dim, top, norm=norm), nn.Conv2d(top, 1, 4, stride=4))
        self.align_head = nn.Sequential(
            nn.Conv2d(width, top, kernel_size=3, bias=not norm),  # 4x4 -> 2x2
            nn.BatchNorm2d(top) if norm else nn.Identity(),
            nn.SiLU(inplace=True),
            nn.Conv2d(top, cfg.text_dim, kernel_size=2, stride=2),  # 2x2 -> 1x1
        )


    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> features [B, 8nd, 4, 4] ([B, 8nd + 1, 4, 4] with ``d_minibatch_std``)."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(
                f"this discriminator takes {self.resolution} px images, got {list(images.shape)}"
            )
        return self.minibatch_std(self.prior(self.trunk(images)))

    def heads(
        self, features: Tensor, condition: Tensor | None = None, *, mismatched: Tensor | None = None, align: bool = True,
    ) -> DiscOutput:
        """features [B, 8nd, 4, 4]; condition, mismatched [B, cond_dim] or None -> ``DiscOutput``.

        Logits [B] (unconditional; conditional on ``condition``; conditional on
        ``mismatched``, another sample's condition) and, with ``align``, the alignment
        embedding [B, text_dim] (not normalised), all from the same features. (The
        alignment head has BatchNorm: a batch no loss reads must not move its statistics.)
        """
        uncond = self.uncond_head(features).flatten(1).mean(1)
        cond = None if condition is None else self._cond_logits(features, condition)
        mis = None if mismatched is None else self._cond_logits(features, mismatched)
        return DiscOutput(uncond, cond, self.align_head(features).flatten(1) if align else None, mis)

    def _cond_logits(self, features: Tensor, condition: Tensor) -> Tensor:
        x = torch.cat([features, tile(condition, features)], dim=1)
        return self.cond_head(x).flatten(1).mean(1)

    def forward(self, images: Tensor, condition: Tensor | None = None, *, mismatched: Tensor | None = None) -> DiscOutput:
        """``heads(features(images), condition, mismatched=...)``: the trunk once, every head on it."""
        return self.heads(self.features(images), condition, mismatched=mismatched)


class ClipAidedDiscriminator(Discriminator):
    """The last stage's discriminator with a second opinion read from frozen CLIP image features.

    As GALIP (Tao et al. 2023) and Vision-aided GAN (Kumari et al. 2022) do, a small
    head judges the run's own CLIP embedding of the images; it is text-conditioned
    by projection (Miyato & Koyama 2018): logit = psi(h) + <W c, h>, with h an MLP
    of the embedding [B, text_dim] and c the condition [B, cond_dim]. That logit is
    added to the conv heads' conditional (and mismatched) logits. The CLIP itself
    is not part of D's weights: ``attach_clip`` hands it the embedding function
    (``ClipEncoder.embed_generated``: images in [-1, 1] -> [B, text_dim],
    differentiable with respect to the images).
    """

    def __init__(self, cfg: ModelConfig, stage: int) -> None:
        super().__init__(cfg, stage)
        hidden = 2 * cfg.text_dim
        self.clip_trunk = nn.Sequential(
            nn.Linear(cfg.text_dim, hidden), nn.LeakyReLU(LEAK, inplace=True),
            nn.Linear(hidden, hidden), nn.LeakyReLU(LEAK, inplace=True),
        )
        self.clip_psi = nn.Linear(hidden, 1)
        self.clip_project = nn.Linear(cfg.cond_dim, hidden, bias=False)
        self.embed: Callable[[Tensor], Tensor] | None = None

    def attach_clip(self, embed: Callable[[Tensor], Tensor]) -> None:
        """Give the discriminator the frozen CLIP's embedding function (not saved with its weights)."""
        self.embed = embed

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """images [B, 3, H, W] in [-1, 1] -> (conv features [B, 8nd, 4, 4], CLIP-head features [B, 2 * text_dim])."""
        if self.embed is None:
            raise RuntimeError("a ClipAidedDiscriminator needs attach_clip(clip.embed_generated) before use")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the math kernel: R1 and MA-GP differentiate through CLIP's attention twice, which the
        # fused attention kernels (flash, memory-efficient, CPU flash) cannot
        with sdpa_kernel(SDPBackend.MATH):
            embedding = self.embed(images).float()
        return super().features(images), self.clip_trunk(embedding)

    def heads(  # type: ignore[override]
        self, features: tuple[Tensor, Tensor], condition: Tensor | None = None, *, mismatched: Tensor | None = None,
        align: bool = True,
    ) -> DiscOutput:
        conv, h = features
        out = super().heads(conv, condition, mismatched=mismatched, align=align)
        psi = self.clip_psi(h).squeeze(1)

        def projected(c: Tensor) -> Tensor:
            return psi + (self.clip_project(c.float()) * h).sum(1)

        return out._replace(
            cond=None if condition is None else out.cond + projected(condition),
            mismatched=None if mismatched is None else out.mismatched + projected(mismatched),
        )


def build_discriminators(cfg: ModelConfig) -> nn.ModuleList:
    """One discriminator per stage, in stage order (the last one CLIP-aided with ``d_clip_head``)."""
    last = cfg.num_stages - 1
    return nn.ModuleList([
        ClipAidedDiscriminator(cfg, stage) if cfg.d_clip_head and stage == last else Discriminator(cfg, stage)
        for stage in range(cfg.num_stages)
    ])


# --------------------------------------------------------------------------- init and summary


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The reference's init, for ``model.apply``: convs and linears N(0, 0.02)
    (biases zero), BatchNorm weights N(1, 0.02) and biases zero."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(cfg: ModelConfig, *, seed: int | None = None, clip: Any = None) -> tuple[Generator, nn.ModuleList]:
    """A freshly initialised generator and its discriminators (seeded if ``seed`` is given).

    ``clip``: the run's CLIP (a ``ClipEncoder``), which a CLIP-aided discriminator
    (``model.d_clip_head``) reads; without it such a discriminator cannot run until
    ``attach_clip`` is called.
    """
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        generator = Generator(cfg)
        discriminators = build_discriminators(cfg)
        generator.apply(init_weights)
        discriminators.apply(init_weights)
        if cfg.ca_init_gain is not None:  # StackGAN-v2 initialises orthogonally: the text part of the condition
            nn.init.orthogonal_(generator.ca.fc.weight, gain=cfg.ca_init_gain)  # is no longer ~2% of the noise's scale
        if cfg.d_spectral_norm:  # after the init: the parametrisation divides the initialised weight by its norm
            for module in discriminators.modules():
                if isinstance(module, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(module)
    if clip is not None:
        for disc in discriminators:
            if isinstance(disc, ClipAidedDiscriminator):
                disc.attach_clip(clip.embed_generated)
    return generator, discriminators


_FOLDABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold the eval-mode affine map of ``bn`` into ``layer``'s weight and bias, in place."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    # the output-channel axis of the weight: dim 0, except dim 1 for transposed convs
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    shape = [1] * layer.weight.ndim
    shape[axis] = -1
    layer.weight.mul_(scale.view(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    layer.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` for inference, with every BatchNorm that directly
    follows a conv, transposed conv or linear layer inside an ``nn.Sequential`` folded into
    that layer (and replaced by ``nn.Identity``).

    Outputs equal the eval-mode module's up to float rounding; one memory pass per folded
    BatchNorm is saved. ``module`` itself is not changed. Not for training: the folded
    copy has no batch statistics.
    """
    folded = copy.deepcopy(module).eval().requires_grad_(False)
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for prev, name in zip(names, names[1:]):
            layer, bn = seq._modules[prev], seq._modules[name]
            foldable = isinstance(layer, _FOLDABLE) and getattr(layer, "groups", 1) == 1
            if foldable and isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                _fold_into(layer, bn)
                seq._modules[name] = nn.Identity()
    return folded


@torch.no_grad()
def standing_statistics(
    generator: Generator, text: Tensor, *, batch_size: int, seed: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Tensor]:
    """``generator``'s state dict with every BatchNorm's statistics recomputed for its own weights.

    BigGAN's standing statistics: text [N, text_dim] (L2-normalised features) runs through a
    copy of ``generator`` in train mode, in batches of ``batch_size``, with z drawn from a
    ``torch.Generator`` seeded with ``seed``; the running mean and variance become the
    average over those batches. The same text and seed give the same statistics; the
    weights and ``generator`` itself are not changed. For an EMA generator, whose weights
    are an average but whose statistics were copied from the trained one.
    """
    device = next(generator.parameters()).device
    standing = copy.deepcopy(generator).train()
    for norm in standing.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches below
    rng = torch.Generator(device).manual_seed(seed)
    for chunk in text.to(device, torch.float32).split(batch_size):
        if chunk.shape[0] < 2:  # BatchNorm1d cannot take a batch of one
            continue
        z = torch.randn(chunk.shape[0], generator.cfg.z_dim, generator=rng, device=device)
        with autocast():
            standing(chunk, z, generator=rng)
    return {k: v.detach().clone() for k, v in standing.state_dict().items()}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def summary_rows(cfg: ModelConfig) -> list[dict[str, object]]:
    """One row per stage: image size, feature shape, G and D parameter counts.

    Built from a real forward pass at batch 1 in eval mode (shapes never guessed).
    """
    generator, discriminators = build_models(cfg, seed=0)
    generator.eval()
    with torch.no_grad():
        text = torch.nn.functional.normalize(torch.randn(1, cfg.text_dim), dim=1)
        images, _, _ = generator(text, torch.randn(1, cfg.z_dim), torch.zeros(1, cfg.cond_dim))
    rows = []
    for i, (img, disc) in enumerate(zip(images, discriminators)):
        g_params = count_parameters(generator.stages[i]) + count_parameters(generator.heads[i])
        if i == 0:
            g_params += count_parameters(generator.ca)
        rows.append(
            dict(
                stage=i + 1,
                resolution=img.shape[-1],
                features=[cfg.stage_channels[i], img.shape[-2], img.shape[-1]],
                image=list(img.shape[1:]),
                g_params=g_params,
                d_params=count_parameters(disc),
            )
        )
    return rows


def format_summary(rows: list[dict[str, object]]) -> str:
    """A plain-text table of ``summary_rows``."""
    header = f"{'stage':>5} {'size':>5} {'G features':>15} {'G params':>12} {'D params':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        feats = "x".join(str(v) for v in r["features"])  # type: ignore[union-attr]
        lines.append(f"{r['stage']:>5} {r['resolution']:>5} {feats:>15} {r['g_params']:>12,} {r['d_params']:>12,}")
    g_total = sum(int(r["g_params"]) for r in rows)  # type: ignore[arg-type]
    d_total = sum(int(r["d_params"]) for r in rows)  # type: ignore[arg-type]
    lines.append(f"{'total':>5} {'':>5} {'':>15} {g_total:>12,} {d_total:>12,}")
    return "\n".join(lines)
