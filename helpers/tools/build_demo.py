"""The embedded demo: build it from scratch, and measure what it learned (a maintainer tool).

``python -m helpers build-demo`` draws toy faces, trains the demo CLIP on them,
extracts features with it, trains the ``demo`` generator preset with the
project's own trainer, and writes to ``assets/``:

- ``demo_clip.pt``: the demo CLIP (``load_clip("demo")``);
- ``demo_generator.pt``: the EMA generator, its config and CLIP spec
  (``load_generator(None)``);
- ``demo_grid.png``: an example grid for the README;
- ``demo_report.json``: the CLIP's retrieval and the generator's quality numbers.

Quality (``measure_quality``): images generated from held-out captions are
judged by the toy faces attribute classifier (does "blond hair, eyeglasses"
give blond hair and eyeglasses?), and diversity across seeds is compared with
real toy faces that share the same attributes (mode collapse check).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assets import ASSETS, DEMO_BEFORE_AFTER, DEMO_CLIP, DEMO_GENERATOR, DEMO_GRID, DEMO_REPORT
from .quality import measure_quality, pairwise_distance, toyface_features, toyface_folder  # noqa: F401 (re-exported)
from ..errors import UserError
from ..files import write_json

# Prompts the demo is measured on (CLIP retrieval and what the generator draws), with the toy
# attributes each asks for (every other one is asked absent). The README's and the notebooks'
# example prompts come from this list; half are in the caption grammar, half in everyday words.
PROMPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "The woman has blond hair and wears eyeglasses.": ("Blond_Hair", "Eyeglasses"),
    "The man has black hair and a goatee, and is smiling.": ("Male", "Black_Hair", "Goatee", "Smiling"),
    "She has brown hair with bangs and wears lipstick.": ("Brown_Hair", "Bangs", "Wearing_Lipstick"),
    "The man has gray hair and wears a hat.": ("Male", "Gray_Hair", "Wearing_Hat"),
    "The man has brown hair and a mustache.": ("Male", "Brown_Hair", "Mustache"),
    "The woman has black hair and is smiling.": ("Black_Hair", "Smiling"),
    "a blonde lady with glasses": ("Blond_Hair", "Eyeglasses"),
    "a smiling guy with dark hair and a beard": ("Male", "Smiling", "Black_Hair", "Goatee"),
    "a grey-haired man wearing a cap": ("Male", "Gray_Hair", "Wearing_Hat"),
    "brunette girl with a fringe and red lips": ("Brown_Hair", "Bangs", "Wearing_Lipstick"),
    "a man with black hair, a moustache and spectacles": ("Male", "Black_Hair", "Mustache", "Eyeglasses"),
    "a happy blonde woman wearing a hat": ("Smiling", "Blond_Hair", "Wearing_Hat"),
}
# The README's example grid: two grammar sentences and two everyday prompts.
DEMO_PROMPTS = (
    "The woman has blond hair and wears eyeglasses.",
    "The man has black hair and a goatee, and is smiling.",
    "a grey-haired man wearing a cap",
    "brunette girl with a fringe and red lips",
)


def _log(on_log: Callable[[str], None] | None, message: str) -> None:
    if on_log is not None:
        on_log(message)


def load_toyfaces_folder(folder: str | os.PathLike, *, size: int = 64, ids: list[str] | None = None):
    """(images uint8 [N, size, size, 3], captions N lists, attributes bool [N, A], names) of a toy faces folder."""
    from PIL import Image

    from ..toyfaces import TOY_ATTRIBUTES, read_attributes_csv

    folder = Path(folder)
    table = read_attributes_csv(folder / "attributes.csv")
    files = sorted(table) if ids is None else [f"{i}.png" if not i.endswith(".png") else i for i in ids]
    images, captions, attributes = [], [], []
    for name in files:
        with Image.open(folder / name) as im:
            images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BOX)))
        captions.append([line for line in (folder / name).with_suffix(".txt").read_text().splitlines() if line.strip()])
        attributes.append([table[name][a] for a in TOY_ATTRIBUTES])
    return np.stack(images), captions, np.array(attributes, dtype=bool), list(TOY_ATTRIBUTES)


def build_demo(
    work_dir: str | os.PathLike = "runs/demo-build",
    *,
    assets_dir: str | os.PathLike = ASSETS,
    seed: int = 0,
    num_faces: int = 12000,
    clip_steps: int = 1500,
    gan_steps: int = 2500,
    device: str | torch.device | None = None,
    on_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rebuild the demo CLIP and generator from scratch; returns the report dict.

    Deterministic for ``seed`` on a given machine. Intermediate files (toy faces,
    features, the training run) go to ``work_dir``; the shipped files to ``assets_dir``.
    """
    from ..checkpoint import export_generator
    from ..files import copy_atomic
    from ..clip_encoder import load_clip, save_clip
    from ..extract import assign_split
    from ..run_folder import latest_checkpoint
    from ..train import train
    from .demo_clip import DEMO_CLIP_CONFIG, train_clip

    work, assets = Path(work_dir), Path(assets_dir)
    assets.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(on_log, f"{name}: {timings[name]:.0f} s")

    t0 = time.perf_counter()
    faces = toyface_folder(work, num_faces=num_faces, seed=seed)
    lap("toy faces", t0)

    # The CLIP learns from the training split only: the test split stays held out.
    t0 = time.perf_counter()
    ids = sorted(p.stem for p in faces.glob("*.png"))
    split, _ = assign_split(ids, "auto", kind="folder", seed=seed)
    train_ids = [i for i, s in zip(ids, split) if s == "train"]
    test_ids = [i for i, s in zip(ids, split) if s == "test"]
    work_clip = work / DEMO_CLIP.name
    if work_clip.is_file():  # a rerun after an interruption reuses the trained CLIP
        clip_model = load_clip(str(work_clip), device="cpu").model
    else:
        images, captions, _, _ = load_toyfaces_folder(faces, ids=train_ids)
        clip_model = train_clip(images, captions, steps=clip_steps, seed=seed, config=DEMO_CLIP_CONFIG)
    t_images, t_captions, t_attrs, names = load_toyfaces_folder(faces, ids=test_ids)
    retrieval = clip_retrieval(clip_model, t_images, t_captions, t_attrs, names, seed=seed)
    if not work_clip.is_file():
        save_clip(work_clip, clip_model, model_cfg=DEMO_CLIP_CONFIG,
                  meta=dict(seed=seed, steps=clip_steps, train_images=len(train_ids), retrieval=retrieval,
                            train_seconds=round(time.perf_counter() - t0, 1)))
        lap("demo CLIP", t0)
    else:  # the time it took when it was trained, so that the total stays that of a whole build
        meta = torch.load(work_clip, map_location="cpu", weights_only=False).get("meta", {})
        timings["demo CLIP"] = float(meta.get("train_seconds", time.perf_counter() - t0))
    _log(on_log, f"demo CLIP retrieval (top-1 attribute match among 100 held-out): grammar "
                 f"{retrieval['grammar']['attribute_match']:.3f}, everyday {retrieval['everyday']['attribute_match']:.3f}, "
                 f"prompts {retrieval['prompts']['attribute_match']:.3f}")

    t0 = time.perf_counter()
    clip = load_clip(str(work_clip), device=device)
    clip.spec = "demo"  # the features, the run and the shipped generator all name the embedded CLIP
    features = toyface_features(work, num_faces=num_faces, seed=seed, clip=clip, device=device)
    lap("extraction", t0)

    t0 = time.perf_counter()
    run_dir = work / "run"
    resume = latest_checkpoint(run_dir).is_file()
    result = train(features, run_dir, demo_train_config(gan_steps, seed=seed), clip=clip, device=device, resume=resume)
    lap("generator training", t0)

    # the run's clip_spec is "demo" (set above), so the export names the embedded CLIP
    generator_path = export_generator(result.checkpoint, work / DEMO_GENERATOR.name)

    t0 = time.perf_counter()
    quality = measure_quality(generator_path, features, seed=seed, clip=clip)
    quality["prompts"] = prompt_check(generator_path, clip, seed=seed)
    lap("quality", t0)
    write_example_grid(generator_path, work / DEMO_GRID.name, clip=clip)
    # Ship: the CLIP, the generator and the grid are copied into assets/ together, at the end.
    for name in (DEMO_CLIP.name, DEMO_GENERATOR.name, DEMO_GRID.name):
        copy_atomic(work / name, assets / name)

    report = dict(
        seed=seed, num_faces=num_faces, clip_steps=clip_steps, gan_steps=gan_steps,
        clip_retrieval=retrieval, quality=quality, timings_s=timings,
        total_minutes=round(sum(timings.values()) / 60, 1),
        device=str(clip.device), threads=torch.get_num_threads(),
    )
    write_json(assets / DEMO_REPORT.name, report)
    return report


