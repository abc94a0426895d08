"""Image metrics as pure functions: FID, KID, CLIP score and R-precision.

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) through torchmetrics,
  on the features of a feature extractor. The standard extractor is Inception-v3's
  2048-d pool features with the original TF-FID weights (``inception-v3-compat``
  from torch-fidelity, downloaded once on first use); offline runs and tests use a
  stand-in (``RandomConvFeatures`` or ``ClipImageFeatures``). Numbers computed
  with different extractors, image counts or resolutions are not comparable.
- CLIP score (Hessel et al. 2021): ``100 * max(cos(image, text), 0)`` per pair.
- R-precision (Xu et al. 2018, AttnGAN): for each generated image, rank its own
  caption among ``candidates`` captions (1 true + mismatched ones from other
  images) by CLIP similarity; the top-1 rate.

Every extractor takes uint8 images ``[B, 3, H, W]`` in 0..255 (the images are
quantised the way a saved PNG would be) and returns ``[B, num_features]``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pictures import quantize as to_uint8  # noqa: F401  (re-exported: the earlier name of the pixel rounding)

INCEPTION_NAME = "inception-v3-compat pool3 (2048-d, torch-fidelity TF-FID weights)"
KID_SUBSET_SIZE = 1000  # the usual KID subset size; smaller sets use every image per subset
KID_SUBSETS = 100


class RandomConvFeatures(nn.Module):
    """An offline stand-in for Inception: a fixed, seeded random conv net.

    uint8 [B, 3, H, W] -> [B, num_features] (per-channel mean and std of the last
    feature map, so both colour statistics and texture/noise register). Only
    differences within one extractor mean anything; never compare its FID with
    an Inception FID.
    """

    def __init__(self, *, num_features: int = 64, image_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError(f"num_features must be even (means and stds), got {num_features}")
        channels = num_features // 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, channels, 3, stride=2, padding=1), nn.ReLU(),
            )
            for layer in self.net:
                if isinstance(layer, nn.Conv2d):  # He init keeps features near unit scale
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.normal_(layer.bias, std=0.1)
        self.net.eval().requires_grad_(False)
        self.num_features = num_features
        self.image_size = image_size
        self.name = f"random-conv (seeded stand-in, {num_features}-d, {image_size} px)"

    def train(self, mode: bool = True) -> "RandomConvFeatures":
        return super().train(False)  # a fixed extractor: never in training mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        f = self.net(x * 2 - 1)  # (B, C, h, w)
        return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings as FID features: uint8 [B, 3, H, W] -> [B, clip.dim] (L2-normalised).

    ``clip`` is a ``helpers.clip_encoder.ClipEncoder`` (or anything with
    ``encode_images``, ``dim`` and ``spec``).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.dim)
        self.name = f"clip image encoder ({clip.spec}, {clip.dim}-d)"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_images(images).float()


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features, the standard FID extractor: uint8 [B, 3, H, W] -> [B, 2048].

    torchmetrics' ``NoTrainInceptionV3`` with torch-fidelity's port of the TF-FID
    weights (downloaded on first use, about 100 MB); images are resized to 299 px
    inside. Raises RuntimeError with advice when the weights cannot be fetched.
    """

    def __init__(self, *, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
            )
        except Exception as err:  # no network, a proxy, a broken cache file
            raise RuntimeError(
                f"cannot load the Inception-v3 FID weights ({type(err).__name__}: {err}). They are downloaded "
                "once from torch-fidelity's GitHub release; connect to the internet, pass a local weights file, "
                "or choose another feature extractor (e.g. --feature-extractor clip)."
            ) from err
        self.num_features = 2048
        self.name = INCEPTION_NAME

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception features take uint8 images in 0..255, got {images.dtype}")
        return self.inception(images)


