"""The caption grammar: CelebA's 40 binary attributes -> MM-CelebA-HQ-style sentences.

``captions_for_attributes({"Male": False, "Young": True, "Blond_Hair": True, ...})`` gives about
ten varied sentences such as "The woman is young and has blond hair and arched eyebrows." The
wording is gendered from ``Male`` (absent or false: a woman). The grammar is written from the
attribute semantics (what each attribute says about a face), in the style of the captions of
MM-CelebA-HQ (Xia et al., 2021); no caption text is copied from that dataset.

Rules, so that a caption can be checked against its attributes:

- a caption mentions only attributes that are present (plus the gender, through its wording);
- when at most ``MAX_MENTIONS`` attributes can be described, every caption mentions all of them
  (the toy faces always fall under this rule); otherwise each caption describes a random subset
  of ``MAX_MENTIONS``, so that captions stay well under CLIP's 77 tokens;
- ``Blurry`` describes the photo, not the face, and is never mentioned; ``No_Beard`` is mentioned
  for men only (every woman has no beard).

Every sentence is built by one seeded ``random.Random``, so the same attributes and seed always
give the same captions.

``everyday_captions`` says the same attributes the way people type prompts: "a blonde lady with
glasses", "smiling guy with a beard and a cap" (everyday words: blonde, lady, guy, spectacles,
cap, beard, fringe, grey). The toy faces carry both kinds, so that the demo CLIP and the demo
generator learn both.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

# The 40 attribute names in the order of CelebA's annotation files (list_attr_celeba.txt,
# CelebAMask-HQ-attribute-anno.txt).
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)

# At most this many attributes are described in one caption (CLIP reads 77 tokens).
MAX_MENTIONS = 8

# Attributes said with "is ...": adjective phrases (variants chosen at random).
_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "Attractive": ("attractive", "good-looking"),
    "Bald": ("bald",),
    "Chubby": ("chubby",),
    "Smiling": ("smiling",),
    "Young": ("young",),
}
# Attributes said with "has ...": noun phrases.
_FEATURES: dict[str, tuple[str, ...]] = {
    "5_o_Clock_Shadow": ("a five o'clock shadow", "stubble"),
    "Arched_Eyebrows": ("arched eyebrows",),
    "Bags_Under_Eyes": ("bags under the eyes",),
    "Bangs": ("bangs",),
    "Big_Lips": ("big lips", "full lips"),
    "Big_Nose": ("a big nose", "a large nose"),
    "Black_Hair": ("black hair",),
    "Blond_Hair": ("blond hair",),
    "Brown_Hair": ("brown hair",),
    "Bushy_Eyebrows": ("bushy eyebrows", "thick eyebrows"),
    "Double_Chin": ("a double chin",),
    "Goatee": ("a goatee",),
    "Gray_Hair": ("gray hair",),
    "High_Cheekbones": ("high cheekbones",),
    "Mouth_Slightly_Open": ("a slightly open mouth", "the mouth slightly open"),
    "Mustache": ("a mustache",),
    "Narrow_Eyes": ("narrow eyes",),
    "No_Beard": ("no beard",),
    "Oval_Face": ("an oval face",),
    "Pale_Skin": ("pale skin",),
    "Pointy_Nose": ("a pointy nose", "a pointed nose"),
    "Receding_Hairline": ("a receding hairline",),
    "Rosy_Cheeks": ("rosy cheeks",),
    "Sideburns": ("sideburns",),
    "Straight_Hair": ("straight hair",),
    "Wavy_Hair": ("wavy hair",),
}
# Attributes said with "wears ..." / "is wearing ...": things worn.
_WORN: dict[str, tuple[str, ...]] = {
    "Eyeglasses": ("eyeglasses", "glasses"),
    "Heavy_Makeup": ("heavy makeup",),
    "Wearing_Earrings": ("earrings",),
    "Wearing_Hat": ("a hat",),
    "Wearing_Lipstick": ("lipstick",),
    "Wearing_Necklace": ("a necklace",),
    "Wearing_Necktie": ("a necktie", "a tie"),
}
_NEVER_SAID = frozenset({"Blurry", "Male"})  # Male is said through the wording

_SUBJECTS = {  # (first subject of a sentence, noun after an article, pronoun)
    True: (("The man", "This man", "The gentleman", "A man", "He"), ("man", "gentleman", "guy"), "He"),
    False: (("The woman", "This woman", "The lady", "A woman", "She"), ("woman", "lady"), "She"),
}
_PLAIN = ("This is a {noun}.", "A photo of a {noun}.", "The {noun} in the picture.", "A face of a {noun}.")


def _present_attributes(attributes: Mapping[str, bool] | Iterable[str]) -> set[str]:
    """The set of present attribute names; CelebA's -1/1 and 0/1 values are understood."""
    if isinstance(attributes, str):
        raise TypeError(
            f"attributes must be a mapping name -> bool or an iterable of names, not the string "
            f"{attributes!r} (write [{attributes!r}] for one attribute)"
        )
    if isinstance(attributes, Mapping):
        present = {name for name, value in attributes.items() if _is_true(value)}
        names = set(attributes)
    else:
        present = set(attributes)
        names = present
    unknown = sorted(names - set(CELEBA_ATTRIBUTES))
    if unknown:
        raise ValueError(
            f"unknown attribute names {unknown}; use CelebA's names as spelled in "
            f"helpers.captions.CELEBA_ATTRIBUTES (e.g. 'Blond_Hair', 'Wearing_Hat')"
        )
    return present


