"""Toy faces: a procedurally drawn, captioned face dataset whose every attribute is known.

Each face is drawn with Pillow from a subset of CelebA's attributes that can be seen at 64 px
(``TOY_ATTRIBUTES``, seven groups: gender, hair colour, bangs, smile, eyeglasses, hat, lipstick
and facial hair) and captioned by the CelebA caption grammar (``helpers.captions``), so toy faces
and real faces go through the same text path; three of a face's ten captions are everyday prompts
("a blonde lady with glasses", ``everyday_captions``), so that models trained on toy faces also
understand prompts typed the way people type them. What the attributes do not name varies freely, so
that a model has to generalise rather than memorise: face width, length and position, skin tone,
eye colour and size, hair style and volume, the shape of glasses, hats and beards, the colours of
clothes, hats and frames, and the background colour and gradient.

Gender is drawn through shape: men have short hair, a squarer jaw and thicker eyebrows; women
have hair that falls below the chin. Mutually exclusive groups are respected (at most one hair
colour; no beard or mustache on a woman, no lipstick on a man), and frequencies follow CelebA's
where that leaves enough examples to learn from; rare accessories are drawn more often
(``ATTRIBUTE_RATES`` lists the rates).

Face ``i`` of seed ``s`` depends only on ``(s, i)``, so a dataset is the same whatever its size
and however it is produced.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .captions import CELEBA_ATTRIBUTES, captions_for_attributes, everyday_captions
from .config import STORED_IMAGE_SIZE
from .files import atomic_write_bytes

# The drawn attributes, in CelebA's order.
TOY_ATTRIBUTES: tuple[str, ...] = (
    "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Eyeglasses", "Goatee", "Gray_Hair",
    "Male", "Mustache", "Smiling", "Wearing_Hat", "Wearing_Lipstick",
)
assert set(TOY_ATTRIBUTES) <= set(CELEBA_ATTRIBUTES)

# Which attributes belong together (a face has at most one hair colour).
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "gender": ("Male",),
    "hair colour": ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"),
    "hair style": ("Bangs",),
    "expression": ("Smiling",),
    "accessories": ("Eyeglasses", "Wearing_Hat"),
    "makeup": ("Wearing_Lipstick",),
    "facial hair": ("Mustache", "Goatee"),
}

CAPTIONS_PER_FACE, GRAMMAR_CAPTIONS = 10, 7  # the other 3 are everyday prompts
IMAGE_SIZE = STORED_IMAGE_SIZE  # every toy face is square RGB at the size a features file stores (256 px)
_UNITS = 256  # the face's geometry is written in units of a 256 px image, scaled to IMAGE_SIZE
_SUPERSAMPLE = 2  # drawn at twice the size and box-downsampled: smooth edges at little cost

# P(attribute) for a woman and for a man. CelebA (whole dataset) for comparison: Male 0.42,
# Black 0.24, Blond 0.15, Brown 0.21, Gray 0.04 (the rest have no hair colour label: here red),
# Bangs 0.15, Smiling 0.48, Eyeglasses 0.07, Wearing_Hat 0.05, Lipstick 0.47, Mustache 0.04,
# Goatee 0.06. Accessories and facial hair are drawn more often so that a model sees enough.
MALE_RATE = 0.42
HAIR_COLOUR_RATES = {  # the remainder of each row is red hair (no CelebA label)
    False: {"Black_Hair": 0.28, "Blond_Hair": 0.30, "Brown_Hair": 0.28, "Gray_Hair": 0.04},
    True: {"Black_Hair": 0.38, "Blond_Hair": 0.08, "Brown_Hair": 0.30, "Gray_Hair": 0.14},
}
ATTRIBUTE_RATES = {  # (woman, man)
    "Bangs": (0.22, 0.08),
    "Smiling": (0.50, 0.45),
    "Eyeglasses": (0.10, 0.18),
    "Wearing_Hat": (0.10, 0.12),
    "Wearing_Lipstick": (0.78, 0.0),
    "Mustache": (0.0, 0.22),
    "Goatee": (0.0, 0.26),
}

Colour = tuple[int, int, int]

_HAIR_PALETTES: dict[str, tuple[Colour, Colour]] = {  # (darkest, lightest) of each colour
    "Black_Hair": ((14, 12, 14), (45, 38, 36)),
    "Brown_Hair": ((86, 52, 28), (132, 84, 48)),
    "Blond_Hair": ((214, 178, 96), (250, 226, 150)),
    "Gray_Hair": ((150, 150, 152), (206, 204, 200)),
    "red": ((176, 74, 30), (222, 118, 56)),
}
_SKIN = np.array([(246, 216, 194), (222, 176, 140), (184, 128, 88), (128, 84, 58)], dtype=float)
_LIPSTICK = ((196, 18, 48), (176, 8, 40), (214, 44, 104), (150, 12, 44), (226, 58, 76))
_FRAMES = ((18, 18, 20), (62, 36, 22), (22, 30, 72), (112, 18, 26), (44, 44, 46))
_IRISES = ((70, 44, 24), (40, 90, 150), (60, 110, 60), (30, 24, 20))


def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """One face's attributes: ``{name: bool}`` over ``TOY_ATTRIBUTES``, exclusions respected."""
    male = bool(rng.random() < MALE_RATE)
    attributes = dict.fromkeys(TOY_ATTRIBUTES, False)
    attributes["Male"] = male
    u, total = rng.random(), 0.0
    for name, rate in HAIR_COLOUR_RATES[male].items():
        total += rate
        if u < total:
            attributes[name] = True
            break
    for name, rates in ATTRIBUTE_RATES.items():
        attributes[name] = bool(rng.random() < rates[int(male)])
    return attributes


