"""Checkpoint files: the one owner of their layout, for training snapshots and generator exports.

A checkpoint is one ``torch.save`` dict tagged ``"format": CHECKPOINT_FORMAT``.

- A **training checkpoint** (``save_training_checkpoint`` / ``read_training_checkpoint``)
  holds everything needed to resume exactly: the ``TrainConfig`` (the model
  config inside it, stored once), the CLIP that made the features
  (``clip_spec``, ``clip_identity``), the epoch, and the trainer's state (step,
  G, G_ema, every D, every optimiser, the AMP scaler, RNG states).
- A **generator export** (``save_generator`` / ``export_generator``) holds only what
  sampling needs: ``model_config``, ``clip_spec``, ``clip_identity``, ``step``, ``G_ema``.

``read_generator`` reads the EMA generator's part of either. Files are written
atomically (``files.atomic_save``), so a Colab disconnect never leaves a broken
file behind. The run folder's names (``LATEST``, ``snapshot_name``) live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError
from .files import atomic_save

FORMAT_PREFIX = "helpers-t2i-gan/"
CHECKPOINT_FORMAT = FORMAT_PREFIX + "2"  # training checkpoints: /1 stored the model config twice (still read)
EXPORT_FORMAT = FORMAT_PREFIX + "1"  # generator exports: the layout /1 had, so older checkouts still read them
READABLE_FORMATS = (EXPORT_FORMAT, CHECKPOINT_FORMAT)
LATEST = "latest.pt"  # the newest training checkpoint of a run, in RUN_DIR/checkpoints/
TRAINER_KEYS = ("step", "G", "G_ema", "D", "opt_G", "opt_D", "scaler", "rng")  # what Trainer.state_dict() gives


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated or not one of ours."""


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint file of this project (any kind: its raw dict).

    Raises CheckpointError naming the file and what to do when it is missing,
    unreadable (truncated, not a torch file) or lacks the project's format tag.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or train one first)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for broken files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}. The file is truncated "
            "or not a checkpoint; use an earlier snapshot or copy it again."
        ) from err
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if isinstance(found, str) and found.startswith(FORMAT_PREFIX) and found not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} was written by a newer version of this project (format {found!r}; this one reads "
            f"{', '.join(READABLE_FORMATS)}): update the repository (git pull) and its requirements"
        )
    if not isinstance(ckpt, dict) or found not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r})"
        )
    return ckpt


# --------------------------------------------------------------------------- training checkpoints


@dataclass
class TrainingCheckpoint:
    """A training checkpoint as read: its config and the trainer's state (``Trainer.load_state_dict`` input)."""

    path: Path
    config: Any  # TrainConfig (the model config inside it)
    state: dict[str, Any]  # TRAINER_KEYS: step, G, G_ema, D, opt_G, opt_D, scaler, rng
    clip_spec: str | None  # the CLIP of the features the run trained on
    clip_identity: dict[str, Any] | None  # ClipEncoder.identity; None in files that predate it
    epoch: int = 0

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_training_checkpoint(
    path: str | os.PathLike, config: Any, state: dict[str, Any], *, clip_spec: str | None,
    clip_identity: dict[str, Any] | None, epoch: int,
) -> Path:
    """Write a training checkpoint atomically: ``config`` (a TrainConfig), ``state`` (``Trainer.state_dict()``)."""
    missing = [k for k in TRAINER_KEYS if k not in state]
    if missing:
        raise ValueError(f"the trainer state lacks {missing}")
    checkpoint = dict(format=CHECKPOINT_FORMAT, train_config=config.to_dict(), clip_spec=clip_spec,
                      clip_identity=clip_identity, epoch=int(epoch), **{k: state[k] for k in TRAINER_KEYS})
    return atomic_save(checkpoint, path)


def read_training_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Read a training checkpoint (weights on the CPU; the trainer moves them). CheckpointError if it is not one."""
    from .train_config import TrainConfig

    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")  # RNG states must stay CPU byte tensors
    missing = [k for k in ("train_config", "G", "D", "opt_G", "opt_D", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is not a training checkpoint (an export cannot be resumed)")
    try:
        config = TrainConfig.from_dict(ckpt["train_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its training config cannot be read: {err}") from err
    return TrainingCheckpoint(
        path=path, config=config, state={k: ckpt.get(k) for k in TRAINER_KEYS}, clip_spec=ckpt.get("clip_spec"),
        clip_identity=ckpt.get("clip_identity"), epoch=int(ckpt.get("epoch", 0)),
    )


def snapshot_name(step: int) -> str:
    """File name of the periodic snapshot at ``step``: ``step_0001234.pt``."""
    return f"step_{step:07d}.pt"


def prune_snapshots(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_*.pt`` snapshots in ``directory``; returns the removed paths.

    ``keep <= 0`` keeps every snapshot. ``latest.pt`` is never touched.
    """
    if keep <= 0:
        return []
    snapshots = sorted(Path(directory).glob("step_*.pt"))
    removed = snapshots[:-keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- generators


@dataclass
class GeneratorFile:
    """The EMA generator's part of a checkpoint (a training snapshot or an export)."""

    path: Path
    model_config: ModelConfig
    G_ema: dict[str, torch.Tensor] = field(repr=False)  # state dict
    clip_spec: str
    clip_identity: dict[str, Any] | None
    step: int


def read_generator(path: str | os.PathLike) -> GeneratorFile:
    """Read the EMA generator of a training checkpoint or an export; CheckpointError if it has none."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    has_config = "train_config" in ckpt or "model_config" in ckpt
    missing = [k for k in ("clip_spec", "G_ema") if k not in ckpt] + ([] if has_config else ["model_config"])
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it is not a generator checkpoint")
    try:
        model = ckpt["train_config"]["model"] if "train_config" in ckpt else ckpt["model_config"]
        config = ModelConfig.from_dict(model)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: its model config cannot be read: {err}") from err
    return GeneratorFile(path, config, ckpt["G_ema"], str(ckpt["clip_spec"]), ckpt.get("clip_identity"),
                         int(ckpt.get("step", 0)))


def save_generator(
    path: str | os.PathLike, generator: torch.nn.Module, *, clip_spec: str, step: int = 0,
    clip_identity: dict[str, Any] | None = None,
) -> Path:
    """Write a generator export of ``generator`` (a ``network.Generator``, its ``cfg`` the model config), atomically."""
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    return _write_export(path, generator.cfg, state, clip_spec=clip_spec, clip_identity=clip_identity, step=step)


def export_generator(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a sampling-only export of a training checkpoint's (or an export's) EMA generator.

    The export is a few times smaller than the training checkpoint: no
    discriminators, optimiser moments or RNG states.
    """
    g = read_generator(checkpoint_path)
    return _write_export(out_path, g.model_config, g.G_ema, clip_spec=g.clip_spec, clip_identity=g.clip_identity,
                         step=g.step)


def _write_export(
    path: str | os.PathLike, config: ModelConfig, state: dict[str, torch.Tensor], *, clip_spec: str,
    clip_identity: dict[str, Any] | None, step: int,
) -> Path:
    return atomic_save(dict(format=EXPORT_FORMAT, model_config=config.to_dict(), clip_spec=clip_spec,
                            clip_identity=clip_identity, step=int(step), G_ema=state), path)


# The file helpers this module held before ``files`` owned them, for code that imports them from here.
from .files import OutputError, atomic_write, atomic_write_bytes, copy_atomic  # noqa: E402,F401
