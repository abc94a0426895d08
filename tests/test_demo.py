"""The embedded demo shipped in assets/: it loads, generates, and follows the text.

A regression guard, not the full measurement (that is `measure_quality`, run by
`python -m helpers build-demo` and recorded in assets/demo_report.json).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from helpers.attributes import load_attribute_classifier, predict_attributes
from helpers.assets import ASSETS
from helpers.sample import generate, load_generator
from helpers.tools.build_demo import pairwise_distance
from helpers.toyfaces import TOY_ATTRIBUTES

# prompt -> attributes the images must show (and, with a "-" prefix, must not show)
CHECKS = {
    "The woman has blond hair and wears eyeglasses.": ["Blond_Hair", "Eyeglasses", "-Male"],
    "The man has black hair and a goatee.": ["Black_Hair", "Goatee", "Male"],
    "This man wears a hat and is smiling.": ["Wearing_Hat", "Smiling", "Male"],
    "She has gray hair and wears lipstick.": ["Gray_Hair", "Wearing_Lipstick", "-Male"],
    "a blonde lady with glasses": ["Blond_Hair", "Eyeglasses", "-Male"],
    "a grey-haired man wearing a cap": ["Gray_Hair", "Wearing_Hat", "Male"],
}


@pytest.fixture(scope="module")
def demo():
    return load_generator(None, device="cpu")


def test_assets_are_small_and_complete():
    names = ["demo_clip.pt", "demo_generator.pt", "demo_grid.png", "demo_report.json", "attribute_classifier.pt",
             "demo_before_after.png"]
    sizes = {n: (ASSETS / n).stat().st_size for n in names}
    assert sum(sizes.values()) < 40 * 2**20, sizes
    report = json.loads((ASSETS / "demo_report.json").read_text())
    quality = report["quality"]
    # The recorded measurement (README, "The embedded demo"): the 256 px images follow the
    # text (accuracy 0.994, every attribute's recall at least 0.97: the targets are 0.97 and
    # 0.85), the condition carries every attribute (the noise-free condition: probe 1.00),
    # the images vary across noises as much as real faces that share their attributes (0.91,
    # every stage at least 0.91: the target is 0.9), the periodic grid is about as strong as real
    # faces' spikes (artifact index 1.18x; target 1.5x),
    # and the listed prompts are drawn (32 images each: each shows at least 0.94 of what it asks,
    # 95% of the images all of it).
    assert quality["attribute_accuracy"] == quality["per_stage"]["256"]["mean"] >= 0.97
    assert quality["min_recall"] >= 0.85
    assert quality["attribute_accuracy"] > quality["majority_baseline"] + 0.1
    assert quality["condition_probe"]["min_sampled"] >= 0.99
    assert quality["diversity"]["ratio"] >= 0.9
    # per stage (1.06 / 0.94 / 0.91): the last is the ratio
    stages = quality["diversity"]["per_stage"]
    assert stages["256"] == quality["diversity"]["ratio"] and min(stages.values()) >= 0.9
    assert quality["artifact_index"]["ratio"] <= 1.5
    # eye counts against real faces (0.31: one eye-like mark in 22.5% of the faces without glasses; asked
    # for eyeglasses 0.40, README)
    assert quality["eyes"]["distance"] < 0.35 and set(quality["eyes"]["groups"]) == {"Eyeglasses", "no Eyeglasses"}
    assert quality["prompts"]["seeds"] == 32
    assert quality["prompts"]["min_shown"] >= 0.9 and quality["prompts"]["mean_all"] >= 0.95
    # the demo CLIP understands grammar captions, everyday prompts and the listed prompts (target 0.95)
    assert min(report["clip_retrieval"][k]["attribute_match"] for k in ("grammar", "everyday", "prompts")) >= 0.95
    # the build's record: the defaults of `build-demo`, and its time, which is the machine's (README)
    assert (report["seed"], report["num_faces"], report["clip_steps"], report["gan_steps"]) == (0, 12000, 1500, 2500)
    assert report["total_minutes"] == round(sum(report["timings_s"].values()) / 60, 1)
    assert report["threads"] == 2 and report["device"] == "cpu"


def test_the_shipped_generator_is_the_demo_preset_network():
    # `build-demo` trains the `demo` preset: a preset changed without rebuilding the demo fails here
    from helpers.checkpoint import read_generator
    from helpers.config import model_preset
    from helpers.tools.demo_clip import DEMO_CLIP_CONFIG

    stored = read_generator(ASSETS / "demo_generator.pt")
    assert stored.model_config == model_preset("demo", text_dim=DEMO_CLIP_CONFIG["embed_dim"])


def test_demo_generates_all_three_stages(demo):
    assert demo.clip_spec == "demo" and demo.num_stages == 3
    images = generate(["The woman has blond hair."], n=2, seed=0, model=demo)
    assert [tuple(x.shape) for x in images] == [(2, 3, 64, 64), (2, 3, 128, 128), (2, 3, 256, 256)]
    assert all(x.min() >= -1 and x.max() <= 1 for x in images)
    again = generate(["The woman has blond hair."], n=2, seed=0, model=demo)
    assert torch.equal(images[-1], again[-1])


def test_demo_follows_the_prompt(demo):
    prompts = list(CHECKS)
    n = 6
    images = generate(prompts, n=n, seed=100, model=demo)[-1]  # 256 px
    seen = predict_attributes(images, classifier=load_attribute_classifier(device="cpu"))
    hits = []
    for p, prompt in enumerate(prompts):
        for want in CHECKS[prompt]:
            column = TOY_ATTRIBUTES.index(want.lstrip("-"))
            shown = seen[p * n : (p + 1) * n, column]
            hits.append((~shown if want.startswith("-") else shown).float().mean().item())
    # Chance for these attributes is 10-50% (about 0.35 on average here); measured: 0.98 (every
    # check 1.0 but the capped man's gray hair, 0.67); the demo with the sampled condition: 0.79.
    assert sum(hits) / len(hits) > 0.85, hits


def test_demo_is_not_mode_collapsed(demo):
    images = generate(["The man has brown hair."], n=6, seed=7, model=demo)[-1]
    # measured: 0.47 (the previous demo 0.30); identical images give 0; real toy faces sharing attributes about 0.47
    assert pairwise_distance(images) > 0.15


def test_pairwise_distance():
    x = torch.zeros(3, 3, 4, 4)
    assert pairwise_distance(x) == 0
    x[0] = 1
    # two of the three pairs differ by 1 everywhere (RMS 1), one pair is equal
    assert abs(pairwise_distance(x) - 2 / 3) < 1e-9


def test_the_readme_notebook_and_widget_prompts_are_ones_the_demo_is_measured_on():
    """Every example prompt a user meets first is in the build's measured list (prompt_check)."""
    from helpers.tools.build_demo import DEMO_PROMPTS, PROMPT_ATTRIBUTES
    from helpers.widget import DEFAULT_PROMPT

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    commands = re.findall(r"python -m helpers sample ((?:\"[^\"]+\"\s*(?:\\\n\s*)?)+)", readme)
    prompts = [p for group in commands for p in re.findall(r'"([^"]+)"', group)]
    prompts += re.findall(r'generate\(\["([^"]+)"\]', readme)
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        source = "".join(line for cell in json.loads(notebook.read_text())["cells"] for line in cell["source"])
        prompts += re.findall(r'PROMPT\w* = "([^"]+)"', source)
    assert len(prompts) >= 8, prompts  # the quick start, the sampling section, notebooks 02 and 04
    prompts += [DEFAULT_PROMPT, *DEMO_PROMPTS]
    assert not set(prompts) - set(PROMPT_ATTRIBUTES), sorted(set(prompts) - set(PROMPT_ATTRIBUTES))


