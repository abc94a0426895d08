"""Training: the loop of a run, and ``python -m helpers train`` over it.

``train()`` decides what a run is (a new run, or the checkpoint it resumes, with
``train_config.run_config``'s precedence), checks the features file and the CLIP
against it before any file is written, and runs the loop: batches in the run's
data order (``batches``), one ``Trainer.train_step`` each, with metrics,
previews and checkpoints going to the run's folder (``run_folder.RunFolder``).
Ctrl-C saves at the end of the step; a NaN stops without saving. Where each
concern lives:

- ``train_config``: ``TrainConfig``, the presets, ``--set`` overrides, resume precedence;
- ``trainer``: the step (``Trainer``), EMA, the step's RNG, loss-term names;
- ``batches``: the data order of a run (exact resume, torchrun shards);
- ``run_folder``: checkpoints, previews, metrics.jsonl, the loss plot, the Drive mirror;
- ``checkpoint``: the checkpoint layout.

Every public name of those modules that notebooks and scripts use is importable
from here too (``from helpers.train import Trainer, train, train_preset``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import distributed
from .batches import RunBatches, SeededItems, balance_weights
from .checkpoint import TrainingCheckpoint, read_training_checkpoint
from .console import SafeStream, say
from .devices import resolve_device
from .errors import UserError
from .run_folder import (
    IMAGES_PER_S,
    RunFolder,
    find_resume_checkpoint,
    load_preview_captions,
    plot_loss_curves,
    read_metrics,
)
from .runlock import RunLock
from .train_config import (
    RESUMABLE,
    TRAIN_PRESETS,
    Overrides,
    TrainConfig,
    apply_overrides,
    parse_overrides,
    resume_config,
    run_config,
    train_preset,
)
from .trainer import (
    D_LOSS,
    G_LOSS,
    Fakes,
    Trainer,
    TrainingDiverged,
    ema_decay_at,
    ema_update,
    loss_name,
    pseudo_text_features,
)

__all__ = [
    "RESUMABLE", "TRAIN_PRESETS", "D_LOSS", "G_LOSS", "Fakes", "RunBatches", "SeededItems", "TrainConfig",
    "TrainResult", "Trainer", "TrainingDiverged", "TrainingInterrupted", "apply_overrides", "ema_decay_at",
    "ema_update", "find_resume_checkpoint", "load_preview_captions", "loss_name", "parse_overrides",
    "plot_loss_curves", "pseudo_text_features", "read_metrics", "resume_config", "run_config", "train",
    "train_preset",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``str()`` says what was saved and how to continue.

    ``checkpoint``: the run's latest.pt (None when the run saved none yet);
    ``step``: the step that checkpoint holds.
    """

    def __init__(self, message: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


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


# --------------------------------------------------------------------------- the run


def train(
    features: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    overrides: Overrides = (),
    resume: bool | str | os.PathLike = False,
    device: str | torch.device | None = None,
    clip: nn.Module | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_sample: Callable[[int, Any, Path], None] | None = None,
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
    on_log(row): called with every metrics row (names as in ``trainer``: ``loss/d``,
        ``loss/g/stage0/adv``, ...); on_sample(step, picture, path): called with every
        preview (a PIL image: one row per stage, one column per preview caption).

    On resume, ``config`` (a preset named again) and ``overrides`` may change only
    the ``RESUMABLE`` fields (``run_config``); a run already at its last step
    returns at once with ``note`` saying so. One process trains in a folder at a
    time (``RunLock``). A NaN/inf loss raises TrainingDiverged without saving;
    Ctrl-C saves latest.pt at the end of the step and raises TrainingInterrupted
    (a KeyboardInterrupt); a second Ctrl-C stops mid-step and keeps the last good
    checkpoint instead. Started by torchrun with WORLD_SIZE > 1, every process
    calls this and they train data-parallel (``helpers.distributed``); only rank 0
    writes files and calls the callbacks.
    """
    device, dist = _device_and_ranks(device)
    run_dir = Path(out)
    saved: TrainingCheckpoint | None = None
    if resume:
        mirror = (config.mirror_dir if config else None) or parse_overrides(overrides).get("mirror_dir")
        saved = read_training_checkpoint(find_resume_checkpoint(run_dir, resume, mirror))
    elif (latest := RunFolder(run_dir).latest).is_file():
        raise UserError(f"{run_dir} already holds a run ({latest}); resume it with --resume or choose another --out")
    # Everything is checked before the run folder is made: a bad input leaves no half-made run behind.
    cfg = run_config(config, overrides, saved=saved.config if saved else None)
    cfg, dataset, clip = _data_and_clip(features, cfg, saved, clip, device)
    trainer = Trainer(cfg, clip=clip, device=device)
    notes = trainer.load_state_dict(saved.state) if saved else _seed_everything(cfg.seed)
    del saved  # the weights now live in the trainer
    steps_per_epoch = max(len(dataset) // cfg.batch_size, 1)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    run = RunFolder(run_dir, mirror=cfg.mirror_dir, keep_snapshots=cfg.keep_snapshots,
                    writer=dist is None or dist.is_main)  # only rank 0 writes files and shows progress
    if resume and trainer.step >= total_steps:
        history = read_metrics(run.metrics_path)
        return TrainResult(
            run_dir=run_dir, step=trainer.step, epoch=max(trainer.step - 1, 0) // steps_per_epoch,
            checkpoint=run.latest if run.latest.is_file() else None, metrics=history[-1] if history else {},
            history=history, previews=[],
            note=f"nothing to do: the run is already at step {trainer.step} of {total_steps}; "
                 f"ask for more, e.g. --steps {max(2 * trainer.step, 1)}",
        )
    with RunLock(run_dir) if run.writer else contextlib.nullcontext():  # one run per folder
        return _loop(trainer, run, dataset, dist=dist, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     notes=notes, on_log=on_log, on_sample=on_sample, progress=progress)


def _device_and_ranks(device: str | torch.device | None) -> tuple[torch.device, Any]:
    """The device this process trains on, and torchrun's ranks (None unless WORLD_SIZE > 1)."""
    device = resolve_device(device)
    if device.type == "cpu":
        # Tiny (denormal) floats appear as G and D settle and make CPU arithmetic many
        # times slower: measured 1 s -> 15 s per demo step over 25 steps without this.
        torch.set_flush_denormal(True)
    dist = distributed.from_environment(device)
    return (dist.device if dist is not None else device), dist


def _data_and_clip(
    features: str | os.PathLike, cfg: TrainConfig, saved: TrainingCheckpoint | None, clip: nn.Module | None,
    device: torch.device,
) -> tuple[TrainConfig, Any, nn.Module]:
    """The training split and the CLIP, checked against the config and the checkpoint; a new run's
    ``model.text_dim`` follows the features. Returns (config, dataset, clip)."""
    from .clip_encoder import check_same_clip, load_clip
    from .features import FeaturesDataset

    dataset = FeaturesDataset(features, split="train", num_stages=cfg.model.num_stages)
    if not dataset.clip_spec:
        raise UserError(f"{features} does not name its CLIP model (meta['clip_spec']); extract it again")
    if saved is not None and saved.clip_spec != dataset.clip_spec:
        raise UserError(
            f"the checkpoint was trained with CLIP {saved.clip_spec!r}, the features file uses "
            f"{dataset.clip_spec!r}: extract the features with the same CLIP"
        )
    if saved is None and cfg.model.text_dim != dataset.dim:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_dim=dataset.dim))
    if cfg.model.text_dim != dataset.dim:
        raise UserError(f"the model takes {cfg.model.text_dim}-d text features, the features file has {dataset.dim}-d")
    if clip is None:
        clip = load_clip(dataset.clip_spec, device=device)
    if getattr(clip, "dim", dataset.dim) != dataset.dim:
        raise UserError(f"the CLIP model gives {clip.dim}-d features, the features file has {dataset.dim}-d")
    if hasattr(clip, "identity"):
        check_same_clip(dataset.meta.get("clip_identity"), clip, what=f"the features file {features}")
        if saved is not None:
            check_same_clip(saved.clip_identity, clip, what=f"the checkpoint {saved.path}")
    return cfg, dataset, clip


