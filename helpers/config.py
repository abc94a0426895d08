"""Model configuration: the stage schedule and one typed dataclass, saved inside every checkpoint.

Sampling rebuilds the networks from this config alone, so every size the
networks need lives here (and nowhere else): the stage schedule (how many
stages, each one's image size, the size a features file stores) and the
network widths. Presets:

- ``faces``: the reference sizes of the bootcamp project (StackGAN++ family,
  CLIP ViT-B/32 text features): Ng=1024, Nd=64, text 512, z 100, condition 128,
  three stages (64/128/256 px), with the recipe switches the toy-face measurements
  chose (GLU up-blocks, orthogonal CA init, a noise-free condition, a CLIP-aided last
  discriminator).
  Generator about 16.8M parameters (15.4M with the reference's transposed convolutions).
- ``demo``: a small model that trains on two CPU cores (the embedded demo), same switches;
- ``reference``: the bootcamp's network as it was, kept for comparison whatever
  ``faces`` adopts (every recipe switch at its reference value).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The stage schedule: stage i (0-based) draws BASE_RESOLUTION * 2**i px images. Every module that
# needs a stage's size, the number of stages or the stored image size derives it from here; adding a
# stage means raising MAX_STAGES here and giving the networks the layers for it.
BASE_RESOLUTION = 64  # stage 1's image size (StackGAN++: 64 px); fixed by the networks (4x4 and four upsamplings
#   in G, four stride-2 blocks to a 4x4 map in each D): changing it means changing those layers too
MAX_STAGES = 3  # the deepest schedule the networks build: 64, 128, 256 px
STORED_IMAGE_SIZE = BASE_RESOLUTION * 2 ** (MAX_STAGES - 1)  # features files keep each image once, at the last stage's size
STAGE_CHOICES = tuple(range(1, MAX_STAGES + 1))  # 1-based stage numbers, as the command line and the widget name them


def stage_resolution(stage: int) -> int:
    """Image size of 0-based ``stage``: 64, 128, 256 px for stages 0, 1, 2."""
    if not 0 <= stage < MAX_STAGES:
        raise ValueError(f"stage must be in [0, {MAX_STAGES}), got {stage}")
    return BASE_RESOLUTION * 2**stage


def stage_resolutions(num_stages: int = MAX_STAGES) -> list[int]:
    """Image sizes of the first ``num_stages`` stages: [64, 128, 256][:num_stages]."""
    return [stage_resolution(s) for s in range(num_stages)]


def describe_stages(num_stages: int = MAX_STAGES) -> str:
    """The stage numbers a user types, with their sizes: ``"1 (64 px), 2 (128 px), 3 (256 px)"``."""
    return ", ".join(f"{s + 1} ({stage_resolution(s)} px)" for s in range(num_stages))


def check_num_stages(num_stages: int) -> None:
    """``num_stages`` must be one of ``STAGE_CHOICES``; a ``ValueError`` says what each gives."""
    if num_stages not in STAGE_CHOICES:
        raise ValueError(f"num_stages must be one of {describe_stages()} (the last stage's size), got {num_stages}")


UPSAMPLE_MODES = ("deconv", "nearest", "nearest_glu", "bilinear", "bilinear_glu")
D_NORMS = ("batch", "none")


@dataclass
class ModelConfig:
    """Sizes of the generator and the discriminators."""

    text_dim: int = 512  # size of the (L2-normalised) CLIP text/image feature
    z_dim: int = 100  # size of the noise vector z
    cond_dim: int = 128  # size of the condition from conditioning augmentation
    ng: int = 1024  # generator channels at 4x4; 64 px features have ng // 16
    nd: int = 64  # discriminator base channels; trunk ends with 8 * nd
    num_stages: int = MAX_STAGES  # stages 1..MAX_STAGES: images at 64, 128, 256 px
    num_res_blocks: int = 2  # residual blocks in each stage after the first
    # recipe switches (the reference values first; measured by `python -m helpers quality`)
    upsample: str = "deconv"  # G's x2 upsampling: "deconv" (4x4 stride-2 transposed conv, reference),
    #   "nearest" (nearest x2 + 3x3 conv), "nearest_glu" (nearest x2 + 3x3 conv + GLU, StackGAN-v2's up-block),
    #   "bilinear" or "bilinear_glu" (the same with bilinear x2, StyleGAN's low-pass up-filter: a fainter fine grid)
    upper_upsample: str | None = None  # the up-blocks of stages 2 and 3 (same modes); None: as ``upsample``
    up_blur: bool = False  # every up-block's output is low-passed by the [1, 2, 1] binomial filter (network.Blur),
    #   which leaves no 2 px pattern for later stages to carry up (BlurPool; StyleGAN's FIR filter); False: reference
    ca_init_gain: float | None = None  # None: CA's linear layer N(0, 0.02) (reference); a gain: orthogonal init
    ca_noise: float = 1.0  # scale of CA's sampled noise: 1 (StackGAN, reference); 0: the condition is its mean, as
    #   LAFITE and DF-GAN feed the text feature itself (z alone varies the image); the same in training and sampling
    z_every_stage: bool = False  # stages 2 and 3 also receive z beside the condition (DF-GAN and GALIP feed
    #   the noise to every block); False: z enters stage 1 only (reference)
    image_skip: bool = False  # an upper stage's image is tanh(its head's conv + the stage below's pre-tanh
    #   image, bilinear x2): it draws on the lower stage's picture instead of repainting it (StyleGAN2's skip
    #   generator, MSG-GAN); False: every stage paints its own image from its features (reference)
    d_norm: str = "batch"  # discriminator normalisation: "batch" (BatchNorm, reference) or "none"
    d_spectral_norm: bool = False  # spectral normalisation of every discriminator convolution (Miyato et al.)
    d_clip_head: bool = False  # the last stage's D also judges the run's frozen CLIP image features (GALIP)
    d_minibatch_std: int = 0  # group size of the minibatch standard deviation every D appends to its 4x4 features,
    #   so it sees how alike a batch's images are (ProGAN, StyleGAN: 4); 0: off (reference)

    def __post_init__(self) -> None:
        check_num_stages(self.num_stages)
        for name, value, allowed in (("upsample", self.upsample, UPSAMPLE_MODES), ("d_norm", self.d_norm, D_NORMS),
                                     ("upper_upsample", self.upper_upsample or self.upsample, UPSAMPLE_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.ca_init_gain is not None and self.ca_init_gain <= 0:
            raise ValueError(f"ca_init_gain must be positive (or None), got {self.ca_init_gain}")
        if not 0 <= self.ca_noise <= 1:
            raise ValueError(f"ca_noise must be in [0, 1] (1: StackGAN's sampled condition, 0: its mean), "
                             f"got {self.ca_noise}")
        min_ng = 16 * 2 ** (self.num_stages - 1) * 2
        if self.ng < min_ng or self.ng % min_ng:
            raise ValueError(
                f"ng={self.ng} is too small or not divisible for {self.num_stages} stages: "
                f"use a multiple of {min_ng} (the last stage must keep at least 2 channels)"
            )
        for name in ("text_dim", "z_dim", "cond_dim", "nd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_minibatch_std < 0:
            raise ValueError(f"d_minibatch_std must be >= 0 (a group size; 0: off), got {self.d_minibatch_std}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")

    @property
    def resolutions(self) -> list[int]:
        """Image size of each stage: [64, 128, 256][:num_stages] (see ``stage_resolution``)."""
        return stage_resolutions(self.num_stages)

    @property
    def stage_channels(self) -> list[int]:
        """Feature channels each stage hands to its image head: ng/16, ng/32, ng/64."""
        return [self.ng // 16 // 2**i for i in range(self.num_stages)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from ``to_dict`` output; unknown keys are an error."""
        return dataclass_from_dict(cls, data)


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)`` for a config dataclass, with a clear error naming unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return cls(**data)


