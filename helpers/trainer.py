"""One training step: G, G_ema, the discriminators, their optimisers and the step's randomness.

StackGAN++ training (Zhang et al. 2018) with LAFITE's contrastive losses (Zhou
et al. 2022) and the EMA generator of StyleGAN (Karras et al.). One step:

1. G generates every stage once from (text feature, z) (``generate``: a ``Fakes``
   record, with the mode-seeking term's second draws when it is on);
2. D step: each stage's discriminator runs its trunk once on the real batch and
   once on the *detached* fakes (detached: D's loss must not reach G, and G's
   graph stays whole for its own step), every head on those features; all D
   optimisers step;
3. G step: the same fakes, not detached, through the updated discriminators
   (their weights frozen for this backward), plus the CLIP loss at the configured
   stages, the KL term and (when on) MSGAN's mode-seeking term and StackGAN-v2's
   colour consistency, the layout consistency between stages and the last stage's
   spectral term; G steps and the EMA copy follows.

Loss terms come from the pure functions of ``losses`` and are returned under
hierarchical names: ``loss/d``, ``loss/d/stage0``, ``loss/d/stage0/cond``, ...,
``loss/g``, ``loss/g/stage0/adv``, ``loss/g/kl``, ``loss/g/mode_seeking``, ``loss/g/color``, ``loss/g/layout``,
``loss/g/spectrum``.
Everything random in a step draws from one ``torch.Generator`` (saved in the
checkpoint), so a resumed run continues the same stream.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import losses
from .augment import diff_augment, random_resized_crop
from .devices import amp_dtype, precision_line
from .errors import UserError
from .network import DiscOutput, Generator, build_models, standing_statistics
from .train_config import TrainConfig

D_LOSS, G_LOSS = "loss/d", "loss/g"  # the weighted totals of the two halves of a step
PENALTIES = ("/r1", "/ma_gp")  # the gradient penalties' term names


def loss_name(side: str, *parts: str | int) -> str:
    """``loss_name("d", 0, "cond")`` -> ``"loss/d/stage0/cond"``; an int part is a stage index."""
    return "/".join(["loss", side, *(f"stage{p}" if isinstance(p, int) else p for p in parts)])


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; training stopped without saving the bad state."""


@dataclass
class Fakes:
    """One G forward of a step, shared by the D step (detached) and the G step.

    images: per stage [B, 3, 64*2**i, same] in [-1, 1]; mu, logvar [B, cond_dim];
    z [B, z_dim]. With the mode-seeking term: twins (per stage [K, 3, H, W]: the
    first K texts again with other noise twin_z [K, z_dim]); else None.
    """

    images: list[Tensor]
    mu: Tensor
    logvar: Tensor
    z: Tensor
    twins: list[Tensor] | None = None
    twin_z: Tensor | None = None


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