def _seed_everything(seed: int) -> list[str]:
    """A new run's global seeds (the weights are seeded by the Trainer itself); no notes."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return []


def _loop(
    trainer: Trainer, run: RunFolder, dataset: Any, *, dist: Any, total_steps: int, steps_per_epoch: int,
    notes: list[str], on_log: Callable[[dict[str, Any]], None] | None,
    on_sample: Callable[[int, Any, Path], None] | None, progress: bool,
) -> TrainResult:
    """The loop of ``train()`` once everything is checked and the run folder is locked."""
    from tqdm.auto import tqdm

    from .pictures import preview_picture

    cfg, clip = trainer.cfg, trainer.clip
    if dist is not None:
        dist.prepare(trainer)  # rank 0's weights everywhere, gradient averaging, per-rank noise
    shard = dict(rank=dist.rank, world_size=dist.world_size) if dist is not None else {}
    weights = None
    if cfg.balance_attributes > 0 and dataset.attributes is None:
        notes.append(f"balance_attributes={cfg.balance_attributes}, but the features file has no attributes "
                     "(a folder without them): images are drawn uniformly")
    elif cfg.balance_attributes > 0:
        weights = balance_weights(dataset.attributes, cfg.balance_attributes)
    sampler = RunBatches(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=trainer.step, total_steps=total_steps,
                         weights=weights, **shard)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (2 if trainer.device.type == "cuda" else 0)
    loader = DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=trainer.device.type == "cuda", persistent_workers=False)
    history = run.open(trainer.step)
    if run.writer:
        for line in [trainer.precision, *notes]:
            say(line if line.startswith("precision") else f"note: {line}", err=True)
    captions = load_preview_captions(cfg.preview_captions)
    preview_text = clip.encode_text(captions)
    # fixed noise, both parts drawn as sampling draws them: z and the conditioning-augmentation noise
    preview_z = torch.randn(len(captions), cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    preview_ca = torch.randn(len(captions), cfg.model.cond_dim, generator=torch.Generator().manual_seed(cfg.seed + 2))
    standing = standing_text(dataset, cfg) if cfg.ema_standing_stats else None
    meta = dict(clip_spec=dataset.clip_spec, clip_identity=getattr(clip, "identity", None))
    previews: list[Path] = []
    # nothing to save before the first step of this call: an error then leaves no step-0 checkpoint behind
    state = dict(saved_step=trainer.step, in_step=False)

    def epoch() -> int:
        return max(trainer.step - 1, 0) // steps_per_epoch

    standing_state: dict[str, Any] = {}

    def saved_ema() -> dict[str, Tensor] | None:
        """G_ema's state as a save writes it and a preview draws it: BatchNorm statistics for its own
        weights (computed once per step), or None where the run keeps G's."""
        if standing is None:
            return None
        if standing_state.get("step") != trainer.step:
            standing_state.update(step=trainer.step, G_ema=trainer.standing_ema_state(standing))
        return standing_state["G_ema"]

    def save(*, snapshot: bool) -> None:
        weights = trainer.state_dict()
        ema_state = saved_ema() if run.writer else None  # only rank 0 writes
        if ema_state is not None:
            weights["G_ema"] = ema_state
        run.save_checkpoint(cfg, weights, snapshot=snapshot, epoch=epoch(), **meta)
        state["saved_step"] = trainer.step

    def preview() -> None:
        if run.writer:  # the G_ema that sampling will load from this step's checkpoint
            picture = preview_picture(trainer.preview(preview_text, preview_z, preview_ca, ema_state=saved_ema()),
                                      captions)
            previews.append(run.save_preview(trainer.step, picture))
            if on_sample is not None:
                on_sample(trainer.step, picture, previews[-1])

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    count, t0 = 0, time.perf_counter()
    # SafeStream: a closed terminal pipe (tee killed by the same Ctrl-C) must not stop the save below
    # (a notebook's bar is a widget and keeps its own output)
    stream = {} if _is_notebook_bar(tqdm) else dict(file=SafeStream(sys.stderr))
    bar = tqdm(total=total_steps, initial=trainer.step, desc="train", unit="step",
               disable=not progress or not run.writer, **stream)
    try:
        with _deferred_interrupt() as interrupted:
            if trainer.step == 0 and total_steps > 0:
                preview()  # the untrained starting point, for comparison
            for batch in loader:
                state["in_step"] = True  # a second Ctrl-C in here leaves a half-done step: never saved
                values = trainer.train_step(batch)
                state["in_step"] = False
                for k, v in values.items():  # counted per term: some terms are not computed every step
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                count += 1
                bar.update(1)
                step, done = trainer.step, trainer.step == total_steps
                if step % cfg.log_every == 0 or done:
                    elapsed = time.perf_counter() - t0
                    row = {"step": step, "epoch": epoch(), IMAGES_PER_S: count * cfg.batch_size / max(elapsed, 1e-9),
                           **{k: v / counts[k] for k, v in sums.items()}}
                    run.log(row)
                    bar.set_postfix(d=f"{row.get(D_LOSS, math.nan):.3f}", g=f"{row.get(G_LOSS, math.nan):.3f}")
                    if on_log is not None and run.writer:
                        on_log(row)
                    sums, counts, count, t0 = {}, {}, 0, time.perf_counter()
                if step % cfg.preview_every == 0 or done:
                    preview()
                if step % cfg.checkpoint_every == 0 or step % cfg.snapshot_every == 0 or done:
                    save(snapshot=step % cfg.snapshot_every == 0 or done)
                if interrupted() if dist is None else dist.any(interrupted()):  # every rank stops at the same step
                    raise KeyboardInterrupt
    except BaseException as err:
        half_done = state["in_step"] or isinstance(err, TrainingDiverged)
        if not half_done and state["saved_step"] != trainer.step:
            save(snapshot=False)  # a whole step: whatever stopped the loop, the work so far is kept
        if isinstance(err, KeyboardInterrupt):
            raise _interrupted(run, state["saved_step"], trainer.step, half_done=half_done) from err
        raise
    finally:
        bar.close()
    run.plot()
    if state["saved_step"] != trainer.step:
        save(snapshot=True)
    if dist is not None:
        dist.barrier()  # rank 0's checkpoint is on disk before any rank returns
    return TrainResult(run_dir=run.path, step=trainer.step, epoch=epoch(),
                       checkpoint=run.latest if run.latest.is_file() else None,
                       metrics=history[-1] if history else {}, history=history, previews=previews)


