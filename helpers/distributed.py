"""Data-parallel training over several processes: ``torchrun --nproc_per_node=N -m helpers train ...``.

torchrun starts one process per GPU (on one machine or several) and tells each
its place through environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). ``from_environment`` turns those into a
``Distributed`` object and a process group: NCCL on CUDA, gloo on the CPU.
Without WORLD_SIZE (or with WORLD_SIZE=1) it returns None and training runs the
single-process code path unchanged.

What a step looks like with N processes (the semantics of PyTorch's
DistributedDataParallel, DDP):

- ``TrainConfig.batch_size`` is the global batch. ``RunBatches`` gives rank r
  the rows r, r + N, r + 2N, ... of every global batch; the ranks together see
  exactly the batch one process would see, and the epoch order comes from
  (seed, epoch) like DistributedSampler after ``set_epoch``. The learning rates
  apply to that global batch, so they are not rescaled with N.
- Every optimiser's gradients are averaged over the ranks just before it steps
  (``Trainer._step``), after the initial weights were broadcast from rank 0, so
  the replicas stay identical. Losses that are means over the batch (the
  adversarial terms, KL) then give the gradient of the global-batch mean.
- The InfoNCE losses use every rank's rows as negatives (an all-gather that
  carries gradients, like open_clip's ``gather_with_grad``): with N ranks the
  contrastive task stays as hard as in one process.
- The noise of a step (z, conditioning augmentation, DiffAugment) comes from a
  generator reseeded at every step from (run seed, rank, step): different on
  every rank, and a resumed run draws the same numbers as an uninterrupted one.
- BatchNorm normalises each rank's rows with their own statistics unless
  ``sync_batchnorm`` is set, which converts G and every D with
  ``torch.nn.SyncBatchNorm`` (statistics over the global batch). PyTorch runs
  SyncBatchNorm on GPUs only; on the CPU (gloo) it is refused with a message.
- CLIP is loaded once per rank on its device, frozen, and never synchronised.

Why gradients are averaged at the optimiser step instead of wrapping the models
in ``DistributedDataParallel``: the trainer calls the discriminator's parts
directly (``features`` on the real and on the fake batch, then ``heads`` on each)
and runs G's step through D with D's weights frozen. DDP expects one
``forward()`` of the wrapped module per backward and fixed ``requires_grad``
flags, so it would need a wrapper module rewriting both halves of the step.
Averaging each optimiser's gradients in one flattened all-reduce right before
``optimizer.step()`` is the same arithmetic as DDP (DDP also averages), keeps
``d_step`` / ``g_step`` as they are, and gives fp16 loss scaling identical
gradients on every rank, so every rank skips the same steps. What it gives up
is DDP's overlap of communication with the backward pass, which matters little
for models of this size.

Failures: a NaN or infinite loss on any rank reaches every rank (the loss
values are averaged before the finite check), so all ranks raise
``TrainingDiverged`` at the same step. A rank that crashes ends its process;
torchrun then stops the other ranks and names the failed one, and a rank
waiting on a collective that never completes raises ``DistributedError`` after
the process-group timeout (``HELPERS_DIST_TIMEOUT_S``, default 600 s) instead
of hanging. Only rank 0 writes checkpoints, previews, metrics and progress bars.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .errors import UserError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "HELPERS_DIST_TIMEOUT_S"  # seconds a rank waits for the others before it gives up
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class DistributedError(UserError):
    """Communication between the training processes failed (another rank died or stalled)."""


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun; 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this process is a torchrun worker other than rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for the noise of ``step`` on ``rank``, derived from the run seed."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class Distributed:
    """This process's place in a data-parallel run and the collectives the trainer needs."""

    rank: int  # 0 .. world_size - 1 over all machines
    local_rank: int  # index of this process on its machine (its GPU)
    world_size: int  # number of processes
    device: torch.device  # cuda:LOCAL_RANK, or cpu
    backend: str  # "nccl" or "gloo"
    timeout_s: float  # process-group timeout

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    # ----------------------------------------------------------------- setup

    def rows_per_rank(self, batch_size: int) -> int:
        """Images per rank for a global batch; a UserError unless it splits evenly into >= 2 each."""
        if batch_size % self.world_size or batch_size // self.world_size < 2:
            raise UserError(
                f"batch_size {batch_size} cannot be split over {self.world_size} processes: the global batch "
                f"must be a multiple of {self.world_size} with at least 2 images per process (BatchNorm "
                f"needs 2), e.g. --batch-size {max(2, batch_size // self.world_size) * self.world_size}"
            )
        return batch_size // self.world_size

    def describe(self, cfg: Any) -> str:
        """One line: processes, effective batch and the learning-rate rule (``cfg``: a TrainConfig)."""
        per_rank = self.rows_per_rank(cfg.batch_size)
        norm = "SyncBatchNorm over the global batch" if cfg.sync_batchnorm else "per-process BatchNorm statistics"
        return (
            f"distributed training: {self.world_size} processes ({self.backend}, {self.device.type}); "
            f"effective batch {cfg.batch_size} = {per_rank} per process x {self.world_size}; "
            f"learning rates lr_g={cfg.lr_g:g} lr_d={cfg.lr_d:g} apply to the global batch as set "
            f"(not scaled with the number of processes); {norm}"
        )

    def prepare(self, trainer: Any) -> None:
        """Make ``trainer`` (a Trainer, after any checkpoint was loaded) data-parallel.

        Checks the batch split, converts BatchNorm to SyncBatchNorm if
        ``trainer.cfg.sync_batchnorm``, broadcasts rank 0's weights and buffers,
        and installs this object as ``trainer.sync`` (the trainer's hooks call
        ``begin_step``, ``average_gradients``, ``average_values`` and ``gather_rows``).
        """
        cfg = trainer.cfg
        self.rows_per_rank(cfg.batch_size)
        if cfg.sync_batchnorm:
            if self.device.type != "cuda":
                raise UserError(
                    "sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only. On the CPU drop "
                    "--set sync_batchnorm=true (each process then normalises with its own batch statistics)."
                )
            # same Parameter and buffer objects: the optimisers and checkpoint keys stay valid
            trainer.G = nn.SyncBatchNorm.convert_sync_batchnorm(trainer.G)
            trainer.D = nn.SyncBatchNorm.convert_sync_batchnorm(trainer.D)
        for module in (trainer.G, trainer.G_ema, trainer.D):
            self.broadcast_from_main(module)
        trainer.sync = self
        if self.is_main:
            log.info(self.describe(cfg))

    # ----------------------------------------------------------------- collectives

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective; a failure (a rank died or the timeout passed) becomes a clear error."""
        try:
            return fn()
        except (RuntimeError, torch.distributed.DistBackendError) as err:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({str(err).splitlines()[0]}). Another "
                f"process stopped (its own error is printed above) or did not answer within {self.timeout_s:g} s "
                f"(${TIMEOUT_ENV}). Resume from the last checkpoint with --resume."
            ) from err

    def broadcast_from_main(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        tensors = [t for t in [*module.parameters(), *module.buffers()]]

        def run() -> None:
            with torch.no_grad():
                for t in tensors:
                    torch.distributed.broadcast(t.data, src=0)

        self._collective("broadcasting the initial weights", run)

    def begin_step(self, trainer: Any) -> None:
        """Reseed the trainer's noise generator from (run seed, rank, step)."""
        trainer.generator.manual_seed(rank_step_seed(trainer.cfg.seed, self.rank, trainer.step))

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace every gradient of ``optimizer``'s parameters by its mean over the ranks (one all-reduce)."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of one per tensor
        self._collective("averaging gradients", lambda: torch.distributed.all_reduce(flat))
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def average_values(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each float over the ranks (a NaN on any rank makes it NaN everywhere)."""
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        data = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        self._collective("averaging the losses", lambda: torch.distributed.all_reduce(data))
        return dict(zip(values, (data / self.world_size).tolist()))

    def gather_rows(self, x: Tensor) -> Tensor:
        """[b, ...] on each rank -> [world_size * b, ...], rank by rank; gradients flow back to each rank's rows."""
        return self._collective("gathering InfoNCE rows", lambda: _GatherRows.apply(x, self.rank, self.world_size))

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        data = torch.tensor([float(flag)], device=device)
        self._collective("sharing the stop flag", lambda: torch.distributed.all_reduce(data))
        return bool(data.item() > 0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        self._collective("waiting for the other processes", torch.distributed.barrier)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 that carries gradients.

    Every rank computes the same loss on the gathered rows, so the gradient of
    this rank's rows is the sum of what every rank's backward sends them (an
    all-reduce); averaging the parameter gradients over the ranks afterwards
    leaves exactly the one-process gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


# --------------------------------------------------------------------------- process group


def from_environment(device: torch.device, *, timeout_s: float | None = None) -> Distributed | None:
    """The run's ``Distributed`` when launched by torchrun with WORLD_SIZE > 1, else None.

    device: the requested device; "cuda" becomes cuda:LOCAL_RANK. Initialises the
    default process group (NCCL for CUDA, gloo for the CPU) unless it already is.
    timeout_s: how long a rank waits on the others (default: $HELPERS_DIST_TIMEOUT_S or 600).
    """
    world_size = world_size_from_env()
    if world_size <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start distributed training with "
            "torchrun (torchrun --nproc_per_node=N -m helpers train ...), or unset WORLD_SIZE"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"rank {rank} wants GPU {device.index} but this machine has {torch.cuda.device_count()}: "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return Distributed(
        rank=rank, local_rank=local_rank, world_size=world_size, device=device,
        backend=torch.distributed.get_backend(), timeout_s=timeout_s,
    )


def shutdown() -> None:
    """Destroy the default process group if one is up (end of a torchrun worker)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def show_log_messages() -> None:
    """Print this module's INFO messages (the effective batch line) on stderr; the train CLI calls it."""
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # torchrun's own logging setup would print the line a second time