class Trainer:
    """G, G_ema, the discriminators, their optimisers and the step-level RNG, on one device.

    ``train_step(batch)`` runs one full step and returns its loss terms as floats
    (hierarchical names, see the module docstring); ``generate``, ``d_step`` and
    ``g_step`` are its parts. ``state_dict()`` / ``load_state_dict()`` give and
    take the trainer's part of a training checkpoint (``checkpoint`` owns the rest).
    """

    def __init__(self, cfg: TrainConfig, *, clip: nn.Module, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.clip = clip
        G, D = build_models(cfg.model, seed=cfg.seed, clip=clip)  # a CLIP-aided D reads the run's frozen CLIP
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
        every = range(cfg.model.num_stages)
        self.mode_seeking_stages = sorted({s % cfg.model.num_stages for s in cfg.mode_seeking_stages or every})
        self.diffaugment_stages = sorted({s % cfg.model.num_stages for s in cfg.diffaugment_stages or every})
        self.step = 0
        self.sync: Any = None  # a distributed.Distributed under torchrun (set by its prepare()); None: one process

    # ----------------------------------------------------------------- helpers

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def _augment(self, images: Tensor, stage: int) -> Tensor:
        """What stage ``stage``'s D sees of ``images`` [B, 3, H, W]: DiffAugment's policy, where it applies."""
        if not self.cfg.diffaugment or stage not in self.diffaugment_stages:
            return images
        cfg = self.cfg
        return diff_augment(images, cfg.diffaugment, generator=self.generator, translation=cfg.diffaugment_translation,
                            probability=cfg.diffaugment_probability)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sync is not None:  # distributed: the mean gradient over the ranks, as DDP computes it
            self.sync.average_gradients(optimizer)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def _floats(self, terms: dict[str, Tensor], phase: str) -> dict[str, float]:
        """Loss tensors -> floats in one device sync; a NaN/inf on any rank raises TrainingDiverged.

        Under fp16 loss scaling a gradient penalty differentiates the scaled verdict, and an
        overflow there is the GradScaler's business, not a divergence: it skips the step and
        lowers the scale. That step's non-finite terms are left out of the log instead.
        """
        values = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))
        if self.sync is not None:  # distributed: log the mean over the ranks; a NaN on any rank stops all of them
            values.update(self.sync.average_values(values))
        if self.scaler is not None and any(k.endswith(PENALTIES) and not math.isfinite(v) for k, v in values.items()):
            return {k: v for k, v in values.items() if math.isfinite(v)}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1} ({phase}): {names}. Nothing of this step was "
                "saved; the last good checkpoint is untouched. Resume from it with a lower learning rate "
                "(--set lr_g=... lr_d=...), or without mixed precision (--set amp=false)."
            )
        return values

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

    def twins(self, batch_size: int) -> int:
        """Rows G generates a second time per step for the mode-seeking term: a quarter of the batch (0 when off)."""
        return max(1, batch_size // 4) if self.cfg.mode_seeking_weight > 0 else 0

    def generate(self, text: Tensor) -> Fakes:
        """One G forward (train mode, with grad) for text [B, D]: the step's ``Fakes``.

        With the mode-seeking term on, the same forward also draws the twins: the
        first ``twins(B)`` texts again with other noise (for G's loss only).
        """
        B, k = text.shape[0], self.twins(text.shape[0])
        rows = torch.cat([text, text[:k]]) if k else text
        z = torch.randn(rows.shape[0], self.cfg.model.z_dim, generator=self.generator, device=self.device)
        with self.autocast():
            out = self.G(rows, z, generator=self.generator)
        if not k:
            return Fakes(out.images, out.mu, out.logvar, z)
        return Fakes([f[:B] for f in out.images], out.mu[:B], out.logvar[:B], z[:B],
                     twins=[f[B:] for f in out.images], twin_z=z[B:])

    # ----------------------------------------------------------------- the two halves of a step

    def d_step(self, batch: dict[str, Any], fakes: Fakes) -> dict[str, float]:
        """Update every discriminator once; returns its loss terms as floats.

        batch: ``prepare_batch`` output; fakes: this step's ``generate`` output.
        """
        cfg = self.cfg
        condition = fakes.mu.detach().float()  # D's condition is a label: fixed for its step
        mismatched = None
        if cfg.mismatch:
            with torch.no_grad():
                mismatched = self.G.condition_mean(batch["mismatched"])
        terms: dict[str, Tensor] = {}
        regularise = self.step % cfg.reg_every == 0  # lazy: the penalties every reg_every steps
        r1_on, ma_gp_on = regularise and cfg.r1_weight > 0, regularise and cfg.ma_gp_weight > 0
        # fp16: the penalties differentiate the scaled verdict, so that small gradients do not underflow
        scale = self.scaler.get_scale() if self.scaler is not None and (r1_on or ma_gp_on) else None
        for i, (disc, opt) in enumerate(zip(self.D, self.opt_D)):
            disc.requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                real_in = self._augment(batch["real"][i], i)
                cond_in = condition
                if r1_on or ma_gp_on:  # the penalties differentiate D's verdict on the real images
                    real_in = real_in.detach().requires_grad_(True)
                if ma_gp_on:  # ... and, for MA-GP, on their matching condition
                    cond_in = condition.clone().requires_grad_(True)
                # detached: the D loss must not backpropagate into G (and G's graph stays for the G step)
                fake_in = self._augment(fakes.images[i].detach(), i)
                real, fake = self._judge(disc, real_in, fake_in, cond_in, mismatched)
                r1 = losses.r1_penalty(real.uncond + real.cond, real_in, scale=scale) if r1_on else None
                ma_gp = losses.matching_aware_penalty(real.cond, real_in, cond_in, scale=scale) if ma_gp_on else None
                stage = losses.d_stage_losses(real, fake, batch["text"], weights=cfg, contrast=self._info_nce,
                                              r1=r1, ma_gp=ma_gp)
            self._backward(stage["total"])
            terms.update({loss_name("d", i, k) if k != "total" else loss_name("d", i): v for k, v in stage.items()})
        terms[D_LOSS] = sum(terms[loss_name("d", i)] for i in range(len(self.D)))
        values = self._floats(terms, "discriminator step")
        for opt in self.opt_D:
            self._step(opt)
        return values

    def _judge(
        self, disc: nn.Module, real: Tensor, fake: Tensor, condition: Tensor, mismatched: Tensor | None,
    ) -> tuple[DiscOutput, DiscOutput]:
        """D's heads on the real and on the fake batch: separately (the reference), or as one batch
        (``d_batches="joint"``: BatchNorm then normalises real and fake with the same statistics)."""
        align = self.cfg.align_weight > 0  # D's alignment term reads real images only
        if self.cfg.d_batches == "separate":
            return (disc.heads(disc.features(real), condition, mismatched=mismatched, align=align),
                    disc.heads(disc.features(fake), condition, align=False))
        B = real.shape[0]
        both = disc.heads(disc.features(torch.cat([real, fake])), torch.cat([condition, condition]),
                          mismatched=None if mismatched is None else torch.cat([mismatched, mismatched]), align=align)
        parts = [[None if t is None else t[:B] for t in both], [None if t is None else t[B:] for t in both]]
        parts[1][2] = parts[1][3] = None  # alignment and a mismatched caption are questions about real images
        return DiscOutput(*parts[0]), DiscOutput(*parts[1])

    def g_step(self, batch: dict[str, Any], fakes: Fakes) -> dict[str, float]:
        """Update G once from the (non-detached) fakes of this step; returns its loss terms as floats."""
        cfg = self.cfg
        condition = fakes.mu.detach().float()  # D's condition is a label: G must not move it to fool D
        self.D.requires_grad_(False)  # no weight gradients for D in G's backward
        self.opt_G.zero_grad(set_to_none=True)
        terms: dict[str, Tensor] = {}
        with self.autocast():
            for i, disc in enumerate(self.D):
                fake = disc.heads(disc.features(self._augment(fakes.images[i], i)), condition, align=cfg.align_weight > 0)
                clip_emb = None
                if i in self.clip_stages:
                    shown = random_resized_crop(fakes.images[i], self.generator) if cfg.clip_augment else fakes.images[i]
                    clip_emb = self.clip.embed_generated(shown)
                stage = losses.g_stage_losses(fake, batch["text"], weights=cfg, contrast=self._info_nce,
                                              clip_embedding=clip_emb)
                terms.update({loss_name("g", i, k) if k != "total" else loss_name("g", i): v for k, v in stage.items()})
            total = sum(terms[loss_name("g", i)] for i in range(len(self.D)))
            terms[loss_name("g", "kl")] = losses.kl_loss(fakes.mu, fakes.logvar)
            total = total + cfg.kl_weight * terms[loss_name("g", "kl")]
            if cfg.color_consistency > 0 and len(fakes.images) > 1:
                terms[loss_name("g", "color")] = losses.color_consistency_loss(fakes.images)
                total = total + cfg.color_consistency * terms[loss_name("g", "color")]
            if cfg.layout_consistency > 0 and len(fakes.images) > 1:
                coarse = fakes.images[0].shape[-1] // 2  # 32 px: layout and colours, no details
                terms[loss_name("g", "layout")] = losses.layout_consistency_loss(fakes.images, size=coarse)
                total = total + cfg.layout_consistency * terms[loss_name("g", "layout")]
            if cfg.spectral_weight > 0:
                real = batch["real"][len(fakes.images) - 1]  # the last stage's real images
                terms[loss_name("g", "spectrum")] = losses.spectrum_loss(fakes.images[-1], real)
                total = total + cfg.spectral_weight * terms[loss_name("g", "spectrum")]
            if fakes.twins is not None:
                k = fakes.twins[0].shape[0]
                stages = self.mode_seeking_stages
                seeking = losses.mode_seeking_loss([fakes.images[s][:k] for s in stages],
                                                   [fakes.twins[s] for s in stages], fakes.z[:k], fakes.twin_z,
                                                   size=cfg.mode_seeking_size or None)
                terms[loss_name("g", "mode_seeking")] = seeking
                total = total + cfg.mode_seeking_weight * seeking
        terms[G_LOSS] = total
        self._backward(total)
        self.D.requires_grad_(True)
        values = self._floats(terms, "generator step")
        self._step(self.opt_G)
        return values

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One full step on a collated dataset batch; returns every loss term as a float."""
        if self.sync is not None:  # distributed: this rank's noise, seeded by (run seed, rank, step)
            self.sync.begin_step(self)
        prepared = self.prepare_batch(batch)
        fakes = self.generate(prepared["text"])  # G runs once per step; its fakes serve both halves
        values = self.d_step(prepared, fakes)
        values.update(self.g_step(prepared, fakes))
        if self.scaler is not None:
            self.scaler.update()
        ema_update(self.G_ema, self.G, ema_decay_at(self.step, self.cfg.ema_decay))
        self.step += 1
        return values

    # ----------------------------------------------------------------- previews and state

    @torch.no_grad()
    def preview(self, text: Tensor, z: Tensor, ca_noise: Tensor | None = None, *,
                ema_state: dict[str, Tensor] | None = None) -> list[Tensor]:
        """G_ema in eval mode: text [N, D], z [N, z_dim], ca_noise [N, cond_dim] (None: the mean
        condition) -> images per stage in [-1, 1] (fp32, CPU). ``ema_state``: a state dict of
        G_ema to draw with instead (``standing_ema_state``, as a save writes it)."""
        text, z = text.to(self.device, torch.float32), z.to(self.device, torch.float32)
        if ca_noise is None:
            ca_noise = torch.zeros(text.shape[0], self.cfg.model.cond_dim)
        generator = self.G_ema
        if ema_state is not None:
            generator = copy.deepcopy(self.G_ema)
            generator.load_state_dict(ema_state)
        images, _, _ = generator.eval()(text, z, ca_noise.to(self.device, torch.float32))
        return [img.float().cpu() for img in images]

    def standing_ema_state(self, text: Tensor) -> dict[str, Tensor]:
        """G_ema's state dict with BatchNorm statistics recomputed for its own (averaged) weights
        (``network.standing_statistics``: text [N, D] in batches of ``batch_size``, noise seeded by
        the run's seed). The trainer's own G_ema is not changed (its statistics keep following
        G's, so training is the same with or without this)."""
        return standing_statistics(self.G_ema, text, batch_size=self.cfg.batch_size, seed=self.cfg.seed + 3,
                                   autocast=self.autocast)

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