def _is_true(value: object) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value > 0  # CelebA writes absent as -1
    return bool(value)


def _join(items: list[str], rng: random.Random) -> str:
    """'a', 'a and b', 'a, b and c' (or with the serial comma)."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    serial = "," if rng.random() < 0.5 else ""
    return f"{', '.join(items[:-1])}{serial} and {items[-1]}"


def _phrase(name: str, table: dict[str, tuple[str, ...]], male: bool, rng: random.Random) -> str:
    options = table[name]
    if name == "Bags_Under_Eyes":  # the possessive follows the gender
        options = ("bags under the eyes", "bags under his eyes" if male else "bags under her eyes")
    return rng.choice(options)


def _clauses(groups: dict[str, list[str]], rng: random.Random) -> list[str]:
    """Verb phrases: 'is young and smiling', 'has blond hair and bangs', 'wears a hat'."""
    clauses = []
    if groups["adj"]:
        clauses.append("is " + _join(groups["adj"], rng))
    if groups["has"]:
        clauses.append("has " + _join(groups["has"], rng))
    if groups["worn"]:
        verb = rng.choice(("wears", "is wearing"))
        clauses.append(f"{verb} " + _join(groups["worn"], rng))
    rng.shuffle(clauses)
    return clauses


def _caption(present: list[str], male: bool, rng: random.Random) -> str:
    subjects, nouns, pronoun = _SUBJECTS[male]
    rng.shuffle(present)
    groups: dict[str, list[str]] = {"adj": [], "has": [], "worn": []}
    for name in present:
        if name in _ADJECTIVES:
            groups["adj"].append(_phrase(name, _ADJECTIVES, male, rng))
        elif name in _FEATURES:
            groups["has"].append(_phrase(name, _FEATURES, male, rng))
        else:
            groups["worn"].append(_phrase(name, _WORN, male, rng))
    noun = rng.choice(nouns)
    if not present:
        return rng.choice(_PLAIN).format(noun=noun)

    form = rng.random()
    if form < 0.2 and groups["adj"]:
        # adjectives before the noun: "This young, smiling woman has ..."
        adjectives = ", ".join(groups["adj"])
        rest = _clauses({**groups, "adj": []}, rng)
        article = "An" if adjectives[0] in "aeiou" else "A"
        start = rng.choice(("This", "The", article))
        if not rest:
            return f"This is {article.lower()} {adjectives} {noun}."
        return f"{start} {adjectives} {noun} {_join(rest, rng)}."
    if form < 0.35 and (groups["has"] or groups["worn"]):
        # a noun phrase: "A woman with blond hair and bangs, wearing a hat, who is smiling."
        parts = [f"A {noun}"]
        if groups["has"]:
            parts.append("with " + _join(groups["has"], rng))
        if groups["worn"]:
            parts.append("wearing " + _join(groups["worn"], rng))
        if groups["adj"]:
            parts.append("who is " + _join(groups["adj"], rng))
        return " ".join(parts[:2]) + "".join(", " + p for p in parts[2:]) + "."
    clauses = _clauses(groups, rng)
    subject = rng.choice(subjects)
    if len(clauses) >= 2 and form < 0.7:
        # two sentences: "The man has a goatee. He is smiling and wears a hat."
        cut = rng.randint(1, len(clauses) - 1)
        return f"{subject} {_join(clauses[:cut], rng)}. {pronoun} {_join(clauses[cut:], rng)}."
    return f"{subject} {_join(clauses, rng)}."


def captions_for_attributes(
    attributes: Mapping[str, bool] | Iterable[str], *, n: int = 10, seed: int = 0
) -> list[str]:
    """``n`` varied captions describing a face with the given CelebA attributes.

    attributes: a mapping name -> present (bool, 0/1 or CelebA's -1/1), or an iterable of the
    names that are present; names are CelebA's (``CELEBA_ATTRIBUTES``). ``Male`` absent or false
    gives a woman. Returns ``n`` sentences (distinct where the attributes allow), the same for the
    same attributes and seed. Raises ValueError for an unknown attribute name or ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 captions, got {n}")
    present = _present_attributes(attributes)
    male = "Male" in present
    sayable = sorted(name for name in present if name not in _NEVER_SAID)
    if not male and "No_Beard" in sayable:
        sayable.remove("No_Beard")
    rng = random.Random(seed)
    captions: list[str] = []
    for attempt in range(n * 20):
        if len(captions) == n:
            break
        chosen = sayable if len(sayable) <= MAX_MENTIONS else rng.sample(sayable, MAX_MENTIONS)
        caption = _caption(list(chosen), male, rng)
        if caption not in captions or attempt >= n * 10:  # allow repeats only when variety runs out
            captions.append(caption)
    return captions


# --------------------------------------------------------------------------- everyday prompts

# Everyday words for an attribute, as an adjective before the noun ("a blonde lady") ...
_EVERYDAY_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "Blond_Hair": ("blonde", "blond", "fair-haired"),
    "Black_Hair": ("black-haired", "dark-haired"),
    "Brown_Hair": ("brown-haired", "brunette"),
    "Gray_Hair": ("gray-haired", "grey-haired", "silver-haired"),
    "Smiling": ("smiling", "happy", "cheerful"),
    "Young": ("young",),
    "Bald": ("bald",),
    "Chubby": ("chubby",),
    "Attractive": ("pretty", "handsome"),
}
# ... and as a "with ..." phrase ("a man with grey hair and a moustache").
_EVERYDAY_WITH: dict[str, tuple[str, ...]] = {
    "Blond_Hair": ("blonde hair", "blond hair", "fair hair"),
    "Black_Hair": ("black hair", "dark hair"),
    "Brown_Hair": ("brown hair", "brunette hair"),
    "Gray_Hair": ("grey hair", "gray hair", "silver hair"),
    "Smiling": ("a smile", "a big smile"),
    "Eyeglasses": ("glasses", "spectacles", "specs", "eyeglasses"),
    "Wearing_Hat": ("a hat", "a cap"),
    "Bangs": ("bangs", "a fringe"),
    "Wearing_Lipstick": ("lipstick", "red lips"),
    "Mustache": ("a moustache", "a mustache", "a mustache on the upper lip"),
    "Goatee": ("a goatee", "a beard", "a chin beard"),
    "Wearing_Earrings": ("earrings",),
    "Wearing_Necklace": ("a necklace",),
    "Wearing_Necktie": ("a tie",),
    "5_o_Clock_Shadow": ("stubble",),
    "Sideburns": ("sideburns",),
    "Wavy_Hair": ("wavy hair",),
    "Straight_Hair": ("straight hair",),
}
_EVERYDAY_NOUNS = {True: ("man", "guy", "gentleman", "fellow"), False: ("woman", "lady", "girl")}
_EVERYDAY_STARTS = ("", "", "a ", "a ", "photo of a ", "portrait of a ", "a picture of a ")