def test_the_prompt_check_gives_every_image_noise_of_its_own(tiny_clip, seed_recorder):
    """The listed prompts' check draws each image with its own noise: the same few noise vectors for every
    prompt made its lowest score hinge on those draws (one generator read 0.88-0.96 across seeds with 8)."""
    from helpers.tools.build_demo import PROMPT_ATTRIBUTES, prompt_check

    path, calls = seed_recorder
    check = prompt_check(path, tiny_clip, seeds=3, seed=5)
    seeds = [s for call in calls for s in call]
    assert len(seeds) == 3 * len(PROMPT_ATTRIBUTES) and len(set(seeds)) == len(seeds), calls
    prompt_check(path, tiny_clip, seeds=3, seed=6)  # another evaluation seed draws other noise, not the same shifted
    assert not set(calls[-1]) & set(seeds), calls
    assert check["seeds"] == 3 and set(check["per_prompt"]) == set(PROMPT_ATTRIBUTES)
    for scores in check["per_prompt"].values():
        # shown: a share of 3 images x (asked + gender) checks; all: a share of the 3 images
        assert 0 <= scores["all"] <= scores["shown"] <= 1 and round(scores["all"] * 3, 6) % 1 == 0
    assert check["min_shown"] == min(p["shown"] for p in check["per_prompt"].values())
