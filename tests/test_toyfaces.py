"""Toy faces: sampling, drawing, captions, the folder format and the round trip through extract."""

import re

import numpy as np
import pytest

from helpers.__main__ import main
from helpers.captions import CELEBA_ATTRIBUTES
from helpers.toyfaces import (
    ATTRIBUTE_GROUPS,
    TOY_ATTRIBUTES,
    draw_face,
    read_attributes_csv,
    sample_attributes,
    toy_face,
    write_toyfaces,
)

MENTIONS = {  # words that reveal each toy attribute in a caption (the grammar's and the everyday ones)
    "Bangs": r"bangs|fringe", "Black_Hair": r"black|dark", "Blond_Hair": r"blond|fair",
    "Brown_Hair": r"brown|brunette", "Eyeglasses": r"glasses|spectacles|specs", "Goatee": r"goatee|beard",
    "Gray_Hair": r"gray|grey|silver", "Mustache": r"mustache|moustache", "Smiling": r"smil|happy|cheerful",
    "Wearing_Hat": r"\b(hat|cap)\b", "Wearing_Lipstick": r"lipstick|red lips",
}
MALE_WORDS, FEMALE_WORDS = r"\b(man|he|gentleman|guy|fellow)\b", r"\b(woman|she|lady|girl)\b"


def test_attribute_set_and_groups():
    assert set(TOY_ATTRIBUTES) <= set(CELEBA_ATTRIBUTES)
    assert list(TOY_ATTRIBUTES) == sorted(TOY_ATTRIBUTES, key=CELEBA_ATTRIBUTES.index)
    assert len(TOY_ATTRIBUTES) >= 8 and len(ATTRIBUTE_GROUPS) >= 4
    assert sorted(a for group in ATTRIBUTE_GROUPS.values() for a in group) == sorted(TOY_ATTRIBUTES)


def test_sampled_attributes_respect_exclusions_and_rates():
    rng = np.random.default_rng(0)
    samples = [sample_attributes(rng) for _ in range(3000)]
    for a in samples:
        assert sum(a[name] for name in ATTRIBUTE_GROUPS["hair colour"]) <= 1
        if a["Male"]:
            assert not a["Wearing_Lipstick"]
        else:
            assert not a["Mustache"] and not a["Goatee"]
    rate = {name: np.mean([a[name] for a in samples]) for name in TOY_ATTRIBUTES}
    assert abs(rate["Male"] - 0.42) < 0.04 and abs(rate["Smiling"] - 0.48) < 0.04
    assert abs(rate["Wearing_Lipstick"] - 0.45) < 0.05 and 0.1 < rate["Bangs"] < 0.22
    assert all(rate[name] > 0.05 for name in TOY_ATTRIBUTES)  # every attribute has examples


def test_faces_are_deterministic_and_independent_of_the_dataset_size():
    image, attributes, captions = toy_face(3, 7)
    again = toy_face(3, 7)
    assert image.size == (256, 256) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(again[0]))
    assert (attributes, captions) == again[1:]
    assert not np.array_equal(np.asarray(image), np.asarray(toy_face(4, 7)[0]))


def test_captions_mention_exactly_the_present_attributes():
    for index in range(40):
        _, attributes, captions = toy_face(0, index)
        present = {name for name, value in attributes.items() if value and name != "Male"}
        assert len(captions) == 10 and len(set(captions)) >= 5
        for caption in captions:
            text = caption.lower()
            assert {name for name, p in MENTIONS.items() if re.search(p, text)} == present, caption
            assert bool(re.search(MALE_WORDS, text)) == attributes["Male"], caption
            assert bool(re.search(FEMALE_WORDS, text)) != attributes["Male"], caption


def test_draw_face_rejects_impossible_attributes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one hair colour"):
        draw_face({"Black_Hair": True, "Blond_Hair": True}, rng)
    with pytest.raises(ValueError, match="woman"):
        draw_face({"Male": False, "Mustache": True}, rng)
    with pytest.raises(ValueError, match="cannot draw"):
        draw_face({"Young": True}, rng)
    assert draw_face({}, rng).size == (256, 256)  # missing names are absent


def test_folder_format(tmp_path):
    out = write_toyfaces(tmp_path / "faces", n=6, seed=2)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    lines = (out / "attributes.csv").read_text().splitlines()
    assert lines[0] == "file," + ",".join(TOY_ATTRIBUTES) and len(lines) == 7
    table = read_attributes_csv(out / "attributes.csv")
    for index in (0, 5):
        _, attributes, captions = toy_face(2, index)
        assert table[f"{index:06d}.png"] == attributes
        assert (out / f"{index:06d}.txt").read_text().splitlines() == captions
    again = write_toyfaces(tmp_path / "again", n=4, seed=2)  # same seed: same files
    assert (again / "000003.png").read_bytes() == (out / "000003.png").read_bytes()
    with pytest.raises(ValueError, match="at least 1"):
        write_toyfaces(tmp_path / "none", n=0)


def test_command_line(tmp_path, capsys):
    assert main(["toyfaces", "--n", "3", "--out", str(tmp_path / "cli"), "--seed", "1"]) == 0
    assert "wrote 3 toy faces" in capsys.readouterr().out
    assert len(read_attributes_csv(tmp_path / "cli" / "attributes.csv")) == 3


def test_round_trip_through_extract(tmp_path):
    from helpers.extract import extract_features
    from helpers.features import read_features

    folder = write_toyfaces(tmp_path / "faces", n=8, seed=0)
    out = tmp_path / "toy.pt"
    extract_features(str(folder), out, clip="tiny-random", captions_per_image=3, device="cpu", progress=False)
    data = read_features(out)
    assert len(data["ids"]) == 8
    by_id = dict(zip(data["ids"], data["captions"]))
    first = next(key for key in by_id if "000000" in key)
    assert by_id[first] == toy_face(0, 0)[2][: len(by_id[first])]
    assert data["text_features"].shape[:2] == (8, 3)
