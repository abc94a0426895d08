"""The training config: one typed dataclass, its presets, ``--set`` overrides and resume precedence.

``TrainConfig`` holds everything a run needs besides the data (the model sizes
included) and is saved in every training checkpoint. ``train_preset`` gives the
``faces`` and ``demo`` presets; ``apply_overrides`` applies ``--set KEY=VALUE``
style changes; ``resume_config`` is the one place that decides what a resumed
run's config is (the checkpoint's, with only the ``RESUMABLE`` fields open to
change).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .augment import parse_policy
from .config import BASE_RESOLUTION, ModelConfig, dataclass_from_dict, model_preset
from .errors import UserError

Overrides = dict[str, Any] | list[str] | tuple[str, ...]  # {"lr_g": 1e-4} or ["lr_g=1e-4"]


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data; saved in every checkpoint."""

    model: ModelConfig = field(default_factory=lambda: model_preset("demo"))  # network sizes (text_dim follows the data)
    preset: str = "demo"  # the preset this config started from (for the record)
    seed: int = 0  # seeds the weights, the data order and every random draw of a step
    batch_size: int = 16  # images per step (>= 2: BatchNorm and InfoNCE need a batch)
    steps: int | None = None  # total steps of the run; None: `epochs` full passes over the data
    epochs: int = 10  # passes over the training split when `steps` is None
    lr_g: float = 2e-4  # Adam learning rate of G (reference: 2e-4)
    lr_d: float = 2e-4  # Adam learning rate of every D (reference: 2e-4)
    beta1: float = 0.5  # Adam beta1 (reference: 0.5)
    beta2: float = 0.999  # Adam beta2 (reference: 0.999)
    uncond_weight: float = 1.0  # weight of the unconditional real/fake terms (0 turns them off)
    mismatch: bool = True  # D also learns that a real image with another caption is fake (StackGAN)
    align_weight: float = 5.0  # gamma: InfoNCE between D's alignment embedding and the text (LAFITE/reference: 5)
    clip_weight: float = 10.0  # lambda: CLIP InfoNCE between generated images and the text (LAFITE/reference: 10)
    clip_stages: list[int] = field(default_factory=lambda: [-1])  # stages with the CLIP loss (-1: the last)
    kl_weight: float = 1.0  # beta: KL of conditioning augmentation (reference: 1)
    mode_seeking_weight: float = 0.0  # MSGAN term against mode collapse (0: off); costs G a quarter more images
    mode_seeking_stages: list[int] | None = None  # stages the mode-seeking term averages over (None: every stage,
    #   -1: the last); on toy faces [0] alone lost the upper stages' variety (README, "Measuring the recipe")
    mode_seeking_size: int = 0  # the term's image distance at this size, every stage averaged down to it, where
    #   layout and colours show and fine marks do not (0: each stage at its own size, MSGAN); divides 64
    temperature: float = 0.5  # tau of both InfoNCE losses (reference/LAFITE: 0.5)
    language_free: bool = False  # LAFITE: train on image features + noise instead of caption features
    pseudo_text_noise: float = 0.5  # xi: relative noise level of the pseudo text features (language-free only)
    diffaugment: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" = off
    diffaugment_stages: list[int] | None = None  # stages whose D sees the policy (None: every stage, -1: the last)
    diffaugment_translation: float = 0.125  # the policy's largest shift, a fraction of the image (DiffAugment: 1/8)
    diffaugment_probability: float = 1.0  # each image's chance of each augmentation (DiffAugment: 1; ADA: below 1)
    ema_decay: float = 0.999  # G_ema <- decay * G_ema + (1 - decay) * G (ramped up over the first steps)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); ignored on CPU
    channels_last: bool = False  # NHWC memory layout for convolutions (faster on recent GPUs, and on the CPU
    #   for the demo's narrow 128 and 256 px stages: oneDNN's NCHW kernels are slow at 4-16 channels)
    num_workers: int | None = None  # DataLoader worker processes; None: 2 on CUDA, 0 on the CPU
    log_every: int = 10  # steps between metric lines (metrics.jsonl, on_log)
    preview_every: int = 500  # steps between preview grids (and loss-curve updates)
    checkpoint_every: int = 500  # steps between writes of checkpoints/latest.pt
    snapshot_every: int = 5000  # steps between kept snapshots checkpoints/step_XXXXXXX.pt
    keep_snapshots: int = 3  # snapshots kept on disk (older ones deleted; 0 keeps all)
    mirror_dir: str | None = None  # a second folder (e.g. Google Drive) that receives a copy of every write
    preview_captions: str | None = None  # text file, one caption per line; None: assets/preview_captions.txt
    sync_batchnorm: bool = False  # torchrun runs: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)
    # recipe switches (the reference values; measured by `python -m helpers quality`)
    r1_weight: float = 0.0  # gamma of R1 (Mescheder et al. 2018; LAFITE): gamma/2 * |grad of D(real)|^2 (0: off)
    clip_augment: bool = False  # random crops and resizes of fakes before the CLIP loss (LAFITE): no frozen-CLIP shortcuts
    d_batches: str = "separate"  # D's BatchNorm sees real and fake "separate"ly (reference) or as one "joint" batch
    balance_attributes: float = 0.0  # sample images by (1 / frequency of their rarest attribute) ** this
    #   (0: uniform, the reference; 0.5: square-root balancing); needs a features file with attributes
    ma_gp_weight: float = 0.0  # k of DF-GAN's matching-aware gradient penalty k * E|grad D(real, text)|^6 (0: off)
    reg_every: int = 1  # R1 / MA-GP every this many steps, weighted by it (StyleGAN2's lazy regularisation)
    color_consistency: float = 0.0  # StackGAN-v2's colour-consistency weight (0: off; StackGAN-v2: 50): every
    #   upper stage keeps the per-image colour mean and covariance of the stage below (covariance x 5)
    layout_consistency: float = 0.0  # weight of the layout-consistency term (0: off): every upper stage keeps the
    #   picture of the stage below at half the first stage's resolution (L1 at 32 px), where layout and colours show
    spectral_weight: float = 0.0  # weight of the spectral term (0: off): the last stage's mean radial power
    #   spectrum follows the real batch's (losses.spectrum_loss; Durall et al. 2020), so G is asked for fine detail
    ema_standing_stats: int = 0  # batches of text features that recompute G_ema's BatchNorm statistics for its
    #   weights before every save (0: G's statistics, copied, as the reference)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        self.clip_stages = [int(s) for s in self.clip_stages]
        if self.mode_seeking_stages is not None:
            self.mode_seeking_stages = [int(s) for s in self.mode_seeking_stages]
        if self.diffaugment_stages is not None:
            self.diffaugment_stages = [int(s) for s in self.diffaugment_stages]
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm and InfoNCE need a batch), got {self.batch_size}")
        if self.steps is not None and self.steps < 0 or self.epochs < 0:
            raise ValueError("steps and epochs must be >= 0")
        for name in ("log_every", "preview_every", "checkpoint_every", "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.d_batches not in ("separate", "joint"):
            raise ValueError(f"d_batches must be 'separate' or 'joint', got {self.d_batches!r}")
        if min(self.r1_weight, self.ema_standing_stats, self.ma_gp_weight, self.balance_attributes,
               self.color_consistency, self.layout_consistency, self.spectral_weight) < 0:
            raise ValueError("r1_weight, ma_gp_weight, balance_attributes, color_consistency, layout_consistency, "
                             "spectral_weight and ema_standing_stats must be >= 0")
        if self.reg_every < 1:
            raise ValueError(f"reg_every must be >= 1, got {self.reg_every}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        n = self.model.num_stages
        for name, stages in (("clip_stages", self.clip_stages), ("mode_seeking_stages", self.mode_seeking_stages or []),
                             ("diffaugment_stages", self.diffaugment_stages or [])):
            bad = [s for s in stages if not -n <= s < n]
            if bad:
                raise ValueError(f"{name} {bad} out of range for {n} stages (use 0..{n - 1} or -1 for the last)")
        if self.mode_seeking_size < 0 or self.mode_seeking_size and BASE_RESOLUTION % self.mode_seeking_size:
            raise ValueError(f"mode_seeking_size must divide the first stage's {BASE_RESOLUTION} px (or be 0: each "
                             f"stage at its own size), got {self.mode_seeking_size}")
        if self.mode_seeking_stages == []:
            raise ValueError("mode_seeking_stages must name at least one stage (or be null: every stage); "
                             "mode_seeking_weight=0 turns the term off")
        if not 0 < self.diffaugment_translation <= 0.5:
            raise ValueError(f"diffaugment_translation must be in (0, 0.5] (a fraction of the image's size), "
                             f"got {self.diffaugment_translation}")
        if not 0 < self.diffaugment_probability <= 1:
            raise ValueError(f"diffaugment_probability must be in (0, 1] (each image's chance of each augmentation), "
                             f"got {self.diffaugment_probability}")
        if self.diffaugment_stages == []:
            raise ValueError("diffaugment_stages must name at least one stage (or be null: every stage); "
                             "diffaugment='' turns the augmentation off")
        parse_policy(self.diffaugment)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``to_dict`` output; unknown keys are an error."""
        return dataclass_from_dict(cls, data)


# The training recipe's switches at the bootcamp's values (the `reference` preset; the quality harness's base).
REFERENCE_RECIPE: dict[str, Any] = dict(
    temperature=0.5, r1_weight=0.0, ma_gp_weight=0.0, reg_every=1, clip_augment=False, d_batches="separate",
    balance_attributes=0.0, ema_standing_stats=0, color_consistency=0.0, layout_consistency=0.0, mode_seeking_size=0,
    spectral_weight=0.0,
)


def reference_recipe(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every recipe switch (training and model) back at the reference value; sizes kept."""
    from .config import REFERENCE_MODEL_RECIPE

    return apply_overrides(cfg, {**REFERENCE_RECIPE, **{f"model.{k}": v for k, v in REFERENCE_MODEL_RECIPE.items()}})


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # the reference run's sizes and schedule (batch 24, Adam 2e-4, 64/128/256 px, CLIP ViT-B/32) with the
    # recipe the toy-face measurements chose: lazy R1, LAFITE's crops and G_ema's standing BatchNorm statistics
    # (the model preset adds the rest)
    "faces": dict(
        batch_size=24, epochs=10, amp=True, channels_last=True,
        preview_every=500, checkpoint_every=500, snapshot_every=5000,
        r1_weight=0.05, reg_every=4, clip_augment=True, ema_standing_stats=50,
    ),
    # the bootcamp's recipe as it was (batch 24, Adam 2e-4, tau 0.5, no regularisation), kept for comparison
    "reference": dict(
        batch_size=24, epochs=10, amp=True, channels_last=True, preview_every=500, checkpoint_every=500,
        snapshot_every=5000, **REFERENCE_RECIPE,
    ),
    # a small model that trains in minutes on a CPU (the embedded demo, toy faces)
    "demo": dict(
        batch_size=16, steps=2000, diffaugment="color,translation,cutout", channels_last=True,
        log_every=10, preview_every=100, checkpoint_every=100, snapshot_every=500,
        r1_weight=0.05, reg_every=4, clip_augment=True, balance_attributes=0.75, ema_standing_stats=50,
    ),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The ``faces``, ``demo`` or ``reference`` training preset (with its model preset), with keyword overrides."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    values: dict[str, Any] = dict(model=model_preset(name), preset=name, **TRAIN_PRESETS[name])
    return TrainConfig(**{**values, **overrides})


def _parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(overrides: Overrides = ()) -> dict[str, Any]:
    """``["lr_g=1e-4", "nd=4"]`` (``--set``) -> ``{"lr_g": 0.0001, "nd": 4}``; a dict passes through."""
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = _parse_value(value.strip())
    return parsed


def apply_overrides(cfg: TrainConfig, overrides: Overrides = ()) -> TrainConfig:
    """A copy of ``cfg`` with overrides: ``{"lr_g": 1e-4, "model.nd": 4}`` or ``["lr_g=1e-4", "nd=4"]``.

    Model fields may be named ``model.NAME`` or just ``NAME``. Values from
    strings are parsed as JSON where possible (``4``, ``1e-4``, ``true``, ``null``).
    """
    overrides = parse_overrides(overrides)
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_values, model_values = cfg.to_dict(), cfg.model.to_dict()
    for key, value in overrides.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") or (key not in train_fields and name in model_fields):
            if name not in model_fields:
                raise ValueError(f"unknown model setting {name!r}; known: {sorted(model_fields)}")
            model_values[name] = value
        elif key in train_fields and key != "model":
            default = train_values[key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            train_values[key] = value
        else:
            raise ValueError(
                f"unknown setting {key!r}; training settings: {sorted(set(train_fields) - {'model'})}; "
                f"model settings: {sorted(model_fields)}"
            )
    train_values["model"] = ModelConfig.from_dict(model_values)
    return TrainConfig.from_dict(train_values)


# Fields a resumed run may change: its length, the learning rates, how often it logs and saves, where it
# mirrors, how it loads data and its precision. Everything else (the model, the losses, the batch, the data
# order, the seed) is what the checkpoint was trained with, and changing it would not be a resume.
RESUMABLE = (
    "steps", "epochs", "lr_g", "lr_d", "log_every", "preview_every", "checkpoint_every", "snapshot_every",
    "keep_snapshots", "mirror_dir", "num_workers", "preview_captions", "amp", "channels_last",
)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_config(saved: TrainConfig, overrides: Overrides = (), *, named: TrainConfig | None = None) -> TrainConfig:
    """The config of a resumed run: the checkpoint's (``saved``), with what the user asked for.

    ``overrides`` (``--set``, ``--steps``, ``--mirror``, ...) are applied on top: a
    field that then differs from the checkpoint is taken if it is in ``RESUMABLE``,
    and refused otherwise, with a ``UserError`` listing each such field (checkpoint
    value, asked value). ``named`` (a preset the command named again) is only
    compared: its fields outside ``RESUMABLE`` must equal the checkpoint's, and
    its others never replace the checkpoint's values unasked.
    ``model.text_dim`` follows the data and is never compared.
    """
    if isinstance(overrides, TrainConfig):  # the earlier order was (saved, requested, overrides)
        raise TypeError("resume_config(saved, overrides, *, named=...): pass a preset named again as named=")
    before = _flat(saved.to_dict())
    refused: list[str] = []
    compared: dict[str, Any] = {}
    if named is not None:  # a preset named again: what may not change must equal the checkpoint's
        named = dataclasses.replace(named, model=dataclasses.replace(named.model, text_dim=saved.model.text_dim))
        compared = _flat(apply_overrides(named, overrides).to_dict())
        refused = [k for k in compared if compared[k] != before.get(k) and k not in RESUMABLE]
    # the checkpoint's values stay unless an option (--steps, --set, --mirror, ...) asks otherwise
    asked = apply_overrides(saved, overrides)
    after = _flat(asked.to_dict())
    refused += [k for k in after if after[k] != before.get(k) and k not in RESUMABLE and k not in refused]
    if refused:
        shown = {**compared, **{k: v for k, v in after.items() if v != before.get(k)}}
        listing = "; ".join(f"{k}: checkpoint {before.get(k)!r}, asked {shown[k]!r}" for k in refused)
        raise UserError(
            f"--resume continues the checkpoint's run, and these settings differ from it: {listing}. "
            f"A resume may change only {', '.join(RESUMABLE)}; start a new run (another --out) to change the rest"
        )
    return asked


def run_config(config: TrainConfig | None, overrides: Overrides = (), *, saved: TrainConfig | None = None) -> TrainConfig:
    """The config a ``train()`` call runs with, the one rule for every caller.

    A new run (``saved`` is None): ``config`` (default: the ``demo`` preset) with
    ``overrides``. A resumed run: the checkpoint's config ``saved``, where
    ``overrides`` may change only the ``RESUMABLE`` fields and ``config`` (a preset
    named again) is compared, never adopted (``resume_config``).
    """
    if saved is not None:
        return resume_config(saved, overrides, named=config)
    return apply_overrides(config if config is not None else train_preset("demo"), overrides)