def clip_retrieval(
    model, images: np.ndarray, captions: list[list[str]], attributes: np.ndarray, names: list[str], *, seed: int = 0,
) -> dict[str, Any]:
    """The demo CLIP's top-1 retrieval on held-out toy faces, three ways: one grammar caption per
    image, one everyday prompt per image (the toy faces' last captions), and ``PROMPT_ATTRIBUTES``."""
    from ..toyfaces import GRAMMAR_CAPTIONS
    from .demo_clip import prompt_retrieval, retrieval_top1

    rng = np.random.default_rng(seed)
    pool = min(100, len(images))
    out = {}
    for kind, choices in (("grammar", [c[:GRAMMAR_CAPTIONS] for c in captions]),
                          ("everyday", [c[GRAMMAR_CAPTIONS:] or c for c in captions])):
        one = [caps[int(rng.integers(len(caps)))] for caps in choices]
        out[kind] = retrieval_top1(model, images, one, attributes, pool=pool, seed=seed)
    out["prompts"] = prompt_retrieval(model, images, attributes, list(PROMPT_ATTRIBUTES.items()), names,
                                      pool=pool, seed=seed)
    return out


@torch.no_grad()
def prompt_check(generator_path: str | os.PathLike, clip, *, seeds: int = 32, seed: int = 0) -> dict[str, Any]:
    """What the generator draws for each of ``PROMPT_ATTRIBUTES`` (``seeds`` images, last stage).

    Every image has noise of its own (prompt ``p``'s image ``j`` seed ``(seed * P + p) * seeds + j`` for
    P prompts), so a prompt's score is an average over draws of z, not a verdict on a few noise vectors
    shared by all, and another ``seed`` draws other noise.

    Per prompt: ``shown``, the share of its asked attributes (gender included: "Male" for a
    man, its absence for a woman) that the toy-face classifier finds, averaged over the
    images; ``all``: the share of images that show every one of them. ``min_shown``: the
    lowest ``shown`` over prompts.
    """
    from ..attributes import load_attribute_classifier, predict_attributes
    from ..sample import generate_from_features, load_generator
    from ..toyfaces import TOY_ATTRIBUTES

    model = load_generator(generator_path, device="cpu")
    prompts = list(PROMPT_ATTRIBUTES)
    text = clip.encode_text(prompts).cpu().repeat_interleave(seeds, dim=0)
    first = seed * len(prompts) * seeds
    images = generate_from_features(model, text, [first + j for j in range(len(prompts) * seeds)])[-1]
    predicted = predict_attributes(images, classifier=load_attribute_classifier()).view(len(prompts), seeds, -1)
    male = TOY_ATTRIBUTES.index("Male")
    per_prompt = {}
    for prompt, shown in zip(prompts, predicted):
        asked = [TOY_ATTRIBUTES.index(a) for a in PROMPT_ATTRIBUTES[prompt] if a != "Male"]
        gender_ok = shown[:, male] == ("Male" in PROMPT_ATTRIBUTES[prompt])
        checks = torch.cat([shown[:, asked], gender_ok[:, None]], dim=1).float()  # [seeds, asked + 1]
        per_prompt[prompt] = dict(shown=float(checks.mean()), all=float(checks.min(dim=1).values.mean()))
    return dict(per_prompt=per_prompt, min_shown=min(p["shown"] for p in per_prompt.values()),
                mean_all=float(np.mean([p["all"] for p in per_prompt.values()])), seeds=seeds)