def hair_colour_name(attributes: Mapping[str, bool]) -> str:
    """The hair colour attribute that is set, or ``"red"`` (no CelebA label) when none is."""
    for name in ATTRIBUTE_GROUPS["hair colour"]:
        if attributes.get(name, False):
            return name
    return "red"


def check_attributes(attributes: Mapping[str, bool]) -> None:
    """Raise ValueError when toy attributes are unknown or break an exclusive group."""
    unknown = sorted(set(attributes) - set(TOY_ATTRIBUTES))
    if unknown:
        raise ValueError(f"toy faces cannot draw {unknown}; drawable attributes: {list(TOY_ATTRIBUTES)}")
    colours = [name for name in ATTRIBUTE_GROUPS["hair colour"] if attributes.get(name)]
    if len(colours) > 1:
        raise ValueError(f"a face has at most one hair colour, got {colours}")
    male = attributes.get("Male", False)
    if not male and (attributes.get("Mustache") or attributes.get("Goatee")):
        raise ValueError("a woman is drawn without a mustache or goatee; set Male or drop them")
    if male and attributes.get("Wearing_Lipstick"):
        raise ValueError("a man is drawn without lipstick; unset Male or Wearing_Lipstick")


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(c: Colour, f: float) -> Colour:
    return tuple(int(min(255, max(0, round(x * f)))) for x in c)  # type: ignore[return-value]


def _luma(c: Colour) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return int(r * 255), int(g * 255), int(b * 255)


