"""Training the toy-face attribute classifier from scratch (a maintainer tool).

``python -m helpers train-classifier --seed 0`` reproduces the shipped weights
(``assets/attribute_classifier.pt``, read by ``helpers.attributes.load_attribute_classifier``):
it draws 12,000 fresh toy faces, trains from scratch on one CPU thread in about three minutes
(the same seed, torch build and thread count give the same weights), measures accuracy on 2,000
held-out faces at 64, 128 and 256 px, and stores that table in the file (``report``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..attributes import (
    DEFAULT_PATH,
    INPUT_SIZE,
    AttributeClassifier,
    attribute_accuracy,
    save_attribute_classifier,
    to_tensor,
)
from ..config import stage_resolutions
from ..toyfaces import TOY_ATTRIBUTES, toy_face

TRAIN_SEED_OFFSET = 10_000  # toy faces for training come from toy seed 10_000 + seed ...
HELDOUT_SEED_OFFSET = 20_000  # ... and held-out ones from 20_000 + seed (never the dataset's seed 0)
RESOLUTIONS = tuple(stage_resolutions())  # every stage's size: 64, 128, 256 px


def toyface_arrays(n: int, *, seed: int, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` toy faces of toy seed ``seed`` box-downsampled to ``size`` px:
    (uint8 [n, size, size, 3], bool [n, len(TOY_ATTRIBUTES)])."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, len(TOY_ATTRIBUTES)), dtype=bool)
    for i in range(n):
        image, attributes, _ = toy_face(seed, i)
        if size != image.width:
            image = image.reduce(image.width // size) if image.width % size == 0 else image.resize((size, size))
        images[i] = np.asarray(image)
        labels[i] = [attributes[a] for a in TOY_ATTRIBUTES]
    return images, labels


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mild degradations a generator's images show: blur, noise, a small shift."""
    B = x.shape[0]
    blur = torch.nonzero(torch.rand(B, generator=generator) < 0.3).flatten()
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    x = x.clone()
    x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = torch.rand(B, 1, 1, 1, generator=generator) * 0.08
    x = x + sigma * torch.randn(x.shape, generator=generator)
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(-1, 1)


def evaluate_resolutions(
    classifier: AttributeClassifier, *, n: int, seed: int, on_progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Accuracy on ``n`` held-out faces (toy seed ``HELDOUT_SEED_OFFSET + seed``) at every stage's
    size: the image as drawn (256 px), half that by 2x2 box averaging (128), smaller sizes by
    Lanczos resizing (64: a filter the model's area downsampling never saw). Returns
    {resolution: attribute_accuracy dict}."""
    from PIL import Image

    arrays: dict[int, list[np.ndarray]] = {r: [] for r in RESOLUTIONS}
    labels = []
    for i in range(n):
        image, attributes, _ = toy_face(HELDOUT_SEED_OFFSET + seed, i)
        for r in RESOLUTIONS:
            shown = image if r == image.width else image.reduce(2) if 2 * r == image.width else (
                image.resize((r, r), Image.LANCZOS))
            arrays[r].append(np.asarray(shown))
        labels.append([attributes[a] for a in TOY_ATTRIBUTES])
        if on_progress is not None:
            on_progress(i + 1, n)
    wanted = torch.tensor(labels)
    return {r: attribute_accuracy(to_tensor(np.stack(arrays[r])), wanted, classifier=classifier) for r in RESOLUTIONS}


def train_attribute_classifier(
    *,
    seed: int = 0,
    n_train: int = 12_000,
    n_heldout: int = 2_000,
    epochs: int = 10,
    batch_size: int = 64,
    width: int = 16,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Train a classifier from scratch on freshly drawn toy faces; deterministic for ``seed``.

    Draws ``n_train`` faces (toy seed ``TRAIN_SEED_OFFSET + seed``) at 64 px, trains with AdamW
    and a one-cycle schedule, then measures accuracy on ``n_heldout`` other faces at 64/128/256
    px. ``on_log(dict)`` gets the mean loss of every epoch; ``on_progress(stage, done, total)``
    reports drawing and evaluation. Returns (model in eval mode on the CPU, report).
    """
    torch.manual_seed(seed)
    images, labels = toyface_arrays(n_train, seed=TRAIN_SEED_OFFSET + seed)
    if on_progress is not None:
        on_progress("draw", n_train, n_train)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels).float()
    model = AttributeClassifier(len(TOY_ATTRIBUTES), width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (n_train + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=generator)
        total = 0.0
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            logits = model(_augment(x_all[idx], generator))
            loss = F.binary_cross_entropy_with_logits(logits, y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if on_log is not None:
            on_log({"epoch": epoch + 1, "loss": total / n_train})
    model.eval().requires_grad_(False)
    progress = (lambda done, total: on_progress("evaluate", done, total)) if on_progress is not None else None
    accuracy = evaluate_resolutions(model, n=n_heldout, seed=seed, on_progress=progress)
    report = {
        "seed": seed, "n_train": n_train, "n_heldout": n_heldout, "epochs": epochs, "batch_size": batch_size,
        "accuracy": {str(r): acc["per_attribute"] for r, acc in accuracy.items()},
        "mean": {str(r): acc["mean"] for r, acc in accuracy.items()},
    }
    return model, report


def format_report(report: dict[str, Any]) -> str:
    """The per-attribute accuracy table (percent) of a training report, as Markdown."""
    cols = [str(r) for r in RESOLUTIONS]
    lines = ["| attribute | " + " | ".join(f"{c} px" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in TOY_ATTRIBUTES:
        lines.append(f"| {name} | " + " | ".join(f"{100 * report['accuracy'][c][name]:.2f}" for c in cols) + " |")
    lines.append("| **mean** | " + " | ".join(f"{100 * report['mean'][c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


# command line: python -m helpers train-classifier [--seed S] [--out PATH]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0: the shipped weights)")
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="weights file (default assets/attribute_classifier.pt)")
    parser.add_argument("--n-train", type=int, default=12_000, help="toy faces to train on")
    parser.add_argument("--n-heldout", type=int, default=2_000, help="held-out toy faces to measure on")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training faces")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1: the shipped weights were trained so, and one thread is quick on a busy CPU)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"drawing {args.n_train} toy faces and training for {args.epochs} epochs (CPU, a few minutes) ...")
    model, report = train_attribute_classifier(
        seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout, epochs=args.epochs,
        on_log=lambda log: tqdm.write(f"epoch {log['epoch']}: loss {log['loss']:.4f}"),
    )
    path = save_attribute_classifier(model, args.out, report=report)
    print(format_report(report))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s")
    return 0