def demo_train_config(steps: int, *, seed: int = 0):
    """The ``demo`` training preset as the embedded demo uses it.

    No DiffAugment: colour jitter would blur the hair-colour attributes D must
    judge, cutout would hide the small accessories, and translation let every
    stage draw its faces alike (README, "Without translation"). The CLIP loss
    acts at 64 px as well as at the last stage (the demo CLIP looks at 64 px
    images, so it is cheap there). The mode-seeking term, three times over on
    the 64 px stage only, keeps the noise in use where the layout is drawn:
    without it, one prompt gave nearly the same face for every seed.
    """
    from ..train import train_preset

    return train_preset(
        "demo", steps=steps, seed=seed, diffaugment="", clip_stages=[0, -1], mode_seeking_weight=3.0,
        mode_seeking_stages=[0], checkpoint_every=250, preview_every=500, snapshot_every=2500,
    )


def standing_export(generator_path: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike,
                    cfg: Any) -> Path:
    """An export of ``generator_path`` with its BatchNorm statistics recomputed for its weights: what a
    run with the ``TrainConfig`` ``cfg`` (its ``ema_standing_stats``, ``batch_size`` and ``seed``) on
    ``features`` saves (the same training captions and noise)."""
    from ..checkpoint import read_generator, save_generator
    from ..features import FeaturesDataset
    from ..network import Generator, standing_statistics
    from ..train import standing_text

    stored = read_generator(generator_path)
    generator = Generator(stored.model_config)
    generator.load_state_dict(stored.G_ema)
    text = standing_text(FeaturesDataset(features, split="train", num_stages=1), cfg)
    generator.load_state_dict(standing_statistics(generator, text, batch_size=cfg.batch_size, seed=cfg.seed + 3))
    return save_generator(out, generator, clip_spec=stored.clip_spec, step=stored.step,
                          clip_identity=stored.clip_identity)