def standing_text(dataset: Any, cfg: TrainConfig) -> Tensor:
    """[ema_standing_stats * batch_size, text_dim]: the text features that recompute G_ema's
    BatchNorm statistics (the first caption of seeded random training images; the image feature
    where there is none), the same at every save."""
    n = min(len(dataset), cfg.ema_standing_stats * cfg.batch_size)
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + 3))[:n]
    has_caption = dataset.caption_counts[rows] > 0
    return torch.where(has_caption[:, None], dataset.text_features[rows, 0], dataset.image_features[rows])


def _interrupted(run: RunFolder, saved_step: int, step: int, *, half_done: bool) -> TrainingInterrupted:
    """What Ctrl-C leaves: the message names the checkpoint kept and how to continue."""
    where = run.latest if run.latest.is_file() else None
    if half_done:
        message = (f"interrupted in the middle of step {step + 1}: that step was not saved; "
                   + (f"kept the last good checkpoint {where} (step {saved_step})" if where else "no checkpoint yet"))
    else:
        message = f"interrupted: saved {where} at step {saved_step}"
    message += "; continue with --resume" if where else "; start again without --resume"
    return TrainingInterrupted(message, where, saved_step if where is not None else 0)


def _is_notebook_bar(bar_class: type) -> bool:
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:
        return False
    return issubclass(bar_class, notebook_tqdm)


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
    overrides: dict[str, Any] = parse_overrides(args.overrides)
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
            say(f"step {row['step']}: {D_LOSS} {row[D_LOSS]:.4f} {G_LOSS} {row[G_LOSS]:.4f} "
                f"({row[IMAGES_PER_S]:.1f} images/s)")

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
