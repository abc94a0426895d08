"""The features file: CLIP features, captions and 256 px images of a dataset, and the
training Dataset over it.

A features file ``NAME.pt`` (a ``torch.save`` dict) has a sibling ``NAME.images.npy``
holding every image once, center-cropped and resized to 256 px, as uint8
``[N, 256, 256, 3]``. The array is memory-mapped when read, so a dataset of
30,000 images opens in a second and no image is decoded during training.

``NAME.pt`` holds:

- ``format``: ``FEATURES_FORMAT``; ``meta``: a dict (``clip_spec``, ``dim``,
  ``image_size``, preprocessing, source, counts, ...);
- ``ids``: N source ids; ``split``: N strings, ``"train"`` or ``"test"``;
- ``captions``: N lists of caption strings (possibly empty: language-free data);
- ``image_features``: [N, D] fp16, L2-normalised CLIP image features;
- ``text_features``: [N, K, D] fp16, L2-normalised, K = the most captions per image;
  ``caption_counts``: [N] int, how many of the K rows are real captions;
- ``attributes`` (optional, when the source has them): ``dict(names=list of A str,
  values=bool [N, A])``, e.g. CelebA's 40 attributes or the toy faces' drawn ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .config import MAX_STAGES, STORED_IMAGE_SIZE, check_num_stages, stage_resolutions
from .errors import UserError
from .files import atomic_save, atomic_write
from .pictures import dequantize

FEATURES_FORMAT = "helpers-t2i-features/1"
IMAGE_SIZE = STORED_IMAGE_SIZE  # every stored image is square RGB at the last stage's size (256 px)
SPLITS = ("train", "test", "all")


def images_path(path: str | os.PathLike) -> Path:
    """Where the uint8 image array of the features file ``path`` lives."""
    path = Path(path)
    return path.with_name(path.stem + ".images.npy")


def write_features(
    path: str | os.PathLike,
    *,
    images: np.ndarray,
    image_features: Tensor,
    text_features: Tensor,
    caption_counts: Tensor,
    captions: list[list[str]],
    ids: list[str],
    split: list[str],
    meta: dict[str, Any],
    attributes: dict[str, Any] | None = None,
) -> Path:
    """Write a features file and its image array, each atomically (image array first).

    images: uint8 [N, 256, 256, 3]; image_features: [N, D]; text_features: [N, K, D];
    caption_counts: [N] in [0, K]; captions, ids, split: N entries each;
    attributes: optional ``dict(names=A names, values=bool [N, A])``.
    """
    path = Path(path)
    n = len(ids)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or len(images) != n:
        raise ValueError(f"images must be uint8 [{n}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {images.dtype} {images.shape}")
    if image_features.shape[0] != n or text_features.shape[0] != n or len(captions) != n or len(split) != n:
        raise ValueError("image_features, text_features, captions and split must have one entry per id")
    if bad := sorted(set(split) - {"train", "test"}):
        raise ValueError(f"split entries must be 'train' or 'test', got {bad}")
    extra = {}
    if attributes is not None:
        names, values = list(attributes["names"]), torch.as_tensor(attributes["values"]).to(torch.bool).cpu()
        if values.shape != (n, len(names)):
            raise ValueError(f"attribute values must be bool [{n}, {len(names)}], got {tuple(values.shape)}")
        extra["attributes"] = dict(names=names, values=values)
    atomic_write(images_path(path), lambda f: np.save(f, np.ascontiguousarray(images)))
    return atomic_save(
        dict(
            format=FEATURES_FORMAT,
            meta=dict(meta, num_images=n, dim=int(image_features.shape[1]), image_size=IMAGE_SIZE),
            ids=list(ids),
            split=list(split),
            captions=[list(c) for c in captions],
            image_features=image_features.to(torch.float16).cpu(),
            text_features=text_features.to(torch.float16).cpu(),
            caption_counts=torch.as_tensor(caption_counts, dtype=torch.long).cpu(),
            **extra,
        ),
        path,
    )


def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """Load a features file (without its images); clear errors for a wrong or missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path} (run `python -m helpers extract` first)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(
            f"cannot read features file {path}: it is truncated or damaged ({type(err).__name__}: {err}); "
            "copy it again or extract it again"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{path} is not a features file of this project (expected format {FEATURES_FORMAT!r})")
    check_images_file(path, len(data["ids"]))
    return data


def check_images_file(path: str | os.PathLike, n: int) -> None:
    """Check that the image array beside features file ``path`` is whole: uint8 [n, 256, 256, 3].

    Reads only the header and the file size, so it costs nothing on a large dataset.
    """
    array_path = images_path(path)
    if not array_path.is_file():
        raise FileNotFoundError(f"image array {array_path} is missing: it must sit beside {Path(path).name}")
    expected = (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    try:
        with open(array_path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)  # the header only
            header_end = f.tell()
        size = array_path.stat().st_size
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image array {array_path}: it is truncated or damaged ({err}); "
                        "copy it again or extract again") from err
    if tuple(shape) != expected or dtype != np.uint8:
        raise UserError(f"image array {array_path} holds {dtype} {tuple(shape)}, the features file expects uint8 "
                        f"{expected}: they do not belong together; extract again")
    if size < header_end + int(np.prod(expected)):
        raise UserError(
            f"image array {array_path} is truncated: {size:,} bytes of {header_end + int(np.prod(expected)):,} "
            "(an interrupted copy?); copy it again or extract again"
        )


def downsample(image: Tensor, size: int) -> Tensor:
    """Area-downsample [..., 3, H, W] to [..., 3, size, size] (H a multiple of size)."""
    if image.shape[-1] == size:
        return image
    squeeze = image.ndim == 3
    out = F.avg_pool2d(image[None] if squeeze else image, kernel_size=image.shape[-1] // size)
    return out[0] if squeeze else out


class FeaturesDataset(Dataset):
    """Training examples from a features file.

    Item ``i`` is a dict:

    - ``images``: list of ``num_stages`` tensors [3, 64 * 2**s, 64 * 2**s] in [-1, 1]: the
      stored 256 px image area-downsampled to 64 and 128 px (never upsampled);
    - ``image_feature``: [D] fp32, L2-normalised CLIP image feature;
    - ``text_feature``: [D] one of the image's captions, chosen at random;
    - ``mismatched_text_feature``: [D] a caption of another image (a negative for D);
    - ``index``: int, the row in the features file.

    Images without captions (language-free data) use their image feature as
    ``text_feature``; training may then replace it by a pseudo text feature.
    Randomness comes from torch's global generator (seeded per DataLoader worker).
    """

    def __init__(self, path: str | os.PathLike, *, split: str = "train", num_stages: int = MAX_STAGES) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check_num_stages(num_stages)
        data = read_features(path)
        self.path = Path(path)
        self.meta: dict[str, Any] = data["meta"]
        self.num_stages = num_stages
        rows = [i for i, s in enumerate(data["split"]) if split == "all" or s == split]
        if not rows:
            raise ValueError(f"{path} has no images in split {split!r}")
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.ids = [data["ids"][i] for i in rows]
        self.captions = [data["captions"][i] for i in rows]
        self.image_features = data["image_features"][self.rows].float()
        self.text_features = data["text_features"][self.rows].float()
        self.caption_counts = data["caption_counts"][self.rows]
        attrs = data.get("attributes")
        # the source's attributes of these rows, bool [n, A], or None: they weight balanced sampling
        self.attributes: Tensor | None = (torch.as_tensor(attrs["values"], dtype=torch.bool)[self.rows]
                                          if attrs is not None else None)
        self._images_file = images_path(path)
        self._images: np.ndarray | None = None  # opened lazily: each DataLoader worker maps its own

    @property
    def dim(self) -> int:
        return int(self.image_features.shape[1])

    @property
    def clip_spec(self) -> str:
        return str(self.meta.get("clip_spec", ""))

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> Tensor:
        """The stored image of item ``i``: [3, 256, 256] in [-1, 1]."""
        if self._images is None:
            self._images = np.load(self._images_file, mmap_mode="r")
        pixels = torch.from_numpy(np.array(self._images[int(self.rows[i])]))  # [256, 256, 3] uint8
        return dequantize(pixels, channels_last=True)

    def caption_feature(self, i: int) -> Tensor:
        """A random caption feature of item ``i`` [D] (the image feature if it has no caption)."""
        count = int(self.caption_counts[i])
        if count == 0:
            return self.image_features[i]
        return self.text_features[i, int(torch.randint(count, ()))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        full = self.image(i)
        images = [downsample(full, size) for size in stage_resolutions(self.num_stages)]
        other = i
        if len(self) > 1:
            other = (i + 1 + int(torch.randint(len(self) - 1, ()))) % len(self)  # any item but i
        return dict(
            images=images,
            image_feature=self.image_features[i],
            text_feature=self.caption_feature(i),
            mismatched_text_feature=self.caption_feature(other),
            index=i,
        )