def _contrasting(c: Colour, skin: Colour) -> Colour:
    """``c`` darkened until it stands out against the skin (beards and eyebrows)."""
    for f in (0.8, 0.62, 0.46, 0.32, 0.2):
        out = _scale(c, f)
        if abs(_luma(out) - _luma(skin)) >= 60:
            return out
    return _scale(c, 0.2)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear gradient between two random colours at a random angle."""
    a = np.array(_hsv(rng, (0.05, 0.6), (0.35, 0.95)), dtype=np.float32)
    b = np.array(_hsv(rng, (0.05, 0.6), (0.35, 0.95)), dtype=np.float32)
    if rng.random() < 0.2:
        b = a
    angle = rng.uniform(0, 2 * np.pi)
    small = 32  # a gradient is smooth: compute it small and let the resize interpolate
    y, x = np.mgrid[0:small, 0:small].astype(np.float32) / (small - 1) - 0.5
    t = np.clip(x * np.cos(angle) + y * np.sin(angle) + 0.5, 0, 1)[..., None]
    grad = (a * (1 - t) + b * t).astype(np.uint8)
    return Image.fromarray(grad, "RGB").resize((size, size), Image.BILINEAR)


def draw_face(attributes: Mapping[str, bool], rng: np.random.Generator) -> Image.Image:
    """Draw one ``IMAGE_SIZE`` px RGB face showing exactly ``attributes`` (a mapping over TOY_ATTRIBUTES;
    missing names are false); everything else is drawn at random from ``rng``."""
    check_attributes(attributes)
    a = {name: bool(attributes.get(name, False)) for name in TOY_ATTRIBUTES}
    male = a["Male"]
    k = _SUPERSAMPLE * IMAGE_SIZE / _UNITS  # drawing px per geometry unit
    img = _background(rng, IMAGE_SIZE * _SUPERSAMPLE)
    d = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * k, y0 * k, x1 * k, y1 * k]

    def pts(*xy: tuple[float, float]) -> list[tuple[float, float]]:
        return [(x * k, y * k) for x, y in xy]

    def w(width: float) -> int:
        return max(1, int(round(width * k)))

    # geometry (in 256 px units)
    cx = 128 + rng.uniform(-12, 12)
    cy = 134 + rng.uniform(-10, 10)
    fw = rng.uniform(42, 52) * (1.06 if male else 1.0)  # half width of the face
    fh = fw * rng.uniform(1.22, 1.38)  # half height
    top, chin = cy - fh, cy + fh
    hairline = cy - fh * rng.uniform(0.55, 0.65)
    eye_y = cy - fh * rng.uniform(0.02, 0.08)
    eye_dx = fw * rng.uniform(0.38, 0.46)
    brow_y = eye_y - rng.uniform(12, 15)
    mouth_y = cy + fh * rng.uniform(0.46, 0.54)

    # colours
    t = rng.uniform(0, 1) * (len(_SKIN) - 1)
    i = min(int(t), len(_SKIN) - 2)
    skin_arr = _SKIN[i] + (_SKIN[i + 1] - _SKIN[i]) * (t - i) + rng.uniform(-6, 6, 3)
    skin: Colour = tuple(int(v) for v in np.clip(skin_arr, 0, 255))  # type: ignore[assignment]
    shade = _scale(skin, 0.86)
    lo, hi = _HAIR_PALETTES[hair_colour_name(a)]
    hair = _mix(lo, hi, rng.uniform(0, 1))
    hair_dark = _scale(hair, 0.8)
    facial_hair = _contrasting(hair, skin)
    clothes = _hsv(rng, (0.2, 0.9), (0.25, 0.9))

    # long hair behind the head (women): it always falls below the chin
    volume = rng.uniform(4, 10) if male else rng.uniform(8, 18)
    if not male:
        hw = fw + rng.uniform(10, 22)
        bottom = chin + rng.uniform(12, 55)
        d.rounded_rectangle(box(cx - hw, top - volume, cx + hw, bottom), radius=hw * k * 0.9, fill=hair)
        if rng.random() < 0.5:  # wavy: bumps along both sides
            for yy in np.arange(top + fh * 0.6, bottom - 6, 13):
                for side in (-1, 1):
                    d.ellipse(box(cx + side * hw - 8, yy - 8, cx + side * hw + 8, yy + 8), fill=hair)

    # shoulders and neck, in front of long hair
    sw = fw * (2.4 if male else 2.1)
    d.ellipse(box(cx - sw, chin + 22, cx + sw, chin + 150), fill=clothes)
    nw = fw * (0.5 if male else 0.4)
    d.rectangle(box(cx - nw, cy, cx + nw, chin + 34), fill=shade)

    # ears (sometimes hidden by a woman's hair)
    if male or rng.random() < 0.4:
        for side in (-1, 1):
            ex = cx + side * fw
            d.ellipse(box(ex - 8, eye_y - 4, ex + 8, eye_y + 22), fill=shade)

    # face: an oval for women; a squarer jaw for men
    if male:
        d.ellipse(box(cx - fw, top, cx + fw, chin - fh * 0.2), fill=skin)
        d.rounded_rectangle(box(cx - fw * 0.92, cy - fh * 0.2, cx + fw * 0.92, chin), radius=fw * k * 0.45, fill=skin)
    else:
        d.ellipse(box(cx - fw, top, cx + fw, chin), fill=skin)

    # hair on top: the upper half of an ellipse whose widest line is the hairline
    margin = rng.uniform(2, 6)
    cap_top = top - volume
    shift = rng.uniform(-6, 6)
    d.chord(box(cx - fw - margin + shift * 0.3, cap_top, cx + fw + margin + shift * 0.3, 2 * hairline - cap_top),
            180, 360, fill=hair)
    d.rectangle(box(cx - fw - margin, hairline - 2, cx - fw + 7, eye_y - (6 if male else -10)), fill=hair)
    d.rectangle(box(cx + fw - 7, hairline - 2, cx + fw + margin, eye_y - (6 if male else -10)), fill=hair)
    style = rng.integers(3)
    if style == 1:  # a parting
        px = cx + rng.uniform(-0.4, 0.4) * fw
        d.line(pts((px, cap_top + 4), (px + shift, hairline - 2)), fill=hair_dark, width=w(2))
    elif style == 2 and male:  # spikes
        for sx in np.linspace(cx - fw * 0.7, cx + fw * 0.7, 6):
            d.polygon(pts((sx - 8, cap_top + 6), (sx + shift, cap_top - rng.uniform(5, 12)), (sx + 8, cap_top + 6)), fill=hair)

    # bangs: a fringe over the forehead, down to just above the eyebrows
    if a["Bangs"]:
        fringe = brow_y - rng.uniform(2, 5)
        x0, x1 = cx - fw * 0.95, cx + fw * 0.95
        kind = rng.integers(3)
        if kind == 0:  # straight
            d.rectangle(box(x0, hairline - 6, x1, fringe), fill=hair)
        elif kind == 1:  # jagged
            xs = np.linspace(x0, x1, 8)
            poly = [(x0, hairline - 6), (x1, hairline - 6)]
            poly += [(xs[j], fringe - 7 * (j % 2)) for j in range(len(xs) - 1, -1, -1)]
            d.polygon(pts(*poly), fill=hair)
        else:  # swept to one side
            drop = rng.uniform(6, 12) * rng.choice((-1, 1))  # how much lower the right end is
            d.polygon(pts((x0, hairline - 6), (x1, hairline - 6), (x1, fringe + min(drop, 0)),
                          (x0, fringe - max(drop, 0))), fill=hair)

    # eyes
    ew, eh = rng.uniform(7, 10), rng.uniform(4, 6)
    iris = _IRISES[rng.integers(len(_IRISES))]
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse(box(ex - ew, eye_y - eh, ex + ew, eye_y + eh), fill=(245, 245, 240))
        d.ellipse(box(ex - 4, eye_y - 4, ex + 4, eye_y + 4), fill=iris)
        d.ellipse(box(ex - 1.8, eye_y - 1.8, ex + 1.8, eye_y + 1.8), fill=(10, 10, 10))
        if not male:  # lashes
            d.arc(box(ex - ew, eye_y - eh, ex + ew, eye_y + eh), 190, 350, fill=(20, 16, 16), width=w(2))
        # eyebrows: thick and straight for men, thin and arched for women
        bw = ew + rng.uniform(2, 5)
        if male:
            d.line(pts((ex - bw, brow_y + 1), (ex + bw, brow_y - 1)), fill=facial_hair, width=w(rng.uniform(4.5, 6)))
        else:
            d.arc(box(ex - bw, brow_y - 3, ex + bw, brow_y + 9), 200, 340, fill=facial_hair, width=w(2.5))

    # nose
    nose_y = cy + fh * rng.uniform(0.2, 0.3)
    d.line(pts((cx, eye_y + 4), (cx + rng.uniform(-4, 4), nose_y), (cx + 3, nose_y + 2)), fill=_scale(skin, 0.72), width=w(2))

    # mouth: an open smile with teeth, or closed lips
    mw = fw * rng.uniform(0.3, 0.38) * (1.3 if a["Smiling"] else 1.0)
    lips = _mix(_LIPSTICK[rng.integers(len(_LIPSTICK))], (0, 0, 0), rng.uniform(0, 0.1)) if a["Wearing_Lipstick"] \
        else _mix(_scale(skin, 0.8), (150, 80, 80), 0.3)
    lip_width = rng.uniform(3.5, 5) if a["Wearing_Lipstick"] else rng.uniform(2, 3.5)
    if a["Smiling"]:
        mh = rng.uniform(11, 15)
        d.pieslice(box(cx - mw, mouth_y - mh, cx + mw, mouth_y + mh), 0, 180, fill=(250, 250, 245))
        d.pieslice(box(cx - mw * 0.86, mouth_y - mh * 0.35, cx + mw * 0.86, mouth_y + mh * 0.85), 0, 180, fill=(90, 20, 30))
        d.pieslice(box(cx - mw, mouth_y - mh, cx + mw, mouth_y + mh), 0, 180, outline=lips, width=w(lip_width))
        mouth_bottom = mouth_y + mh
    else:
        lh = lip_width + rng.uniform(0, 2)
        d.ellipse(box(cx - mw, mouth_y - lh, cx + mw, mouth_y + lh), fill=lips)
        d.line(pts((cx - mw, mouth_y), (cx + mw, mouth_y + rng.uniform(-1, 1))), fill=_scale(lips, 0.55), width=w(1.5))
        mouth_bottom = mouth_y + lh

    # facial hair
    if a["Mustache"]:
        mh_w = mw * rng.uniform(1.0, 1.25)
        thick = rng.uniform(6, 9)
        d.chord(box(cx - mh_w, mouth_y - thick * 2 - 1, cx + mh_w, mouth_y - 1), 180, 360, fill=facial_hair)
        if rng.random() < 0.3:  # drooping ends
            for side in (-1, 1):
                d.line(pts((cx + side * mh_w * 0.95, mouth_y - thick), (cx + side * mh_w, mouth_y + 6)), fill=facial_hair, width=w(4))
    if a["Goatee"]:
        gw = mw * rng.uniform(0.55, 0.8)
        g0 = mouth_bottom + 3
        if rng.random() < 0.5:
            d.ellipse(box(cx - gw, g0, cx + gw, chin + 4), fill=facial_hair)
        else:
            d.polygon(pts((cx - gw, g0), (cx + gw, g0), (cx + gw * 0.6, chin + 3), (cx - gw * 0.6, chin + 3)), fill=facial_hair)

    # eyeglasses
    if a["Eyeglasses"]:
        frame = _FRAMES[rng.integers(len(_FRAMES))]
        width = w(rng.uniform(3.5, 5.5))
        r = rng.uniform(12, 15)
        rh = r * rng.uniform(0.7, 1.0)
        dark = rng.random() < 0.15  # sunglasses
        round_lens = rng.random() < 0.5
        for side in (-1, 1):
            ex = cx + side * eye_dx
            lens = box(ex - r, eye_y - rh, ex + r, eye_y + rh)
            fill = (24, 24, 30) if dark else None
            if round_lens:
                d.ellipse(lens, outline=frame, width=width, fill=fill)
            else:
                d.rounded_rectangle(lens, radius=4 * k, outline=frame, width=width, fill=fill)
            d.line(pts((ex + side * r, eye_y - rh * 0.4), (cx + side * fw, eye_y - 2)), fill=frame, width=width)
        d.line(pts((cx - eye_dx + r, eye_y - 2), (cx + eye_dx - r, eye_y - 2)), fill=frame, width=width)

    # hat, sitting above the hairline so that a strip of hair still shows under it
    if a["Wearing_Hat"]:
        colour = _hsv(rng, (0.45, 0.95), (0.45, 0.95))
        band = _hsv(rng, (0.3, 0.9), (0.2, 0.9))
        brim_y = hairline - rng.uniform(5, 10) - (6 if a["Bangs"] else 0)
        hw = fw + rng.uniform(4, 8)
        kind = rng.integers(3)
        if kind == 0:  # beanie
            d.chord(box(cx - hw, brim_y - fh * 0.9, cx + hw, brim_y + fh * 0.9), 180, 360, fill=colour)
            d.rectangle(box(cx - hw, brim_y - 12, cx + hw, brim_y), fill=band)
            if rng.random() < 0.5:
                d.ellipse(box(cx - 9, brim_y - fh * 0.9 - 12, cx + 9, brim_y - fh * 0.9 + 6), fill=band)
        elif kind == 1:  # cap with a visor
            d.chord(box(cx - hw, brim_y - fh * 0.8, cx + hw, brim_y + fh * 0.8), 180, 360, fill=colour)
            off = rng.uniform(-0.5, 0.5) * fw
            d.chord(box(cx - hw * 0.9 + off, brim_y - 8, cx + hw * 1.1 + off, brim_y + 10), 0, 180, fill=_scale(colour, 0.75))
        else:  # brimmed hat
            crown = fw * rng.uniform(0.7, 0.85)
            d.rounded_rectangle(box(cx - crown, brim_y - fh * rng.uniform(0.75, 0.95), cx + crown, brim_y), radius=8 * k, fill=colour)
            d.rectangle(box(cx - crown, brim_y - 14, cx + crown, brim_y - 5), fill=band)
            bw = fw * rng.uniform(1.45, 1.7)
            d.ellipse(box(cx - bw, brim_y - 8, cx + bw, brim_y + 5), fill=_scale(colour, 0.85))

    return img.reduce(_SUPERSAMPLE)


def toy_face(seed: int, index: int) -> tuple[Image.Image, dict[str, bool], list[str]]:
    """Face ``index`` of the dataset with ``seed``: (256 px RGB image, attributes, 10 captions:
    ``GRAMMAR_CAPTIONS`` sentences of the caption grammar, then everyday prompts).

    It depends only on ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    attributes = sample_attributes(rng)
    image = draw_face(attributes, rng)
    caption_seed = int(rng.integers(2**31))
    captions = captions_for_attributes(attributes, n=GRAMMAR_CAPTIONS, seed=caption_seed)
    captions += everyday_captions(attributes, n=CAPTIONS_PER_FACE - GRAMMAR_CAPTIONS, seed=caption_seed + 1)
    return image, attributes, captions


