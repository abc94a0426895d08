"""The features file format and the training Dataset over it."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.features import FeaturesDataset, downsample, images_path, read_features


def test_dataset_items_have_documented_shapes_and_ranges(synthetic_features):
    ds = FeaturesDataset(synthetic_features, split="train", num_stages=3)
    assert len(ds) == 9 and ds.dim == 32 and ds.clip_spec == "tiny-random"
    item = ds[0]
    assert [tuple(x.shape) for x in item["images"]] == [(3, 64, 64), (3, 128, 128), (3, 256, 256)]
    for x in item["images"]:
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    for key in ("image_feature", "text_feature", "mismatched_text_feature"):
        assert item[key].shape == (32,)
        torch.testing.assert_close(item[key].norm(), torch.tensor(1.0), atol=2e-3, rtol=0)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["images"][2].shape == (4, 3, 256, 256) and batch["text_feature"].shape == (4, 32)


def test_smaller_stages_are_area_downsamples_of_the_stored_image(synthetic_features):
    ds = FeaturesDataset(synthetic_features, num_stages=3)
    item = ds[1]
    full = item["images"][2]
    stored = np.load(images_path(synthetic_features))[int(ds.rows[1])]
    torch.testing.assert_close(full, torch.from_numpy(stored).permute(2, 0, 1).float() / 127.5 - 1)
    torch.testing.assert_close(item["images"][1], full.reshape(3, 128, 2, 128, 2).mean((2, 4)))
    torch.testing.assert_close(item["images"][0], full.reshape(3, 64, 4, 64, 4).mean((2, 4)))
    assert downsample(full, 256) is full


def test_captions_and_mismatches_come_from_the_right_images(synthetic_features):
    ds = FeaturesDataset(synthetic_features, split="test")
    assert len(ds) == 3 and ds.ids == ["img003", "img007", "img011"]
    torch.manual_seed(0)
    for _ in range(20):
        item = ds[0]
        own = ds.text_features[0]
        assert any(torch.equal(item["text_feature"], row) for row in own)
        assert not any(torch.equal(item["mismatched_text_feature"], row) for row in own)


def test_bad_paths_and_splits(tmp_path, synthetic_features):
    with pytest.raises(FileNotFoundError, match="run `python -m helpers extract` first"):
        FeaturesDataset(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="split must be one of"):
        FeaturesDataset(synthetic_features, split="val")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a features file"):
        read_features(tmp_path / "other.pt")
    images_path(synthetic_features).unlink()
    with pytest.raises(FileNotFoundError, match="image array"):
        FeaturesDataset(synthetic_features)