def everyday_captions(
    attributes: Mapping[str, bool] | Iterable[str], *, n: int = 4, seed: int = 0
) -> list[str]:
    """``n`` short prompts in everyday words for a face with the given CelebA attributes.

    Like ``captions_for_attributes`` (the same argument rules, and a prompt mentions only
    present attributes, every one of them when at most ``MAX_MENTIONS`` can be said) but as
    people type them: "a blonde lady with glasses", "smiling guy with a beard and a cap",
    lower case, no full stop. Attributes with no everyday word (e.g. ``Big_Nose``) use
    the grammar's phrase. Deterministic for the same attributes and seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 captions, got {n}")
    present = _present_attributes(attributes)
    male = "Male" in present
    sayable = sorted(name for name in present if name not in _NEVER_SAID | {"No_Beard"})
    rng = random.Random(seed)
    prompts: list[str] = []
    for attempt in range(n * 20):
        if len(prompts) == n:
            break
        chosen = sayable if len(sayable) <= MAX_MENTIONS else rng.sample(sayable, MAX_MENTIONS)
        rng.shuffle(chosen := list(chosen))
        before: list[str] = []
        rest: list[str] = []
        for name in chosen:
            if name in _EVERYDAY_ADJECTIVES and (name not in _EVERYDAY_WITH or rng.random() < 0.5) and len(before) < 2:
                before.append(rng.choice(_EVERYDAY_ADJECTIVES[name]))
            else:
                rest.append(name)
        # "wearing glasses and a cap" when every remaining thing is worn, else "with ..."
        wearing = bool(rest) and all(name in _WORN for name in rest) and rng.random() < 0.4
        after = [_phrase(name, _WORN, male, rng) if wearing
                 else rng.choice(_EVERYDAY_WITH[name]) if name in _EVERYDAY_WITH
                 else _phrase(name, _ADJECTIVES if name in _ADJECTIVES else _FEATURES if name in _FEATURES else _WORN,
                              male, rng)
                 for name in rest]
        start = rng.choice(_EVERYDAY_STARTS)
        words = " ".join([*before, rng.choice(_EVERYDAY_NOUNS[male])])
        if start.endswith("a ") and words[0] in "aeiou":
            start = start[:-2] + "an "
        prompt = start + words
        if after:
            prompt += (" wearing " if wearing else " with ") + _join(after, rng)
        if prompt not in prompts or attempt >= n * 10:
            prompts.append(prompt)
    return prompts
