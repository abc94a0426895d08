"""The CelebA caption grammar."""

import random
import re

import pytest

from helpers.captions import CELEBA_ATTRIBUTES, MAX_MENTIONS, captions_for_attributes

# words that reveal each attribute in a caption (the grammar's phrases, any variant)
MENTIONS = {
    "Black_Hair": r"black hair", "Blond_Hair": r"blond hair", "Brown_Hair": r"brown hair",
    "Gray_Hair": r"gray hair", "Bangs": r"bangs", "Smiling": r"smiling", "Eyeglasses": r"glasses",
    "Wearing_Hat": r"\bhat\b", "Wearing_Lipstick": r"lipstick", "Mustache": r"mustache",
    "Goatee": r"goatee", "Young": r"\byoung\b", "Arched_Eyebrows": r"arched eyebrows",
}
MALE_WORDS = r"\b(man|he|gentleman|guy)\b"
FEMALE_WORDS = r"\b(woman|she|lady)\b"


def mentioned(caption: str) -> set[str]:
    text = caption.lower()
    return {name for name, pattern in MENTIONS.items() if re.search(pattern, text)}


def test_the_forty_attributes_in_annotation_order():
    assert len(CELEBA_ATTRIBUTES) == 40 == len(set(CELEBA_ATTRIBUTES))
    assert CELEBA_ATTRIBUTES[:3] == ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive")
    assert CELEBA_ATTRIBUTES[20] == "Male" and CELEBA_ATTRIBUTES[-1] == "Young"


@pytest.mark.parametrize("male", [False, True])
def test_every_caption_mentions_exactly_the_present_attributes(male):
    present = {"Blond_Hair", "Smiling", "Eyeglasses", "Wearing_Hat", "Bangs"}
    present |= {"Mustache", "Goatee"} if male else {"Wearing_Lipstick"}
    attributes = {name: name in present for name in MENTIONS} | {"Male": male}
    captions = captions_for_attributes(attributes, n=10, seed=3)
    assert len(captions) == 10 and len(set(captions)) == 10
    for caption in captions:
        assert mentioned(caption) == present, caption
        assert bool(re.search(MALE_WORDS, caption.lower())) == male, caption
        assert bool(re.search(FEMALE_WORDS, caption.lower())) != male, caption
        assert caption[0].isupper() and caption.endswith(".")


def test_example_style_and_plain_faces():
    captions = captions_for_attributes(["Young", "Blond_Hair", "Arched_Eyebrows"], n=10, seed=0)
    assert all({"Young", "Blond_Hair", "Arched_Eyebrows"} == mentioned(c) for c in captions)
    plain = captions_for_attributes([], n=4, seed=0)
    assert len(plain) == 4 and all(re.search(FEMALE_WORDS, c.lower()) and not mentioned(c) for c in plain)


def test_seeded_and_varied():
    attributes = {"Male": True, "Gray_Hair": True, "Eyeglasses": True}
    assert captions_for_attributes(attributes, seed=5) == captions_for_attributes(attributes, seed=5)
    assert captions_for_attributes(attributes, seed=5) != captions_for_attributes(attributes, seed=6)
    assert len(captions_for_attributes(attributes, n=3)) == 3


def test_celeba_minus_one_values_and_never_said_attributes():
    values = {name: -1 for name in CELEBA_ATTRIBUTES} | {"Bangs": 1, "Blurry": 1, "No_Beard": 1}
    for caption in captions_for_attributes(values, n=5):
        assert "bangs" in caption and "blurry" not in caption.lower() and "beard" not in caption
        assert re.search(FEMALE_WORDS, caption.lower())
    male = captions_for_attributes({"Male": 1, "No_Beard": 1}, n=5)
    assert all("no beard" in c for c in male)


def test_many_attributes_are_subsampled_per_caption():
    captions = captions_for_attributes(CELEBA_ATTRIBUTES, n=10, seed=0)
    assert all(c.count(",") + c.count(" and ") <= MAX_MENTIONS + 3 for c in captions)
    assert all(len(c.split()) < 55 for c in captions)  # comfortably inside CLIP's 77 tokens


def test_bad_input():
    with pytest.raises(ValueError, match="Blonde_Hair"):
        captions_for_attributes(["Blonde_Hair"])
    with pytest.raises(TypeError, match="iterable of names"):
        captions_for_attributes("Male")
    with pytest.raises(ValueError, match="n must be"):
        captions_for_attributes([], n=-1)


EVERYDAY = {  # the everyday words of the toy attributes
    "Black_Hair": r"black|dark", "Blond_Hair": r"blond|fair", "Brown_Hair": r"brown|brunette",
    "Gray_Hair": r"gray|grey|silver", "Bangs": r"bangs|fringe", "Smiling": r"smil|happy|cheerful",
    "Eyeglasses": r"glasses|spectacles|specs", "Wearing_Hat": r"\b(hat|cap)\b",
    "Wearing_Lipstick": r"lipstick|red lips", "Mustache": r"mustache|moustache", "Goatee": r"goatee|beard",
}


@pytest.mark.parametrize("male", [False, True])
def test_everyday_prompts_mention_exactly_the_present_attributes_in_everyday_words(male):
    from helpers.captions import everyday_captions

    seen = set()
    for seed in range(30):
        rng = random.Random(seed)
        names = [n for n in EVERYDAY if male or n not in ("Mustache", "Goatee")]
        present = set(rng.sample(names, rng.randint(0, 4)))
        attributes = {name: name in present for name in EVERYDAY} | {"Male": male}
        prompts = everyday_captions(attributes, n=4, seed=seed)
        assert prompts == everyday_captions(attributes, n=4, seed=seed) and len(prompts) == 4
        for prompt in prompts:
            text = prompt.lower()
            assert {n for n, p in EVERYDAY.items() if re.search(p, text)} == present, prompt
            assert bool(re.search(r"\b(man|guy|gentleman|fellow)\b", text)) == male, prompt
            assert bool(re.search(r"\b(woman|lady|girl)\b", text)) != male, prompt
            assert prompt == text and not prompt.endswith(".")
            assert not re.search(r"wearing .*(hair|smile|red lips|fringe|bangs|beard|goatee|mustache)", text), prompt
            seen.update(re.findall(r"blonde|lady|guy|spectacles|cap|beard|fringe|grey", text))
    assert seen >= ({"guy", "beard", "cap", "spectacles"} if male else {"blonde", "lady", "fringe", "grey"})