class _Precomputed(nn.Module):
    """Features in, features out: lets torchmetrics reuse features extracted once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def extract_features(images: Tensor, extractor: nn.Module, *, batch_size: int = 64) -> Tensor:
    """uint8 images [N, 3, H, W] -> features [N, F] fp64 on the CPU, ``batch_size`` at a time."""
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    out = [extractor(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def frechet_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """FID between two feature sets [N, F] and [M, F] (N, M >= 2), computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real_features) < 2 or len(fake_features) < 2:
        raise ValueError(
            f"FID needs at least 2 real and 2 generated images, got {len(real_features)} and {len(fake_features)}"
        )
    dim = real_features.shape[1]
    metric = FrechetInceptionDistance(feature=_Precomputed(dim))
    metric.update(real_features.double().cpu(), real=True)
    metric.update(fake_features.double().cpu(), real=False)
    return max(float(metric.compute()), 0.0)  # rounding can leave a tiny negative for identical sets


def kernel_inception_distance(
    real_features: Tensor,
    fake_features: Tensor,
    *,
    subset_size: int = KID_SUBSET_SIZE,
    subsets: int = KID_SUBSETS,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over random subsets) between feature sets [N, F] and [M, F], by torchmetrics.

    ``subset_size`` is capped at the smaller set size. The subsets are drawn from a
    generator seeded with ``seed``, so the result is deterministic.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real_features), len(fake_features))
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 real and 2 generated images, got {len(real_features)} and {len(fake_features)}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real_features.shape[1]), subset_size=size, subsets=subsets
        )
    metric.update(real_features.double().cpu(), real=True)
    metric.update(fake_features.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets with the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def clip_scores(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)``: image_emb [N, D], text_emb [N, D] -> [N].

    Embeddings need not be normalised (they are normalised here).
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings must pair up, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """Mean CLIP score over N pairs (see ``clip_scores``)."""
    return float(clip_scores(image_emb, text_emb).mean())


def r_precision_candidates(groups: Tensor, *, candidates: int = 100) -> int:
    """How many captions each image is ranked among: ``candidates``, or fewer for small sets.

    groups: [N] source ids; each image needs ``candidates - 1`` captions of other
    sources, so the count is capped at ``1 + min_i #(rows of another source)``.
    """
    groups = torch.as_tensor(groups)
    _, counts = torch.unique(groups, return_counts=True)
    others = len(groups) - int(counts.max())
    return max(1, min(candidates, 1 + others))


@torch.no_grad()
def r_precision(
    image_emb: Tensor,
    text_emb: Tensor,
    *,
    groups: Tensor | None = None,
    candidates: int = 100,
    seed: int = 0,
    chunk_size: int = 256,
) -> float:
    """Top-1 R-precision: how often an image's own caption ranks first among ``candidates``.

    image_emb: [N, D] CLIP image embeddings; text_emb: [N, D] CLIP embeddings of the
    caption each image was generated from (row i belongs to image i). For image i,
    ``candidates - 1`` mismatched captions are drawn without replacement from the rows
    j whose ``groups[j] != groups[i]`` (default: every other row; pass the source
    image id so that captions of the same source image are never mismatches). The
    count is capped by ``r_precision_candidates``. Ties with the true caption (the
    same sentence under another image) count as a fractional hit 1 / (1 + ties).
    Deterministic for a ``seed``. Returns a rate in [0, 1]; chance is 1 / candidates.
    """
    n = len(image_emb)
    if text_emb.shape[0] != n:
        raise ValueError(f"need one caption embedding per image, got {n} images and {text_emb.shape[0]} captions")
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups).cpu()
    k = r_precision_candidates(groups, candidates=candidates) - 1  # mismatched captions per image
    image_emb = F.normalize(image_emb.float().cpu(), dim=-1)
    text_emb = F.normalize(text_emb.float().cpu(), dim=-1)
    true_sim = (image_emb * text_emb).sum(-1)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    hits = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        # a random key per (image, caption); the k smallest keys among other sources are the mismatches
        keys = torch.rand(rows.stop - start, n, generator=gen)
        keys[groups[rows, None] == groups[None, :]] = math.inf
        mismatched = keys.topk(k, dim=1, largest=False).indices  # (b, k)
        sims = torch.einsum("bd,bkd->bk", image_emb[rows], text_emb[mismatched])
        true = true_sim[rows, None]
        better = (sims > true).any(dim=1)
        ties = (sims == true).sum(dim=1)
        hits[rows] = torch.where(better, 0.0, 1.0 / (1.0 + ties.double()))
    return float(hits.mean())
