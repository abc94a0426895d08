"""Metrics on known inputs: FID/KID with a stand-in extractor, CLIP score, R-precision."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import metrics
from helpers.metrics import (
    ClipImageFeatures,
    RandomConvFeatures,
    clip_score,
    clip_scores,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    r_precision,
    r_precision_candidates,
)
from helpers.pictures import quantize


def smooth_images(n: int, *, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n smooth random images [n, 3, size, size] in [-1, 1] (upsampled 4x4 colour fields)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def add_noise(images: torch.Tensor, sigma: float, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def extractor():
    return RandomConvFeatures(num_features=32, image_size=32)


def features_of(images, extractor):
    return extract_features(quantize(images), extractor, batch_size=32)


def test_quantize_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert quantize(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255] and quantize(x).dtype == torch.uint8


def test_random_conv_extractor_is_fixed_and_shaped(extractor):
    images = quantize(smooth_images(3))
    a = extractor(images)
    b = RandomConvFeatures(num_features=32, image_size=32)(images)
    assert a.shape == (3, 32) and torch.equal(a, b)
    assert not extractor.train().training


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(extractor):
    real = smooth_images(64)
    f_real = features_of(real, extractor)
    assert frechet_distance(f_real, f_real) == pytest.approx(0.0, abs=1e-6)
    fids = [frechet_distance(f_real, features_of(add_noise(real, s), extractor)) for s in (0.05, 0.2, 0.5)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_fid_matches_the_closed_form():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy_linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_is_near_zero_for_the_same_set_grows_with_noise_and_is_seeded(extractor):
    real = smooth_images(48)
    f_real = features_of(real, extractor)
    same, _ = kernel_inception_distance(f_real, f_real, subsets=10)
    noisy = [kernel_inception_distance(f_real, features_of(add_noise(real, s), extractor), subsets=10)[0]
             for s in (0.3, 0.8)]
    assert abs(same) < 1e-3 and same < noisy[0] < noisy[1]
    f_fake = features_of(add_noise(real, 0.2), extractor)
    r1 = kernel_inception_distance(f_real, f_fake, subset_size=20, subsets=5, seed=3)
    r2 = kernel_inception_distance(f_real, f_fake, subset_size=20, subsets=5, seed=3)
    assert r1 == r2


def test_fid_needs_two_images_each():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))


def test_clip_image_features_take_uint8(tiny_clip):
    extractor = ClipImageFeatures(tiny_clip)
    out = extract_features(quantize(smooth_images(3)), extractor)
    assert out.shape == (3, tiny_clip.dim) and "tiny-random" in extractor.name


def test_clip_score_matches_a_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, -1.0], [1.0, 1.0]])
    # cosines: 0.6, -1 (clipped to 0), 1
    assert clip_scores(image, text).tolist() == pytest.approx([60.0, 0.0, 100.0])
    assert clip_score(image, text) == pytest.approx(160.0 / 3)


def test_r_precision_is_one_when_perfectly_aligned():
    emb = F.normalize(torch.randn(150, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert r_precision(emb, emb.clone(), seed=0) == 1.0


def test_r_precision_is_chance_for_shuffled_captions():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(1000, 32, generator=g), dim=-1)
    captions = images[torch.randperm(1000, generator=g)]
    score = r_precision(images, captions, seed=0)
    assert 0.0 < score < 0.025  # chance is 1 / 100
    assert r_precision(images, captions, seed=0) == score  # deterministic for a seed


def test_r_precision_groups_and_small_sets():
    emb = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    images = emb.repeat_interleave(2, dim=0)  # two images per source, same caption
    groups = torch.arange(5).repeat_interleave(2)
    assert r_precision_candidates(groups) == 9  # 1 true + the 8 rows of other sources
    assert r_precision(images, images.clone(), groups=groups) == 1.0
    # without groups the twin caption is a mismatch and ties: half a hit each
    assert r_precision(images, images.clone()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one caption embedding per image"):
        r_precision(images, images[:3])


def test_inception_failure_says_what_to_do(monkeypatch):
    import torchmetrics.image.fid as tm_fid

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", offline)
    with pytest.raises(RuntimeError, match="feature extractor"):
        metrics.InceptionFeatures()


def test_inception_features_wiring_without_download(monkeypatch):
    """The Colab path with random weights: no download, just shapes, dtype checks and FID use."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("a test must not download")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    extractor = metrics.InceptionFeatures()
    features = extract_features(quantize(smooth_images(2, size=64)), extractor)
    assert features.shape == (2, 2048) and extractor.num_features == 2048
    assert "inception" in extractor.name
    with pytest.raises(TypeError, match="uint8"):
        extractor(smooth_images(1))
