"""Shared test settings: CPU only, offline, small thread pools, headless plots."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the network

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_clip():
    """A small random CLIP built from open_clip classes (offline, seeded)."""
    from helpers.clip_encoder import load_clip

    return load_clip("tiny-random", device="cpu")


def write_synthetic_features(path, *, n: int = 12, dim: int = 32, captions_per_image: int = 3, seed: int = 0):
    """A small features file of random images and random normalised features.

    Images are smooth colour gradients (so downsampling is meaningful), split
    3:1 into train/test; the CLIP spec is ``tiny-random`` (dim 32).
    """
    import numpy as np
    import torch.nn.functional as F

    from helpers.features import write_features

    g = torch.Generator().manual_seed(seed)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    colours = torch.rand(n, 3, generator=g).numpy()
    images = (colours[:, None, None, :] * (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 * 255)
    images = images.astype(np.uint8)
    k = captions_per_image
    return write_features(
        path,
        images=images,
        image_features=F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        text_features=F.normalize(torch.randn(n, k, dim, generator=g), dim=-1),
        caption_counts=torch.full((n,), k),
        captions=[[f"caption {j} of image {i}" for j in range(k)] for i in range(n)],
        ids=[f"img{i:03d}" for i in range(n)],
        split=["test" if i % 4 == 3 else "train" for i in range(n)],
        meta=dict(clip_spec="tiny-random", source="synthetic"),
    )


@pytest.fixture
def synthetic_features(tmp_path):
    """Path of a 12-image synthetic features file (9 train, 3 test, dim 32, tiny-random CLIP)."""
    return write_synthetic_features(tmp_path / "features.pt")


@pytest.fixture
def toy_features(synthetic_features):
    """The synthetic features file dressed up as toy faces: random toy attributes per image."""
    from helpers.files import atomic_save
    from helpers.toyfaces import TOY_ATTRIBUTES

    data = torch.load(synthetic_features, weights_only=False)
    g = torch.Generator().manual_seed(0)
    values = torch.rand(len(data["ids"]), len(TOY_ATTRIBUTES), generator=g) < 0.5
    data["attributes"] = dict(names=list(TOY_ATTRIBUTES), values=values)
    data["meta"]["source_kind"] = "toyfaces"
    atomic_save(data, synthetic_features)
    return synthetic_features


@pytest.fixture
def seed_recorder(tmp_path, monkeypatch):
    """A tiny one-stage generator saved for the ``tiny-random`` CLIP, and the seed lists it is asked to
    draw with: returns ``(path, calls)``, ``calls`` one list per ``sample.generate_from_features`` call."""
    import helpers.sample
    from helpers.checkpoint import save_generator
    from helpers.config import ModelConfig
    from helpers.network import build_models

    G, _ = build_models(ModelConfig(text_dim=32, z_dim=8, cond_dim=8, ng=64, nd=4, num_stages=1), seed=0)
    path = save_generator(tmp_path / "g.pt", G, clip_spec="tiny-random")
    calls: list[list[int]] = []
    real_generate = helpers.sample.generate_from_features

    def recording(model, text_features, seeds, **kwargs):
        calls.append(list(seeds))
        return real_generate(model, text_features, seeds, **kwargs)

    monkeypatch.setattr(helpers.sample, "generate_from_features", recording)
    return path, calls