def write_example_grid(generator_path: str | os.PathLike, out: str | os.PathLike, *, clip, seed: int = 0) -> Path:
    """The README's example: the demo prompts x 4 seeds at 128 px, with captions."""
    from ..pictures import prompt_grid, save_png
    from ..sample import generate_from_features, load_generator

    model = load_generator(generator_path, device="cpu")
    seeds = [seed + j for j in range(4)]
    text = clip.encode_text(list(DEMO_PROMPTS)).cpu().repeat_interleave(len(seeds), dim=0)
    images = generate_from_features(model, text, seeds * len(DEMO_PROMPTS))
    picture = prompt_grid(images[-1], list(DEMO_PROMPTS), seeds, size=128)
    return save_png(picture, out, optimize=True)


def write_before_after(
    before: str | os.PathLike, out: str | os.PathLike, *, after: str | os.PathLike | None = None,
    prompts: tuple[str, ...] = DEMO_PROMPTS[:3], seeds: int = 3, size: int = 160,
) -> Path:
    """A picture of two demos side by side: the same prompts and seeds, 256 px images at ``size`` px.

    before / after: folders with a ``demo_generator.pt`` and the ``demo_clip.pt`` it was
    trained with (``after`` None: the shipped assets). Each row is a prompt; the first
    ``seeds`` columns are the earlier demo's, the others the later one's.
    """
    from ..clip_encoder import load_clip
    from ..pictures import save_png, tile_grid, to_pil_list
    from ..sample import generate_from_features, load_generator

    tiles_by_side = []
    for folder in (Path(before), Path(after) if after is not None else ASSETS):
        clip = load_clip(str(folder / DEMO_CLIP.name), device="cpu")
        model = load_generator(folder / DEMO_GENERATOR.name, device="cpu")
        text = clip.encode_text(list(prompts)).cpu().repeat_interleave(seeds, dim=0)
        images = generate_from_features(model, text, list(range(seeds)) * len(prompts))[-1]
        tiles_by_side.append(to_pil_list(images))
    tiles = [tile for p in range(len(prompts)) for side in tiles_by_side for tile in side[p * seeds : (p + 1) * seeds]]
    labels = [f"before, seed {j}" for j in range(seeds)] + [f"after, seed {j}" for j in range(seeds)]
    picture = tile_grid(tiles, cols=2 * seeds, size=size, row_labels=list(prompts), col_labels=labels)
    return save_png(picture, out, optimize=True)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="runs/demo-build", help="where intermediate files go")
    parser.add_argument("--assets-dir", default=str(ASSETS), help="where the demo files are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-faces", type=int, default=12000, help="toy faces to draw")
    parser.add_argument("--clip-steps", type=int, default=1500, help="demo CLIP training steps")
    parser.add_argument("--gan-steps", type=int, default=2500, help="generator training steps")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--before-after", metavar="DIR", default=None,
                        help="only draw ASSETS/demo_before_after.png: DIR's demo_generator.pt and demo_clip.pt "
                             "(an earlier demo) beside the shipped ones, same prompts and seeds")
    parser.add_argument("--measure-only", action="store_true",
                        help="only measure the shipped generator again (on WORK_DIR/features.pt) and update the report")
    parser.add_argument("--standing-stats", type=int, default=0, metavar="N",
                        help="with --measure-only: measure the shipped generator with its BatchNorm statistics "
                             "recomputed from N batches of training captions (written to WORK_DIR, the report "
                             "left as it is)")


