"""The order a training run sees its data: batches of (index, item seed) for each step.

The dataset picks captions and mismatched captions at random; seeding each item
by its position in the run (``SeededItems``) and drawing each epoch's order from
the run's seed (``RunBatches``) makes the data stream independent of worker
processes, identical after a resume, and split exactly between torchrun's
processes. With ``balance_weights`` an epoch draws its images with replacement,
in proportion to their weights, so that images with rare attributes come more
often (the order is just as seeded).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .errors import UserError


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


def balance_weights(attributes: Tensor, power: float) -> Tensor:
    """Sampling weights that favour images with rare attributes: bool [N, A] -> float [N] (mean 1).

    Each image weighs ``(1 / f) ** power`` for the rarest attribute it has, ``f``
    being that attribute's frequency among the N images (an image with none
    weighs 1). ``power`` 0 gives uniform weights; 0.5 is square-root balancing
    (Mahajan et al. 2018), which raises rare attributes without repeating a few
    images as often as full inverse-frequency weights (1) would.
    """
    if attributes.ndim != 2 or len(attributes) == 0:
        raise ValueError(f"attributes must be bool [N, A] with N >= 1, got shape {list(attributes.shape)}")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    present = attributes.bool()
    freq = present.float().mean(0).clamp_min(1.0 / len(present))  # [A]
    rarity = torch.where(present, (1.0 / freq) ** power, torch.ones(()))  # [N, A]
    weights = rarity.amax(dim=1) if present.shape[1] else torch.ones(len(present))
    return weights / weights.mean()


class RunBatches(Sampler):
    """Batches of ``(index, item_seed)`` for steps ``start_step`` .. ``total_steps - 1`` of a run.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; the last partial
    batch of an epoch is dropped (G's BatchNorm1d cannot take a batch of one,
    and every step then has the same batch size). ``rank`` / ``world_size``
    split each global batch between processes for distributed training.
    ``weights`` [n] (``balance_weights``): each epoch's n images are drawn with
    replacement in proportion to them instead of a permutation.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, start_step: int, total_steps: int, rank: int = 0, world_size: int = 1,
        weights: Tensor | None = None,
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
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"weights must have shape [{n}], got {list(weights.shape)}")
        self.weights = weights

    def epoch_order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(permutation [n], item seeds [n]) of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights.double(), self.n, replacement=True, generator=g)
        return order, torch.randint(0, 2**62, (self.n,), generator=g)

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
