"""The toy-face attribute classifier and the attribute accuracy yardstick."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.attributes import DEFAULT_PATH, attribute_accuracy, attributes_tensor, load_attribute_classifier, to_tensor
from helpers.checkpoint import CheckpointError
from helpers.files import atomic_save
from helpers.attributes import save_attribute_classifier
from helpers.tools.train_classifier import train_attribute_classifier
from helpers.toyfaces import TOY_ATTRIBUTES, toy_face

FRESH_SEED = 777  # neither the classifier's training faces nor its held-out ones


@pytest.fixture(scope="module")
def fresh_faces():
    """192 fresh faces at 256 / 128 / 64 px as [-1, 1] tensors, and their attributes."""
    faces = [toy_face(FRESH_SEED, i) for i in range(192)]
    by_size = {
        256: to_tensor(np.stack([np.asarray(f[0]) for f in faces])),
        128: to_tensor(np.stack([np.asarray(f[0].reduce(2)) for f in faces])),
        64: to_tensor(np.stack([np.asarray(f[0].resize((64, 64), Image.LANCZOS)) for f in faces])),
    }
    return by_size, [f[1] for f in faces]


def test_shipped_weights_are_small_and_carry_their_report():
    assert DEFAULT_PATH.stat().st_size < 2_000_000
    report = torch.load(DEFAULT_PATH, weights_only=False)["report"]
    for resolution in ("64", "128", "256"):
        assert min(report["accuracy"][resolution].values()) >= 0.98, report["accuracy"][resolution]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_every_attribute_is_recovered_from_fresh_faces(fresh_faces, size):
    images, wanted = fresh_faces
    classifier = load_attribute_classifier()
    assert classifier(images[size][:3]).shape == (3, len(TOY_ATTRIBUTES))
    result = attribute_accuracy(images[size], wanted, classifier=classifier)
    assert result["n"] == 192 and set(result["per_attribute"]) == set(TOY_ATTRIBUTES)
    assert min(result["per_attribute"].values()) >= 0.97, result
    assert result["mean"] >= 0.99
    # not just the majority answer: faces that have an attribute are recognised as having it
    predicted = classifier(images[size]) > 0
    target = attributes_tensor(wanted)
    for k, name in enumerate(TOY_ATTRIBUTES):
        positives = target[:, k]
        assert positives.sum() >= 5, name
        assert (predicted[positives, k]).float().mean() >= 0.9, name


def test_accuracy_counts_what_was_asked(fresh_faces):
    images, wanted = fresh_faces
    x, asked = images[64][:24], wanted[:24]
    as_tensor = attribute_accuracy(x, attributes_tensor(asked))
    assert as_tensor == attribute_accuracy(x, asked)  # default classifier, same answer
    names = [[name for name, value in a.items() if value] for a in asked]
    assert attribute_accuracy(x, names)["mean"] == as_tensor["mean"]
    flipped = attributes_tensor(asked)
    flipped[:, TOY_ATTRIBUTES.index("Smiling")] ^= True
    result = attribute_accuracy(x, flipped)
    assert result["per_attribute"]["Smiling"] <= 0.1 and result["mean"] < as_tensor["mean"]
    one = attribute_accuracy(x[:1], [asked[0] | {"Young": True}])  # undrawn CelebA names are ignored
    assert one["n"] == 1
    # recall: of the images asked for an attribute, the share that show it
    assert min(r for r in as_tensor["recall"].values() if r is not None) >= 0.9
    none_asked = attributes_tensor(asked)
    none_asked[:, TOY_ATTRIBUTES.index("Wearing_Hat")] = False
    assert attribute_accuracy(x, none_asked)["recall"]["Wearing_Hat"] is None
    all_asked = attributes_tensor(asked)
    all_asked[:, TOY_ATTRIBUTES.index("Wearing_Hat")] = True  # most of these faces have no hat
    hats = attributes_tensor(asked)[:, TOY_ATTRIBUTES.index("Wearing_Hat")].float().mean().item()
    assert attribute_accuracy(x, all_asked)["recall"]["Wearing_Hat"] == pytest.approx(hats, abs=1 / 24)


def test_bad_input(fresh_faces, tmp_path):
    images, wanted = fresh_faces
    with pytest.raises(ValueError, match="3 images but 2"):
        attribute_accuracy(images[64][:3], wanted[:2])
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_accuracy(images[64][:1], [["Blonde_Hair"]])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        load_attribute_classifier()(torch.zeros(3, 64, 64))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_attribute_classifier(foreign)
    other = atomic_save({"format": torch.load(DEFAULT_PATH, weights_only=False)["format"], "kind": "gan"}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="not an attribute classifier"):
        load_attribute_classifier(other)


def test_training_is_deterministic_and_round_trips(tmp_path):
    kwargs = dict(seed=3, n_train=48, n_heldout=8, epochs=1, batch_size=16)
    first, report = train_attribute_classifier(**kwargs)
    second, _ = train_attribute_classifier(**kwargs)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(report["accuracy"]) == {"64", "128", "256"}
    path = save_attribute_classifier(first, tmp_path / "c.pt", report=report)
    loaded = load_attribute_classifier(path)
    x = to_tensor(np.asarray(toy_face(0, 0)[0])[None])
    assert torch.allclose(loaded(x), first(x), atol=0.05)  # fp16 storage
