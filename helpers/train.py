"""Training: the typed config, one training step, and the loop around it.

StackGAN++ training (Zhang et al. 2018) with LAFITE's contrastive losses (Zhou
et al. 2022) and the EMA generator of StyleGAN (Karras et al.). One step:

1. G generates every stage once from (text feature, z);
2. D step: each stage's discriminator sees the real batch and the *detached*
   fakes (detached: D's loss must not reach G), its trunk run once per image
   batch with every head on the same features; all D optimisers step;
3. G step: the same fakes, not detached, through the updated discriminators
   (their weights frozen for this backward), plus the CLIP loss at the
   configured stages, the KL term and (when on) MSGAN's mode-seeking term;
   G steps and the EMA copy follows.

``train()`` adds the data order, checkpoints (exact resume), previews from the
EMA generator, metrics and the loss-curve plot. ``python -m helpers train`` is
the command line over it. Everything random in a step draws from one
``torch.Generator`` saved in the checkpoint, and every data item is seeded by
its position in the run, so a resumed run continues the same stream.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed, losses
from .augment import diff_augment, parse_policy
from .checkpoint import (
    CHECKPOINT_FORMAT,
    LATEST,
    atomic_save,
    atomic_write_bytes,
    copy_atomic,
    load_checkpoint,
    prune_snapshots,
    remove_stale_temps,
    snapshot_name,
)
from .config import ModelConfig, dataclass_from_dict, model_preset
from .console import SafeStream, say
from .devices import amp_dtype, precision_line, resolve_device
from .errors import UserError
from .network import Generator, build_models
from .runlock import RunLock

PREVIEW_CAPTIONS = Path(__file__).resolve().parents[1] / "assets" / "preview_captions.txt"


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; training stopped without saving the bad state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``str()`` says what was saved and how to continue.

    ``checkpoint``: the run's latest.pt (None when the run saved none yet);
    ``step``: the step that checkpoint holds.
    """

    def __init__(self, message: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


# --------------------------------------------------------------------------- config


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
    temperature: float = 0.5  # tau of both InfoNCE losses (reference/LAFITE: 0.5)
    language_free: bool = False  # LAFITE: train on image features + noise instead of caption features
    pseudo_text_noise: float = 0.5  # xi: relative noise level of the pseudo text features (language-free only)
    diffaugment: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" = off
    ema_decay: float = 0.999  # G_ema <- decay * G_ema + (1 - decay) * G (ramped up over the first steps)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); ignored on CPU
    channels_last: bool = False  # NHWC memory layout for convolutions (faster on recent GPUs)
    num_workers: int | None = None  # DataLoader worker processes; None: 2 on CUDA, 0 on the CPU
    log_every: int = 10  # steps between metric lines (metrics.jsonl, on_log)
    preview_every: int = 500  # steps between preview grids (and loss-curve updates)
    checkpoint_every: int = 500  # steps between writes of checkpoints/latest.pt
    snapshot_every: int = 5000  # steps between kept snapshots checkpoints/step_XXXXXXX.pt
    keep_snapshots: int = 3  # snapshots kept on disk (older ones deleted; 0 keeps all)
    mirror_dir: str | None = None  # a second folder (e.g. Google Drive) that receives a copy of every write
    preview_captions: str | None = None  # text file, one caption per line; None: assets/preview_captions.txt
    sync_batchnorm: bool = False  # torchrun runs: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        self.clip_stages = [int(s) for s in self.clip_stages]
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm and InfoNCE need a batch), got {self.batch_size}")
        if self.steps is not None and self.steps < 0 or self.epochs < 0:
            raise ValueError("steps and epochs must be >= 0")
        for name in ("log_every", "preview_every", "checkpoint_every", "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        n = self.model.num_stages
        bad = [s for s in self.clip_stages if not -n <= s < n]
        if bad:
            raise ValueError(f"clip_stages {bad} out of range for {n} stages (use 0..{n - 1} or -1 for the last)")
        parse_policy(self.diffaugment)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``to_dict`` output; unknown keys are an error."""
        return dataclass_from_dict(cls, data)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # the reference run: batch 24, Adam 2e-4, three stages at 64/128/256 px, CLIP ViT-B/32
    "faces": dict(
        batch_size=24, epochs=10, amp=True, channels_last=True,
        preview_every=500, checkpoint_every=500, snapshot_every=5000,
    ),
    # a small model that trains in minutes on a CPU (the embedded demo, toy faces)
    "demo": dict(
        batch_size=16, steps=2000, diffaugment="color,translation,cutout",
        log_every=10, preview_every=100, checkpoint_every=100, snapshot_every=500,
    ),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The ``faces`` or ``demo`` training preset (with its model preset), with keyword overrides."""
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


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any] | list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A copy of ``cfg`` with overrides: ``{"lr_g": 1e-4, "model.nd": 4}`` or ``["lr_g=1e-4", "nd=4"]``.

    Model fields may be named ``model.NAME`` or just ``NAME``. Values from
    strings are parsed as JSON where possible (``4``, ``1e-4``, ``true``, ``null``).
    """
    if not isinstance(overrides, dict):
        parsed = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set expects key=value, got {item!r}")
            parsed[key.strip()] = _parse_value(value.strip())
        overrides = parsed
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


def resume_config(
    saved: TrainConfig,
    requested: TrainConfig | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """The config of a resumed run: the checkpoint's (``saved``), with what the user asked for.

    ``overrides`` (``--set``, ``--steps``, ``--mirror``, ...) are applied on top: a
    field that then differs from the checkpoint is taken if it is in ``RESUMABLE``,
    and refused otherwise, with a ``UserError`` listing each such field (checkpoint
    value, asked value). ``requested`` (a preset the command named again) is only
    compared: its fields outside ``RESUMABLE`` must equal the checkpoint's, and
    its others never replace the checkpoint's values unasked.
    ``model.text_dim`` follows the data and is never compared.
    """
    before = _flat(saved.to_dict())
    refused: list[str] = []
    named: dict[str, Any] = {}
    if requested is not None:  # a preset named again: what may not change must equal the checkpoint's
        named = _flat(apply_overrides(dataclasses.replace(
            requested, model=dataclasses.replace(requested.model, text_dim=saved.model.text_dim)), overrides).to_dict())
        refused = [k for k in named if named[k] != before.get(k) and k not in RESUMABLE]
    # the checkpoint's values stay unless an option (--steps, --set, --mirror, ...) asks otherwise
    asked = apply_overrides(saved, overrides)
    after = _flat(asked.to_dict())
    refused += [k for k in after if after[k] != before.get(k) and k not in RESUMABLE and k not in refused]
    after = {**named, **{k: v for k, v in after.items() if v != before.get(k)}} if refused else after
    if refused:
        listing = "; ".join(f"{k}: checkpoint {before.get(k)!r}, asked {after[k]!r}" for k in refused)
        raise UserError(
            f"--resume continues the checkpoint's run, and these settings differ from it: {listing}. "
            f"A resume may change only {', '.join(RESUMABLE)}; start a new run (another --out) to change the rest"
        )
    return asked


# --------------------------------------------------------------------------- small pure pieces


def pseudo_text_features(image_features: Tensor, noise_level: float, *, generator: torch.Generator | None = None) -> Tensor:
    """LAFITE's fixed perturbation: normalize(f + xi * eps * ||f|| / ||eps||).

    image_features [B, D] -> pseudo text features [B, D], L2-normalised; lets a
    folder of uncaptioned images train a text-conditioned model.
    """
    f = image_features.float()
    eps = torch.randn(f.shape, generator=generator, device=f.device)
    eps = eps * f.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.nn.functional.normalize(f + noise_level * eps, dim=1)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay used after ``step`` steps: ramps up as (1 + step) / (10 + step) to ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step))


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA global RNG states."""
    state: dict[str, Any] = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (CUDA states only where CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------- data order


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is drawn with torch's RNG seeded by ``seed``.

    The dataset picks captions and mismatched captions at random; seeding each
    item by its position in the run makes the data stream independent of worker
    processes and identical after a resume.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class RunBatches(Sampler):
    """Batches of ``(index, item_seed)`` for steps ``start_step`` .. ``total_steps - 1`` of a run.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; the last partial
    batch of an epoch is dropped (G's BatchNorm1d cannot take a batch of one,
    and every step then has the same batch size). ``rank`` / ``world_size``
    split each global batch between processes for distributed training.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, start_step: int, total_steps: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < batch_size:
            raise UserError(
                f"the training split has {n} images, fewer than the batch size {batch_size}: "
                "lower the batch size (--batch-size) or use more images"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size

    def epoch_order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(permutation [n], item seeds [n]) of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g), torch.randint(0, 2**62, (self.n,), generator=g)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order: tuple[int, tuple[Tensor, Tensor]] | None = None
        for step in range(self.start_step, self.total_steps):
            epoch, b = divmod(step, self.steps_per_epoch)
            if order is None or order[0] != epoch:
                order = (epoch, self.epoch_order(epoch))
            perm, seeds = order[1]
            rows = range(b * self.batch_size, (b + 1) * self.batch_size)[self.rank :: self.world_size]
            yield [(int(perm[r]), int(seeds[r])) for r in rows]


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """G, G_ema, the discriminators, their optimisers and the step-level RNG, on one device.

    ``train_step(batch)`` runs one full step and returns a dict of floats;
    ``d_step`` and ``g_step`` are its two halves. ``state_dict()`` /
    ``load_state_dict()`` give and take the checkpoint dict (without run-level
    keys such as ``clip_spec``).
    """

    def __init__(self, cfg: TrainConfig, *, clip: nn.Module, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.clip = clip
        G, D = build_models(cfg.model, seed=cfg.seed)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.G: Generator = G.to(self.device, memory_format=self.memory_format).train()
        self.D = D.to(self.device, memory_format=self.memory_format).train()
        self.G_ema: Generator = copy.deepcopy(self.G).eval().requires_grad_(False)
        fused = self.device.type == "cuda"
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas, fused=fused)
        self.opt_D = [torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas, fused=fused) for d in self.D]
        self.use_amp = cfg.amp and self.device.type == "cuda"
        # bf16 only where the GPU has it natively (not a T4, where is_bf16_supported() counts emulation)
        self.amp_dtype = amp_dtype(self.device) if self.use_amp else torch.float32
        # fp16 needs loss scaling to keep small gradients; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.clip_stages = sorted({s % cfg.model.num_stages for s in cfg.clip_stages}) if cfg.clip_weight > 0 else []
        self.step = 0
        self.sync: distributed.Distributed | None = None  # set by Distributed.prepare under torchrun; None: one process

    # ----------------------------------------------------------------- helpers

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def _augment(self, images: Tensor) -> Tensor:
        return diff_augment(images, self.cfg.diffaugment, generator=self.generator) if self.cfg.diffaugment else images

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sync is not None:  # distributed: the mean gradient over the ranks, as DDP computes it
            self.sync.average_gradients(optimizer)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def _check_finite(self, values: dict[str, float], phase: str) -> None:
        if self.sync is not None:  # distributed: log the mean over the ranks; a NaN on any rank stops all of them
            values.update(self.sync.average_values(values))
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1} ({phase}): {names}. Nothing of this step was "
                "saved; the last good checkpoint is untouched. Resume from it with a lower learning rate "
                "(--set lr_g=... lr_d=...), or without mixed precision (--set amp=false)."
            )

    def _info_nce(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        if self.sync is not None:  # distributed: every rank's rows are negatives, as in one process
            image_emb, text_emb = self.sync.gather_rows(image_emb), self.sync.gather_rows(text_emb)
        return losses.info_nce(image_emb, text_emb, temperature=self.cfg.temperature)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a collated dataset batch to the device; language-free runs swap in pseudo text features.

        Returns real (list of [B, 3, 64*2**i, same] in [-1, 1]), text [B, D], mismatched [B, D].
        """
        real = [x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for x in batch["images"]]
        text = batch["text_feature"].to(self.device, torch.float32, non_blocking=True)
        mismatched = batch["mismatched_text_feature"].to(self.device, torch.float32, non_blocking=True)
        if self.cfg.language_free:
            image = batch["image_feature"].to(self.device, torch.float32)
            text = pseudo_text_features(image, self.cfg.pseudo_text_noise, generator=self.generator)
            mismatched = pseudo_text_features(image.roll(1, dims=0), self.cfg.pseudo_text_noise, generator=self.generator)
        return dict(real=real, text=text, mismatched=mismatched)

    def generate(self, text: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """One G forward (train mode, with grad): text [B, D] -> (fakes per stage, mu, logvar)."""
        fakes, mu, logvar, _ = self._generate(text)
        return fakes, mu, logvar

    def twins(self, batch_size: int) -> int:
        """Rows G generates a second time per step for the mode-seeking term: a quarter of the batch (0 when off)."""
        return max(1, batch_size // 4) if self.cfg.mode_seeking_weight > 0 else 0

    def _generate(self, text: Tensor, twins: int = 0) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """G forward of text [B, D] plus ``twins`` extra rows repeating text[:twins] with other noise.

        -> (fakes per stage [B + twins, ...], mu, logvar [B + twins, cond_dim], z [B + twins, z_dim]).
        """
        if twins:
            text = torch.cat([text, text[:twins]])
        z = torch.randn(text.shape[0], self.cfg.model.z_dim, generator=self.generator, device=self.device)
        with self.autocast():
            fakes, mu, logvar = self.G(text, z, generator=self.generator)
        return fakes, mu, logvar, z

    # ----------------------------------------------------------------- the two halves of a step

    def d_step(self, real: list[Tensor], fakes: list[Tensor], mu: Tensor, text: Tensor, mismatched: Tensor) -> dict[str, float]:
        """Update every discriminator once; returns its loss terms as floats.

        real / fakes: per stage [B, 3, 64*2**i, same] in [-1, 1]; mu [B, cond_dim]
        (the condition D is given); text, mismatched: [B, D] text features.
        """
        cfg = self.cfg
        condition = mu.detach().float()
        with torch.no_grad():
            _, mismatched_mu, _ = self.G.ca(mismatched, torch.zeros_like(condition))
        terms: dict[str, Tensor] = {}
        for i, (disc, opt) in enumerate(zip(self.D, self.opt_D)):
            disc.requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                real_f = disc.features(self._augment(real[i]))
                # detached: the D loss must not backpropagate into G (and G's graph stays for the G step)
                fake_f = disc.features(self._augment(fakes[i].detach()))
                mis = disc.cond_logits(real_f, mismatched_mu) if cfg.mismatch else None
                cond = losses.d_adversarial_loss(disc.cond_logits(real_f, condition), disc.cond_logits(fake_f, condition), mis)
                loss = cond
                if cfg.uncond_weight > 0:
                    uncond = losses.d_adversarial_loss(disc.uncond_logits(real_f), disc.uncond_logits(fake_f))
                    loss = loss + cfg.uncond_weight * uncond
                    terms[f"d{i}_uncond"] = uncond.detach()
                if cfg.align_weight > 0:
                    align = self._info_nce(disc.align_embedding(real_f), text)
                    loss = loss + cfg.align_weight * align
                    terms[f"d{i}_align"] = align.detach()
            terms[f"d{i}_cond"] = cond.detach()
            terms[f"d{i}"] = loss.detach()
            self._backward(loss)
        values = dict(zip(terms, torch.stack(list(terms.values())).float().tolist()))  # one device sync
        self._check_finite(values, "discriminator step")
        for opt in self.opt_D:
            self._step(opt)
        values["d_loss"] = sum(values[f"d{i}"] for i in range(len(self.D)))
        return values

    def g_step(
        self, fakes: list[Tensor], mu: Tensor, logvar: Tensor, text: Tensor,
        twins: tuple[list[Tensor], Tensor, Tensor] | None = None,
    ) -> dict[str, float]:
        """Update G once from the (non-detached) fakes of this step; returns its loss terms as floats.

        ``twins`` (mode seeking): (images per stage [K, ...] generated from text[:K] with
        other noise, the noise of fakes[:K] [K, z_dim], the twins' noise [K, z_dim]).
        """
        cfg = self.cfg
        condition = mu.detach().float()  # D's condition is a label: G must not move it to fool D
        self.D.requires_grad_(False)  # no weight gradients for D in G's backward
        self.opt_G.zero_grad(set_to_none=True)
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        with self.autocast():
            for i, disc in enumerate(self.D):
                feats = disc.features(self._augment(fakes[i]))
                loss = losses.g_adversarial_loss(disc.cond_logits(feats, condition))
                if cfg.uncond_weight > 0:
                    loss = loss + cfg.uncond_weight * losses.g_adversarial_loss(disc.uncond_logits(feats))
                terms[f"g{i}_adv"] = loss.detach()
                if cfg.align_weight > 0:
                    align = self._info_nce(disc.align_embedding(feats), text)
                    loss = loss + cfg.align_weight * align
                    terms[f"g{i}_align"] = align.detach()
                if i in self.clip_stages:
                    clip_loss = self._info_nce(self.clip.embed_generated(fakes[i]), text)
                    loss = loss + cfg.clip_weight * clip_loss
                    terms[f"g{i}_clip"] = clip_loss.detach()
                terms[f"g{i}"] = loss.detach()
                total = total + loss
            kl = losses.kl_loss(mu, logvar)
            total = total + cfg.kl_weight * kl
            if twins is not None:
                twin_images, z_own, z_twin = twins
                k = z_own.shape[0]
                seeking = losses.mode_seeking_loss([f[:k] for f in fakes], twin_images, z_own, z_twin)
                total = total + cfg.mode_seeking_weight * seeking
                terms["mode_seeking"] = seeking.detach()
        terms["kl"] = kl.detach()
        terms["g_loss"] = total.detach()
        self._backward(total)
        self.D.requires_grad_(True)
        values = dict(zip(terms, torch.stack(list(terms.values())).float().tolist()))
        self._check_finite(values, "generator step")
        self._step(self.opt_G)
        return values

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One full step on a collated dataset batch; returns every loss term as a float."""
        if self.sync is not None:  # distributed: this rank's noise, seeded by (run seed, rank, step)
            self.sync.begin_step(self)
        b = self.prepare_batch(batch)
        # G runs once per step; its fakes serve both halves (with mode seeking, the same forward
        # also draws the twins: the first k texts again with other noise, for G's loss only)
        B, k = b["text"].shape[0], self.twins(b["text"].shape[0])
        twins = None
        if k:
            fakes, mu, logvar, z = self._generate(b["text"], twins=k)
            twins = ([f[B:] for f in fakes], z[:k], z[B:])
            fakes, mu, logvar = [f[:B] for f in fakes], mu[:B], logvar[:B]
        else:
            fakes, mu, logvar = self.generate(b["text"])
        values = self.d_step(b["real"], fakes, mu, b["text"], b["mismatched"])
        values.update(self.g_step(fakes, mu, logvar, b["text"], twins))
        if self.scaler is not None:
            self.scaler.update()
        ema_update(self.G_ema, self.G, ema_decay_at(self.step, self.cfg.ema_decay))
        self.step += 1
        return values

    # ----------------------------------------------------------------- previews and state

    @torch.no_grad()
    def preview(self, text: Tensor, z: Tensor) -> list[Tensor]:
        """G_ema in eval mode, condition = mu (no CA noise): text [N, D], z [N, z_dim] -> images per stage in [-1, 1]."""
        text, z = text.to(self.device, torch.float32), z.to(self.device, torch.float32)
        ca_noise = torch.zeros(text.shape[0], self.cfg.model.cond_dim, device=self.device)
        images, _, _ = self.G_ema.eval()(text, z, ca_noise)
        return [img.float().cpu() for img in images]

    def state_dict(self) -> dict[str, Any]:
        """Models, optimisers, scaler and RNG states (the checkpoint keys this object owns)."""
        return dict(
            step=self.step,
            G=self.G.state_dict(),
            G_ema=self.G_ema.state_dict(),
            D=[d.state_dict() for d in self.D],
            opt_G=self.opt_G.state_dict(),
            opt_D=[o.state_dict() for o in self.opt_D],
            scaler=None if self.scaler is None else self.scaler.state_dict(),
            rng=dict(rng_state(), step_generator=self.generator.get_state(), step_generator_device=self.device.type),
        )

    @property
    def precision(self) -> str:
        """One line: which precision this trainer computes in (fp32, mixed bf16, or mixed fp16 + GradScaler)."""
        return precision_line(self.device, self.amp_dtype if self.use_amp else None)

    def load_state_dict(self, ckpt: dict[str, Any]) -> list[str]:
        """Restore ``state_dict()`` output; every trained model goes back to train mode.

        The learning rates and Adam betas are this trainer's config (a resume may change
        them); the optimiser moments come from the checkpoint. Returns notes for the user
        (e.g. that the step RNG was reseeded because the checkpoint came from another device type).
        """
        notes: list[str] = []
        if len(ckpt["D"]) != len(self.D):
            raise UserError(f"the checkpoint has {len(ckpt['D'])} discriminators, the model {len(self.D)}")
        self.G.load_state_dict(ckpt["G"])
        self.G_ema.load_state_dict(ckpt["G_ema"])
        for disc, state in zip(self.D, ckpt["D"]):
            disc.load_state_dict(state)
        self.opt_G.load_state_dict(ckpt["opt_G"])
        for opt, state in zip(self.opt_D, ckpt["opt_D"]):
            opt.load_state_dict(state)
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        for opt, lr in [(self.opt_G, self.cfg.lr_g)] + [(o, self.cfg.lr_d) for o in self.opt_D]:
            for group in opt.param_groups:  # the config's rates reach Adam (a resume may change them)
                group["lr"], group["betas"] = lr, (self.cfg.beta1, self.cfg.beta2)
        rng = ckpt.get("rng") or {}
        if "torch" in rng:
            set_rng_state(rng)
        self.step = int(ckpt["step"])
        if "step_generator" in rng:
            saved_on = rng.get("step_generator_device")
            try:
                if saved_on not in (None, self.device.type):
                    raise RuntimeError(saved_on)
                self.generator.set_state(rng["step_generator"].cpu())
            except RuntimeError:  # a CPU generator's state does not fit a CUDA one, and back
                self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.step)
                notes.append(
                    f"the checkpoint was written on {saved_on or 'another device type'} and this run is on "
                    f"{self.device.type}: the step's random draws (noise, augmentation) were reseeded from the "
                    f"seed and step {self.step}, so they differ from an uninterrupted run from here on"
                )
        # the reference left resumed models in eval mode (frozen BatchNorm); not here
        self.G.train()
        self.D.train().requires_grad_(True)
        self.G_ema.eval()
        return notes


# --------------------------------------------------------------------------- run directory helpers


def preview_grid(images: list[Tensor]) -> Tensor:
    """Images per stage (each [N, 3, h, h] in [-1, 1]) -> one grid [3, H, W] in [0, 1].

    One row per stage, one column per caption; smaller stages are upscaled
    (nearest) to the largest size so the rows line up.
    """
    size = images[-1].shape[-1]
    rows = [torch.nn.functional.interpolate(img.float(), size=(size, size), mode="nearest") for img in images]
    n, pad = rows[0].shape[0], 2
    grid = torch.ones(3, len(rows) * (size + pad) + pad, n * (size + pad) + pad)
    for r, row in enumerate(rows):
        for c in range(n):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[:, y : y + size, x : x + size] = (row[c].clamp(-1, 1) + 1) / 2
    return grid


def save_png(image: Tensor, path: Path) -> Path:
    """Write [3, H, W] in [0, 1] as an 8-bit PNG, atomically."""
    import io

    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_loss_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Plot metrics.jsonl rows (totals, adversarial terms, contrastive terms) into a PNG (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(fig)
    steps = [row["step"] for row in history]
    keys = sorted({k for row in history for k in row})
    panels = [
        ("weighted totals", [k for k in ("d_loss", "g_loss") if k in keys]),
        ("adversarial BCE and KL", [k for k in keys if k.endswith(("_cond", "_uncond", "_adv")) or k == "kl"]),
        ("contrastive InfoNCE", [k for k in keys if k.endswith(("_align", "_clip"))]),
    ]
    for ax_index, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), ax_index + 1)
        for key in keys:
            ax.plot(steps, [row.get(key, float("nan")) for row in history], label=key, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a missing file gives [])."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_preview_captions(path: str | os.PathLike | None = None) -> list[str]:
    """The fixed preview captions: one per non-empty line of ``path`` (default: assets/preview_captions.txt)."""
    path = Path(path) if path else PREVIEW_CAPTIONS
    if not path.is_file():
        raise UserError(f"preview captions file not found: {path} (one caption per line)")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise UserError(f"{path} has no captions: write one caption per line")
    return captions


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C only sets a flag (the loop saves at the end of the step);
    a second one raises KeyboardInterrupt at once. Only in the main thread; elsewhere a no-op."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["hit"]
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainResult:
    """What ``train()`` returns."""

    run_dir: Path  # the run directory
    step: int  # steps done in total (resumed runs included)
    epoch: int  # the epoch the last step belonged to
    checkpoint: Path | None  # checkpoints/latest.pt
    metrics: dict[str, Any]  # the last metrics row
    history: list[dict[str, Any]]  # every metrics row of the run (metrics.jsonl)
    previews: list[Path]  # preview grids written by this call
    note: str = ""  # what the run has to say instead of training (e.g. nothing to do)


# --------------------------------------------------------------------------- the loop


def find_resume_checkpoint(run_dir: Path, resume: bool | str | os.PathLike, mirror_dir: str | None) -> Path:
    """The checkpoint to resume from: an explicit path, or RUN_DIR/checkpoints/latest.pt, or the mirror's."""
    if not isinstance(resume, bool):
        return Path(resume)
    candidates = [run_dir / "checkpoints" / LATEST]
    if mirror_dir:
        candidates.append(Path(mirror_dir) / "checkpoints" / LATEST)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"nothing to resume: no {candidates[0]}" + (f" or {candidates[1]}" if mirror_dir else "") +
                    "; start a new run without --resume")


def train(
    features: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] = (),
    resume: bool | str | os.PathLike = False,
    device: str | torch.device | None = None,
    clip: nn.Module | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_sample: Callable[[int, Tensor, Path], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on the ``train`` split of a features file, writing the run into ``out``.

    features: a features file (``python -m helpers extract``); its CLIP spec and
        feature size set the run's CLIP model and ``model.text_dim``.
    out: the run directory: checkpoints/latest.pt (+ step_XXXXXXX.pt snapshots),
        metrics.jsonl, loss_curves.png, previews/step_XXXXXXX.png.
    config: the training config (default: the ``demo`` preset, or on resume the
        checkpoint's); ``overrides`` apply on top (see ``apply_overrides``).
    resume: True continues from out/checkpoints/latest.pt (or the mirror's copy),
        a path from that checkpoint; the model config always comes from it.
    clip: an already loaded ClipEncoder of the features' spec (default: loaded here).
    on_log(row): called with every metrics row; on_sample(step, grid [3, H, W] in
        [0, 1], path): called with every preview grid.

    On resume, ``config`` (a preset named again) and ``overrides`` may change only
    the ``RESUMABLE`` fields (``resume_config``); a run already at its last step
    returns at once with ``note`` saying so. One process trains in a folder at a
    time (``RunLock``). A NaN/inf loss raises TrainingDiverged without saving;
    Ctrl-C saves latest.pt at the end of the step and raises TrainingInterrupted
    (a KeyboardInterrupt); a second Ctrl-C stops mid-step and keeps the last good
    checkpoint instead. Started by torchrun with
    WORLD_SIZE > 1, every process calls this and they train data-parallel
    (``helpers.distributed``); only rank 0 writes files and calls the callbacks.
    """
    from .clip_encoder import check_same_clip, load_clip
    from .features import FeaturesDataset

    run_dir = Path(out)
    device = resolve_device(device)
    if device.type == "cpu":
        # Tiny (denormal) floats appear as G and D settle and make CPU arithmetic many
        # times slower: measured 1 s -> 15 s per demo step over 25 steps without this.
        torch.set_flush_denormal(True)
    dist = distributed.from_environment(device)  # None unless torchrun started this with WORLD_SIZE > 1
    if dist is not None:
        device = dist.device
    is_main = dist is None or dist.is_main  # only rank 0 writes files and shows progress
    ckpt: dict[str, Any] | None = None
    latest = run_dir / "checkpoints" / LATEST
    if resume:
        mirror = (config.mirror_dir if config else None) or dict(_override_dict(overrides)).get("mirror_dir")
        # on the CPU: RNG states must stay CPU byte tensors; load_state_dict moves weights to the device
        ckpt = load_checkpoint(find_resume_checkpoint(run_dir, resume, mirror), map_location="cpu")
    elif latest.is_file():
        raise UserError(f"{run_dir} already holds a run ({latest}); resume it with --resume or choose another --out")

    # Everything is checked before the run folder is made: a bad input leaves no half-made run behind.
    if ckpt is not None:  # the checkpoint's config, with what may change on resume (resume_config)
        cfg = resume_config(TrainConfig.from_dict(ckpt["train_config"]), config, overrides)
    else:
        cfg = apply_overrides(config if config is not None else train_preset("demo"), overrides)
    probe = FeaturesDataset(features, split="train", num_stages=cfg.model.num_stages)
    if ckpt is not None:
        if ckpt.get("clip_spec") != probe.clip_spec:
            raise UserError(
                f"the checkpoint was trained with CLIP {ckpt.get('clip_spec')!r}, the features file uses "
                f"{probe.clip_spec!r}: extract the features with the same CLIP"
            )
    elif cfg.model.text_dim != probe.dim:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_dim=probe.dim))
    if cfg.model.text_dim != probe.dim:
        raise UserError(f"the model takes {cfg.model.text_dim}-d text features, the features file has {probe.dim}-d")
    dataset = probe
    if not probe.clip_spec:
        raise UserError(f"{features} does not name its CLIP model (meta['clip_spec']); extract it again")
    if clip is None:
        clip = load_clip(probe.clip_spec, device=device)
    if getattr(clip, "dim", probe.dim) != probe.dim:
        raise UserError(f"the CLIP model gives {clip.dim}-d features, the features file has {probe.dim}-d")
    if hasattr(clip, "identity"):
        check_same_clip(probe.meta.get("clip_identity"), clip, what=f"the features file {features}")
        if ckpt is not None:
            check_same_clip(ckpt.get("clip_identity"), clip, what=f"the checkpoint of {run_dir}")

    trainer = Trainer(cfg, clip=clip, device=device)
    notes: list[str] = []
    if ckpt is not None:
        notes = trainer.load_state_dict(ckpt)
        del ckpt
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
    steps_per_epoch = len(dataset) // cfg.batch_size
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * max(steps_per_epoch, 1)
    history_so_far = read_metrics(run_dir / "metrics.jsonl")
    if resume and trainer.step >= total_steps:
        return TrainResult(
            run_dir=run_dir, step=trainer.step, epoch=max(trainer.step - 1, 0) // max(steps_per_epoch, 1),
            checkpoint=latest if latest.is_file() else None,
            metrics=history_so_far[-1] if history_so_far else {}, history=history_so_far, previews=[],
            note=f"nothing to do: the run is already at step {trainer.step} of {total_steps}; "
                 f"ask for more, e.g. --steps {max(2 * trainer.step, 1)}",
        )
    with contextlib.ExitStack() as stack:
        if is_main:
            stack.enter_context(RunLock(run_dir))  # one run per folder (a dead process's lock is gone with it)
            folders = [run_dir, run_dir / "checkpoints", run_dir / "previews"]
            remove_stale_temps(*folders)  # (not the mirror's: no lock covers it)  # temp files of a write that a kill cut short
        return _run_loop(trainer, cfg, dataset, run_dir, dist=dist, is_main=is_main, clip=clip, probe=probe,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch, notes=notes, on_log=on_log,
                         on_sample=on_sample, progress=progress)


def _run_loop(
    trainer: Trainer, cfg: TrainConfig, dataset: Any, run_dir: Path, *, dist: Any, is_main: bool, clip: Any,
    probe: Any, total_steps: int, steps_per_epoch: int, notes: list[str],
    on_log: Callable[[dict[str, Any]], None] | None, on_sample: Callable[[int, Tensor, Path], None] | None,
    progress: bool,
) -> TrainResult:
    """The loop of ``train()`` once everything is checked and the run folder is locked."""
    from tqdm.auto import tqdm

    if dist is not None:
        dist.prepare(trainer)  # rank 0's weights everywhere, gradient averaging, per-rank noise
    latest = run_dir / "checkpoints" / LATEST
    shard = dict(rank=dist.rank, world_size=dist.world_size) if dist is not None else {}
    sampler = RunBatches(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=trainer.step, total_steps=total_steps,
                         **shard)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (2 if trainer.device.type == "cuda" else 0)
    loader = DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
        pin_memory=trainer.device.type == "cuda", persistent_workers=False,
    )

    metrics_path = run_dir / "metrics.jsonl"
    history = [row for row in read_metrics(metrics_path) if row["step"] <= trainer.step]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in history).encode())  # drop rows past the checkpoint
        for line in [trainer.precision, *notes]:
            say(line if line.startswith("precision") else f"note: {line}", err=True)
    captions = load_preview_captions(cfg.preview_captions)
    preview_text = clip.encode_text(captions)
    preview_z = torch.randn(len(captions), cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    mirror = Path(cfg.mirror_dir) if cfg.mirror_dir else None
    previews: list[Path] = []
    # nothing to save before the first step of this call: an error then leaves no step-0 checkpoint behind
    state = dict(saved_step=trainer.step, in_step=False)

    def mirror_copy(path: Path) -> None:
        if mirror is not None:
            copy_atomic(path, mirror / path.relative_to(run_dir))

    def save(*, snapshot: bool) -> Path:
        ckpt_dir = run_dir / "checkpoints"
        if not is_main:
            return ckpt_dir / LATEST
        checkpoint = dict(
            format=CHECKPOINT_FORMAT,
            epoch=max(trainer.step - 1, 0) // max(steps_per_epoch, 1),
            model_config=cfg.model.to_dict(),
            train_config=cfg.to_dict(),
            clip_spec=probe.clip_spec,
            clip_identity=getattr(clip, "identity", None),
            **trainer.state_dict(),
        )
        path = atomic_save(checkpoint, ckpt_dir / LATEST)
        mirror_copy(path)
        if snapshot:
            snap = copy_atomic(path, ckpt_dir / snapshot_name(trainer.step))
            mirror_copy(snap)
            prune_snapshots(ckpt_dir, cfg.keep_snapshots)
            if mirror is not None:
                prune_snapshots(mirror / "checkpoints", cfg.keep_snapshots)
        state["saved_step"] = trainer.step
        return path

    def write_preview() -> None:
        if not is_main:
            return
        grid = preview_grid(trainer.preview(preview_text, preview_z))
        path = save_png(grid, run_dir / "previews" / f"step_{trainer.step:07d}.png")
        previews.append(path)
        mirror_copy(path)
        if history:
            mirror_copy(plot_loss_curves(history, run_dir / "loss_curves.png"))
        if on_sample is not None:
            on_sample(trainer.step, grid, path)

    sums: dict[str, float] = {}
    count, t0 = 0, time.perf_counter()
    # SafeStream: a closed terminal pipe (tee killed by the same Ctrl-C) must not stop the save below
    # (a notebook's bar is a widget and keeps its own output)
    stream = {} if _is_notebook_bar(tqdm) else dict(file=SafeStream(sys.stderr))
    bar = tqdm(total=total_steps, initial=trainer.step, desc="train", unit="step", disable=not progress or not is_main,
               **stream)
    try:
        with _deferred_interrupt() as interrupted:
            if trainer.step == 0 and total_steps > 0:
                write_preview()  # the untrained starting point, for comparison
            for batch in loader:
                state["in_step"] = True  # a second Ctrl-C in here leaves a half-done step: never saved
                values = trainer.train_step(batch)
                state["in_step"] = False
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                step, done = trainer.step, trainer.step == total_steps
                if step % cfg.log_every == 0 or done:
                    elapsed = time.perf_counter() - t0
                    row = dict(step=step, epoch=(step - 1) // max(steps_per_epoch, 1),
                               images_per_s=count * cfg.batch_size / max(elapsed, 1e-9),
                               **{k: v / count for k, v in sums.items()})
                    history.append(row)
                    if is_main:
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row) + "\n")
                    bar.set_postfix(d=f"{row['d_loss']:.3f}", g=f"{row['g_loss']:.3f}")
                    if on_log is not None and is_main:
                        on_log(row)
                    sums, count, t0 = {}, 0, time.perf_counter()
                if step % cfg.preview_every == 0 or done:
                    write_preview()
                if step % cfg.checkpoint_every == 0 or step % cfg.snapshot_every == 0 or done:
                    save(snapshot=step % cfg.snapshot_every == 0 or done)
                    if is_main:
                        mirror_copy(metrics_path)
                if interrupted() if dist is None else dist.any(interrupted()):  # every rank stops at the same step
                    raise KeyboardInterrupt
    except BaseException as err:
        half_done = state["in_step"] or isinstance(err, TrainingDiverged)
        if not half_done and state["saved_step"] != trainer.step:
            save(snapshot=False)  # a whole step: whatever stopped the loop, the work so far is kept
        if isinstance(err, KeyboardInterrupt):
            where = latest if latest.is_file() else None
            kept = state["saved_step"] if where is not None else None
            if half_done:
                message = (f"interrupted in the middle of step {trainer.step + 1}: that step was not saved; "
                           + (f"kept the last good checkpoint {where} (step {kept})" if where else "no checkpoint yet"))
            else:
                message = f"interrupted: saved {where} at step {kept}"
            message += "; continue with --resume" if where else "; start again without --resume"
            raise TrainingInterrupted(message, where, kept if kept is not None else 0) from err
        raise
    finally:
        bar.close()
    if history and is_main:
        plot_loss_curves(history, run_dir / "loss_curves.png")
        mirror_copy(run_dir / "loss_curves.png")
    if state["saved_step"] != trainer.step:
        save(snapshot=True)
    if dist is not None:
        dist.barrier()  # rank 0's checkpoint is on disk before any rank returns
    return TrainResult(
        run_dir=run_dir,
        step=trainer.step,
        epoch=max(trainer.step - 1, 0) // max(steps_per_epoch, 1),
        checkpoint=latest if latest.is_file() else None,
        metrics=history[-1] if history else {},
        history=history,
        previews=previews,
    )


def _is_notebook_bar(bar_class: type) -> bool:
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:
        return False
    return issubclass(bar_class, notebook_tqdm)


def _override_dict(overrides: dict[str, Any] | list[str] | tuple[str, ...]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return overrides
    return {k.strip(): _parse_value(v.strip()) for k, _, v in (o.partition("=") for o in overrides)}


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features file from `python -m helpers extract`")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, previews, metrics)")
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=None,
                        help="training preset (default: faces; on --resume the checkpoint's config)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="total training steps")
    length.add_argument("--epochs", type=int, default=None, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue RUN_DIR/checkpoints/latest.pt (or the given checkpoint) exactly")
    parser.add_argument("--mirror", default=None, metavar="DIR", help="also copy every write here (e.g. Google Drive)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override config fields, e.g. --set lr_g=1e-4 nd=4 diffaugment=color,cutout")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = _override_dict(args.overrides)
    if args.steps is not None:
        overrides.update(steps=args.steps)
    if args.epochs is not None:
        overrides.update(epochs=args.epochs, steps=None)
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.mirror is not None:
        overrides["mirror_dir"] = args.mirror
    # on --resume a preset named again is compared with the checkpoint's config (resume_config)
    config = train_preset(args.preset) if args.preset else (None if args.resume else train_preset("faces"))
    if distributed.world_size_from_env() > 1:
        distributed.show_log_messages()  # the effective batch and learning-rate line

    def on_log(row: dict[str, Any]) -> None:
        if args.no_progress:
            say(f"step {row['step']}: d_loss {row['d_loss']:.4f} g_loss {row['g_loss']:.4f} "
                f"({row['images_per_s']:.1f} images/s)")

    try:
        result = train(args.features, args.out, config, overrides=overrides, resume=args.resume,
                       device=args.device, on_log=on_log, progress=not args.no_progress)
    except TrainingInterrupted as stop:
        if distributed.is_main_process():
            say(str(stop))
        return 130
    finally:
        distributed.shutdown()  # torchrun workers: close the process group (no-op in one process)
    if not distributed.is_main_process():
        return 0
    if result.note:
        say(result.note)
        return 0
    say(f"done: {result.step} steps; checkpoint {result.checkpoint}; previews in {result.run_dir / 'previews'}")
    return 0