# The model's recipe switches at the bootcamp's values (the `reference` preset; the quality harness's base).
REFERENCE_MODEL_RECIPE: dict[str, Any] = dict(
    upsample="deconv", upper_upsample=None, up_blur=False, ca_init_gain=None, ca_noise=1.0, z_every_stage=False,
    image_skip=False, d_norm="batch", d_spectral_norm=False, d_clip_head=False, d_minibatch_std=0,
)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # the reference sizes with the recipe the toy-face measurements chose (README, "Measuring the recipe")
    "faces": dict(text_dim=512, z_dim=100, cond_dim=128, ng=1024, nd=64, num_stages=3, upsample="nearest_glu",
                  ca_init_gain=1.0, ca_noise=0.0, d_clip_head=True),
    "demo": dict(text_dim=256, z_dim=64, cond_dim=64, ng=256, nd=8, num_stages=3, upsample="nearest_glu",
                 upper_upsample="bilinear_glu", ca_init_gain=1.0, ca_noise=0.0, d_clip_head=True, z_every_stage=True),
    # the bootcamp's network exactly (its bugs fixed), every recipe switch at its reference value
    "reference": dict(text_dim=512, z_dim=100, cond_dim=128, ng=1024, nd=64, num_stages=3, **REFERENCE_MODEL_RECIPE),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The ``faces``, ``demo`` or ``reference`` preset, with keyword overrides (e.g. ``text_dim=...``)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})
