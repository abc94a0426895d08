"""The toy-face attribute classifier: the yardstick for "does the image show what was asked?".

A small CNN, multi-label over ``TOY_ATTRIBUTES``, trained on drawn toy faces
(``helpers.toyfaces``). It takes images at 64, 128 or 256 px (any size, really: inputs are
area-downsampled to 64 px inside the model) in [-1, 1] and returns one logit per attribute.
``attribute_accuracy`` compares its verdicts with the attributes a batch of images was asked for;
the demo and the evaluation report that number as prompt faithfulness.

The shipped weights (``assets/attribute_classifier.pt``, fp16, about 0.4 MB) are reproduced by
``python -m helpers train-classifier --seed 0`` (the maintainer tool ``helpers.tools.train_classifier``),
which also stores its held-out accuracy table in the file (``report``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assets import ATTRIBUTE_CLASSIFIER
from .captions import CELEBA_ATTRIBUTES
from .checkpoint import CheckpointError, load_checkpoint
from .files import atomic_save
from .pictures import dequantize
from .toyfaces import TOY_ATTRIBUTES

DEFAULT_PATH = ATTRIBUTE_CLASSIFIER  # the shipped weights (assets/attribute_classifier.pt)
CLASSIFIER_KIND = "toy-attribute-classifier/1"
CLASSIFIER_FORMAT = "helpers-t2i-gan/1"  # the classifier file's own layout tag (not the GAN checkpoints')
INPUT_SIZE = 64  # every input is area-downsampled to this size first


class AttributeClassifier(nn.Module):
    """Four conv blocks (64 -> 4 px) and a linear head over the 4x4 map, so that where a feature
    is (hair above the eyes, a beard below the mouth) stays known to the head."""

    def __init__(self, num_attributes: int = len(TOY_ATTRIBUTES), *, width: int = 16) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            # stride-2 convs: a quarter of the work of conv + max-pool, so CPU training is quick
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels[-1] * 16, num_attributes))

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] (H = W, typically 64, 128 or 256) -> logits [B, A]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        return self.head(self.features(x))


_CACHE: dict[tuple[str, str], AttributeClassifier] = {}


def load_attribute_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> AttributeClassifier:
    """The classifier stored at ``path`` (default ``assets/attribute_classifier.pt``), in eval
    mode with frozen weights, on ``device`` (default CPU). Loaded once per (path, device)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    device = torch.device(device if device is not None else "cpu")
    key = (str(path.resolve()), str(device))
    if key not in _CACHE:
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != CLASSIFIER_KIND:
            raise CheckpointError(
                f"{path} is not an attribute classifier (kind {ckpt.get('kind')!r}); pass the file written "
                "by `python -m helpers train-classifier`"
            )
        model = AttributeClassifier(len(ckpt["attributes"]), width=ckpt["width"])
        model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
        model.attributes = tuple(ckpt["attributes"])
        model.eval().requires_grad_(False)
        _CACHE[key] = model.to(device)
    return _CACHE[key]


def save_attribute_classifier(model: AttributeClassifier, path: str | os.PathLike, *, report: dict[str, Any]) -> Path:
    """Write the classifier (fp16 weights, attribute names, width, training report) atomically."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return atomic_save(
        {
            "format": CLASSIFIER_FORMAT, "kind": CLASSIFIER_KIND, "attributes": list(TOY_ATTRIBUTES),
            "width": model.features[0].out_channels, "state_dict": state, "report": report,
        },
        path,
    )


def attributes_tensor(wanted: Sequence[Mapping[str, bool] | Iterable[str]] | Tensor) -> Tensor:
    """Wanted attributes -> bool [B, len(TOY_ATTRIBUTES)].

    Each item is a mapping name -> bool or an iterable of present names; toy attributes that an
    item does not name count as absent, CelebA attributes that toy faces do not draw are ignored.
    A bool/0-1 tensor [B, A] passes through."""
    if isinstance(wanted, Tensor):
        if wanted.ndim != 2 or wanted.shape[1] != len(TOY_ATTRIBUTES):
            raise ValueError(f"wanted must be [B, {len(TOY_ATTRIBUTES)}] (TOY_ATTRIBUTES order), got {tuple(wanted.shape)}")
        return wanted.bool()
    rows = []
    for item in wanted:
        if isinstance(item, str):
            raise TypeError(f"each wanted item must be a mapping or a list of names, not the string {item!r}")
        present = {k for k, v in item.items() if v} if isinstance(item, Mapping) else set(item)
        names = set(item) if isinstance(item, Mapping) else present
        unknown = sorted(names - set(CELEBA_ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown attribute names {unknown}; use names from helpers.toyfaces.TOY_ATTRIBUTES")
        rows.append([name in present for name in TOY_ATTRIBUTES])
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, len(TOY_ATTRIBUTES))


@torch.no_grad()
def predict_attributes(images: Tensor, *, classifier: AttributeClassifier | None = None, batch_size: int = 256) -> Tensor:
    """images [B, 3, H, W] in [-1, 1] -> bool [B, len(TOY_ATTRIBUTES)], the classifier's verdicts."""
    classifier = classifier if classifier is not None else load_attribute_classifier(device=images.device)
    classifier.eval()
    device = next(classifier.parameters()).device
    out = [classifier(images[i : i + batch_size].to(device)) > 0 for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0, len(TOY_ATTRIBUTES), dtype=torch.bool)


def attribute_accuracy(
    images: Tensor,
    wanted: Sequence[Mapping[str, bool] | Iterable[str]] | Tensor,
    *,
    classifier: AttributeClassifier | None = None,
) -> dict[str, Any]:
    """How often the images show what was asked, attribute by attribute.

    images: [B, 3, H, W] in [-1, 1] (64, 128 or 256 px); wanted: B attribute sets (see
    ``attributes_tensor``) or a bool tensor [B, len(TOY_ATTRIBUTES)]. Returns
    ``{"per_attribute": {name: accuracy in [0, 1]}, "mean": mean of those, "n": B,
    "recall": {name: share of the images asked for the attribute that show it, or None}}``.
    Accuracy counts a correct "no" as much as a correct "yes", so a rare attribute that is never
    drawn still scores high; recall shows whether it is drawn when asked for.
    """
    target = attributes_tensor(wanted)
    if target.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {target.shape[0]} wanted attribute sets")
    if images.shape[0] == 0:
        raise ValueError("attribute_accuracy needs at least one image")
    predicted = predict_attributes(images, classifier=classifier)
    per_attribute = (predicted == target).float().mean(0)
    asked = target.sum(0)
    shown = (predicted & target).sum(0)
    return {
        "per_attribute": {name: float(acc) for name, acc in zip(TOY_ATTRIBUTES, per_attribute)},
        "mean": float(per_attribute.mean()),
        "n": int(images.shape[0]),
        "recall": {name: float(s / a) if a else None for name, s, a in zip(TOY_ATTRIBUTES, shown, asked)},
    }


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return dequantize(images, channels_last=True)


def __getattr__(name: str) -> Any:
    """The classifier's training moved to ``helpers.tools.train_classifier``; its names stay importable here."""
    if name in ("train_attribute_classifier", "evaluate_resolutions", "format_report", "toyface_arrays"):
        from .tools import train_classifier

        return getattr(train_classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