def run(args: argparse.Namespace) -> int:
    if args.standing_stats and not args.measure_only or args.standing_stats < 0:
        raise UserError(f"--standing-stats takes a number of batches >= 1 and goes with --measure-only "
                        f"(got {args.standing_stats}{'' if args.measure_only else ' without --measure-only'})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.before_after:
        print(write_before_after(args.before_after, Path(args.assets_dir) / DEMO_BEFORE_AFTER.name,
                                 after=args.assets_dir))
        return 0
    if args.measure_only:
        from ..clip_encoder import load_clip

        features = Path(args.work_dir) / "features.pt"
        generator = Path(args.assets_dir) / DEMO_GENERATOR.name
        if args.standing_stats:
            import dataclasses

            cfg = dataclasses.replace(demo_train_config(1, seed=args.seed), ema_standing_stats=args.standing_stats)
            generator = standing_export(generator, features, Path(args.work_dir) / f"standing{args.standing_stats}.pt",
                                        cfg)
        clip = load_clip(str(Path(args.assets_dir) / DEMO_CLIP.name), device="cpu")
        clip.spec = "demo"
        quality = measure_quality(generator, features, seed=args.seed, clip=clip)
        quality["prompts"] = prompt_check(generator, clip, seed=args.seed)
        if not args.standing_stats:  # the report describes the shipped generator as shipped
            report_path = Path(args.assets_dir) / DEMO_REPORT.name
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            report["quality"] = quality
            write_json(report_path, report)
        print(json.dumps(quality, indent=2))
        return 0
    report = build_demo(
        args.work_dir, assets_dir=args.assets_dir, seed=args.seed, num_faces=args.num_faces,
        clip_steps=args.clip_steps, gan_steps=args.gan_steps, device=args.device, on_log=print,
    )
    print(json.dumps(report, indent=2))
    return 0