def iter_toyfaces(n: int, *, seed: int = 0, start: int = 0) -> Iterator[tuple[Image.Image, dict[str, bool], list[str]]]:
    """Faces ``start .. start + n - 1`` of seed ``seed``, as ``toy_face`` gives them."""
    for index in range(start, start + n):
        yield toy_face(seed, index)


def toyface_file(index: int) -> str:
    """The image file name of face ``index`` (``000042.png``)."""
    return f"{index:06d}.png"


def write_toyfaces(
    out_dir: str | os.PathLike,
    *,
    n: int,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` toy faces as a captioned image folder and return the folder.

    ``DIR/000000.png`` (256 px RGB), ``DIR/000000.txt`` (its captions, one per line) and
    ``DIR/attributes.csv`` (header ``file,<TOY_ATTRIBUTES>``, one 0/1 row per image, written last
    and atomically). ``on_progress(done, n)`` is called after every image. The same ``n`` and
    ``seed`` always give the same files.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 image, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, attributes, captions) in enumerate(iter_toyfaces(n, seed=seed)):
        name = toyface_file(index)
        image.save(out / name, compress_level=1)
        (out / name).with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        rows.append([name] + [int(attributes[a]) for a in TOY_ATTRIBUTES])
        if on_progress is not None:
            on_progress(index + 1, n)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", *TOY_ATTRIBUTES])
    writer.writerows(rows)
    atomic_write_bytes(out / "attributes.csv", buffer.getvalue().encode("utf-8"))
    return out


def read_attributes_csv(path: str | os.PathLike) -> dict[str, dict[str, bool]]:
    """``attributes.csv`` of a toy faces folder -> ``{file: {attribute: bool}}``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = [c for c in (reader.fieldnames or []) if c != "file"]
        return {row["file"]: {name: row[name] == "1" for name in names} for row in reader}


# command line: python -m helpers toyfaces --n N --out DIR [--seed S]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of faces")
    parser.add_argument("--out", required=True, help="output folder (images, captions, attributes.csv)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(total=args.n, desc="toy faces", unit="img") as bar:
        out = write_toyfaces(args.out, n=args.n, seed=args.seed, on_progress=lambda done, total: bar.update(1))
    seconds = time.perf_counter() - start
    print(f"wrote {args.n} toy faces to {out} ({args.n / seconds:.0f} images/s)")
    return 0
