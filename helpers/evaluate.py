"""Evaluation with a recorded protocol: ``python -m helpers evaluate``.

A checkpoint (or the embedded demo model) is scored against the test split of a
features file:

- prompts: one caption per generated image, from the test split (image i uses
  test image ``order[i % T]`` for a seeded order, and cycles through its
  captions when there are more images than test images); noise seed ``seed + i``;
- real images for FID/KID: every test image, area-downsampled from 256 px to the
  evaluated stage's resolution (the way training sees them);
- generated and real images are quantised to uint8, as a saved PNG would be;
- FID / KID on the features of one extractor (Inception-v3 pool3 by default
  where its weights can be fetched, else a named stand-in), CLIP score and
  R-precision with the checkpoint's CLIP (see ``helpers.metrics``), and
  attribute accuracy with the toy faces classifier when the features are toy
  faces (their attributes are what every caption describes).

The report is a JSON-ready dict: ``fid``, ``kid``, ``kid_std``, ``clip_score``,
``r_precision``, ``attribute_accuracy`` (only where applicable), ``per_stage``
(with ``--stage all``) and ``protocol`` (everything needed to reproduce or
compare the numbers). Results are deterministic for a seed on one device.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError
from .config import STAGE_CHOICES, STORED_IMAGE_SIZE, describe_stages, stage_resolution
from .errors import UserError
from .files import write_json

EXTRACTORS = ("auto", "inception", "clip", "random-conv")
DEFAULT_BATCH_SIZE = 32
R_PRECISION_CANDIDATES = 100


# --------------------------------------------------------------------------- pieces


def load_feature_extractor(
    name: str, *, clip: nn.Module | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, str | None]:
    """The FID/KID feature extractor called ``name`` (one of ``EXTRACTORS``) on ``device``.

    ``auto``: Inception-v3 when its weights load (cached or downloadable), else the
    CLIP image encoder ``clip``. Returns (extractor with ``.name`` and
    ``.num_features``, a note for the report when ``auto`` fell back, else None).
    """
    from .metrics import ClipImageFeatures, InceptionFeatures, RandomConvFeatures

    if name not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
    note = None
    if name in ("auto", "inception"):
        try:
            return InceptionFeatures().to(device), None
        except RuntimeError as err:
            if name == "inception":
                raise UserError(str(err)) from err
            cause = err.__cause__ or err
            reason = f"{type(cause).__name__}: {cause}"[:120]
            note = (
                f"Inception-v3 weights unavailable ({reason}); the CLIP image encoder stood in, "
                "so FID/KID are not comparable with Inception FID figures"
            )
            name = "clip"
    if name == "clip":
        if clip is None:
            raise ValueError("the 'clip' feature extractor needs a CLIP encoder")
        return ClipImageFeatures(clip).to(device), note
    return RandomConvFeatures().to(device), note


def choose_prompts(
    captions: list[list[str]], n_images: int, *, seed: int
) -> tuple[list[str], list[int]]:
    """The prompt of every generated image and the test image it comes from.

    captions: the caption lists of the T test images (those without captions are
    skipped). Image i uses test image ``order[i % T]`` (``order`` a permutation
    seeded with ``seed``) and its caption ``(start + i // T) % count``, where
    ``start`` is a seeded random caption of that image. Returns (N prompts, N
    indices into ``captions``).
    """
    usable = [i for i, c in enumerate(captions) if len(c) > 0]
    if not usable:
        raise UserError("the test split has no captions, so there are no prompts to generate from")
    gen = torch.Generator().manual_seed(seed)
    order = [usable[int(j)] for j in torch.randperm(len(usable), generator=gen)]
    start = {i: int(torch.randint(len(captions[i]), (), generator=gen)) for i in usable}
    prompts, sources = [], []
    for k in range(n_images):
        src = order[k % len(order)]
        prompts.append(captions[src][(start[src] + k // len(order)) % len(captions[src])])
        sources.append(src)
    return prompts, sources


def _attribute_tools(data: dict[str, Any]) -> Any | None:
    """The attribute-accuracy module when the features are toy faces with their attributes.

    Only toy faces (the ``toyfaces`` source, or a folder written by ``python -m helpers
    toyfaces``, whose attributes are exactly the drawn ones): the classifier was trained on
    drawn faces, so on CelebA images (which carry 40 attributes) its verdicts would mean nothing.
    """
    from .toyfaces import TOY_ATTRIBUTES

    if "attributes" not in data:
        return None
    drawn = sorted(data["attributes"]["names"]) == sorted(TOY_ATTRIBUTES)
    if data["meta"].get("source_kind") != "toyfaces" and not drawn:
        return None
    from . import attributes

    return attributes


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as indented JSON through a temporary file and a rename."""
    return write_json(path, report)


# --------------------------------------------------------------------------- the protocol


@contextlib.contextmanager
def deterministic_kernels():
    """While active, cuDNN uses deterministic convolution algorithms (no autotuning); the
    previous settings come back afterwards. Makes a CUDA evaluation repeatable for a seed."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@deterministic_kernels()
def evaluate(
    checkpoint: Any,
    features: str | os.PathLike,
    *,
    n_images: int | None = None,
    seed: int = 0,
    stage: int | str | None = None,
    feature_extractor: str | nn.Module = "auto",
    truncation: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    r_precision_candidates: int = R_PRECISION_CANDIDATES,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score a generator on the test split of a features file; returns the report dict.

    checkpoint: a checkpoint path, a ``helpers.sample.LoadedGenerator``, or None for
    the embedded demo model. n_images: how many images to generate (default: one
    per captioned test image). stage: a stage number (``config.describe_stages``), ``"all"`` or None (the last stage).
    feature_extractor: one of ``EXTRACTORS`` or an ``nn.Module`` mapping uint8
    [B, 3, H, W] to [B, F] (its ``name`` attribute goes into the report).
    ``on_progress`` receives one line per phase (for notebooks without bars).
    """
    from tqdm.auto import tqdm

    from . import metrics, sample
    from .features import FeaturesDataset, downsample, read_features
    from .pictures import dequantize, quantize

    say = on_progress or (lambda line: None)
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 2):
        raise UserError(f"--n-images must be a whole number of at least 2 (FID needs two), got {n_images!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    model = checkpoint if isinstance(checkpoint, sample.LoadedGenerator) else sample.load_generator(checkpoint, device=device)
    device = model.device
    stages = sample.select_stages(stage, model.num_stages)

    data = read_features(features)
    test = FeaturesDataset(features, split="test", num_stages=1)
    if len(test) < 2:
        raise UserError(f"{features} has {len(test)} test image(s): FID needs at least 2")
    n = len([c for c in test.captions if c]) if n_images is None else n_images
    if n < 2:
        raise UserError(f"{features} has fewer than 2 captioned test images: pass --n-images N (N >= 2)")
    sample.check_seed(seed, n)
    prompts, sources = choose_prompts(test.captions, n, seed=seed)
    groups = torch.tensor(sources)

    clip = sample.get_clip(model.clip_spec, device=device)
    if hasattr(clip, "identity"):
        from .clip_encoder import check_same_clip

        check_same_clip(model.clip_identity, clip, what=f"the checkpoint {model.path}")
        check_same_clip(data["meta"].get("clip_identity"), clip, what=f"the features file {features}")
    if isinstance(feature_extractor, nn.Module):
        extractor, note = feature_extractor.to(device), None
    else:
        extractor, note = load_feature_extractor(feature_extractor, clip=clip, device=device)
    extractor_name = getattr(extractor, "name", type(extractor).__name__)

    attr_module = _attribute_tools(data)
    classifier, wanted_all, attr_note = None, None, None
    if attr_module is not None:
        try:
            classifier = attr_module.load_attribute_classifier(device=device)
        except CheckpointError as err:  # the weights file is not built: report the rest
            attr_note = f"attribute accuracy skipped: {err}"
    if classifier is not None:
        names = list(data["attributes"]["names"])
        values = data["attributes"]["values"][test.rows]  # [T, A] bool, test rows
        wanted_all = [dict(zip(names, map(bool, values[s].tolist()))) for s in sources]

    # generated images: streamed batch by batch, only features and embeddings are kept
    fake_feats: dict[int, list[Tensor]] = {s: [] for s in stages}
    image_embs: dict[int, list[Tensor]] = {s: [] for s in stages}
    text_embs: list[Tensor] = []
    attr_sums: dict[str, float] = {}
    asked_shown: dict[str, list[int]] = {}  # attribute -> [images asked for it, of those showing it]
    say(f"generating {n} images")
    for rows in tqdm(_batches(n, batch_size), desc="generate", disable=not progress):
        with torch.inference_mode():
            text = sample.encode_prompts(model, prompts[rows])  # [b, D], normalised
            images = sample.generate_from_features(
                model, text, list(range(seed + rows.start, seed + rows.stop)), truncation=truncation,
                batch_size=batch_size,
            )
        text_embs.append(text.float().cpu())
        for s in stages:
            pixels = quantize(images[s])
            fake_feats[s].append(metrics.extract_features(pixels, extractor, batch_size=batch_size))
            image_embs[s].append(clip.encode_images(pixels.to(device)).float().cpu())
        if classifier is not None:
            quantised = dequantize(quantize(images[stages[-1]]))  # the PNG the user would see
            result = attr_module.attribute_accuracy(quantised, wanted_all[rows], classifier=classifier)
            b = rows.stop - rows.start
            for name, acc in result["per_attribute"].items():
                attr_sums[name] = attr_sums.get(name, 0.0) + float(acc) * b
            asked = attr_module.attributes_tensor(wanted_all[rows]).sum(0)  # [A] images asked for each
            for name, a, r in zip(result["recall"], asked.tolist(), result["recall"].values()):
                counts = asked_shown.setdefault(name, [0, 0])
                counts[0] += a
                counts[1] += round(r * a) if r is not None else 0

    # real images: the whole test split at each evaluated resolution
    real_feats: dict[int, list[Tensor]] = {s: [] for s in stages}
    say(f"reading {len(test)} real test images")
    for rows in tqdm(_batches(len(test), batch_size), desc="real images", disable=not progress):
        full = torch.stack([test.image(i) for i in range(rows.start, rows.stop)])  # [b, 3, 256, 256] (stored size)
        for s in stages:
            pixels = quantize(downsample(full, stage_resolution(s)))
            real_feats[s].append(metrics.extract_features(pixels, extractor, batch_size=batch_size))

    say("computing metrics")
    text_emb = torch.cat(text_embs)
    candidates = metrics.r_precision_candidates(groups, candidates=r_precision_candidates)
    per_stage: dict[str, dict[str, float]] = {}
    for s in stages:
        real, fake, img_emb = torch.cat(real_feats[s]), torch.cat(fake_feats[s]), torch.cat(image_embs[s])
        kid, kid_std = metrics.kernel_inception_distance(
            real, fake, subset_size=kid_subset_size, subsets=kid_subsets, seed=seed
        )
        per_stage[str(stage_resolution(s))] = dict(
            fid=metrics.frechet_distance(real, fake),
            kid=kid,
            kid_std=kid_std,
            clip_score=metrics.clip_score(img_emb, text_emb),
            r_precision=metrics.r_precision(img_emb, text_emb, groups=groups, candidates=candidates, seed=seed),
        )
    last = stages[-1]
    report: dict[str, Any] = dict(per_stage[str(stage_resolution(last))])
    if classifier is not None and attr_sums:
        per_attribute = {name: total / n for name, total in attr_sums.items()}
        # what answering every image with the commonest value of each attribute would score
        wanted = attr_module.attributes_tensor(wanted_all).float().mean(0)  # [A] frequency of "present"
        recall = {name: (shown / asked if asked else None) for name, (asked, shown) in asked_shown.items()}
        known = [r for r in recall.values() if r is not None]
        report["attribute_accuracy"] = dict(
            mean=sum(per_attribute.values()) / len(per_attribute),
            per_attribute=per_attribute,
            majority_baseline=float(torch.maximum(wanted, 1 - wanted).mean()),
            # of the images asked for an attribute, the share that show it (accuracy also counts correct "no"s)
            recall=recall,
            min_recall=min(known) if known else None,
        )
    if len(stages) > 1:
        report["per_stage"] = per_stage

    import torchmetrics

    report["protocol"] = dict(
        n_generated=n,
        n_real=len(test),
        n_prompt_sources=len(set(sources)),
        split="test",
        resolution=stage_resolution(last),
        stage=last + 1,
        stages_evaluated=[s + 1 for s in stages],
        feature_extractor=extractor_name,
        feature_dim=int(real_feats[last][0].shape[1]),
        feature_extractor_note=note,
        clip_spec=model.clip_spec,
        features_clip_spec=str(data["meta"].get("clip_spec", "")),
        seed=seed,
        noise_seeds=f"image i uses seed + i ({seed} .. {seed + n - 1})",
        truncation=truncation,
        prompts="one test caption per image: test image order[i % T] (order seeded), cycling its captions",
        real_images=f"every test image, area-downsampled from {STORED_IMAGE_SIZE} px to the stage resolution",
        quantisation="uint8 (as a saved PNG), generated and real",
        clip_score="100 * max(cos, 0), the checkpoint's CLIP, mean over generated images",
        r_precision_candidates=candidates,
        kid_subset_size=min(kid_subset_size, n, len(test)),
        kid_subsets=kid_subsets,
        attribute_classifier=(
            "toy-face attribute classifier (assets/attribute_classifier.pt), last stage" if classifier is not None else None
        ),
        attribute_note=attr_note,
        checkpoint=str(model.path),
        checkpoint_step=model.step,
        features=str(Path(features)),
        device=str(device),
        torch=torch.__version__,
        torchmetrics=torchmetrics.__version__,
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable table of the report's numbers and its protocol."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    names = [("fid", "FID"), ("kid", "KID"), ("kid_std", "KID std"), ("clip_score", "CLIP score"),
             ("r_precision", "R-precision (top-1)")]
    rows: list[tuple[str, str]] = [(label, fmt(report[key])) for key, label in names if key in report]
    if "attribute_accuracy" in report:
        rows.append(("attribute accuracy", fmt(report["attribute_accuracy"]["mean"])))
        rows.append(("  majority baseline", fmt(report["attribute_accuracy"]["majority_baseline"])))
        rows.append(("  lowest recall", fmt(report["attribute_accuracy"].get("min_recall"))))
    lines = []
    if "per_stage" in report:
        header = f"{'metric':<22}" + "".join(f"{res + ' px':>12}" for res in report["per_stage"])
        lines += [header, "-" * len(header)]
        for key, label in names:
            lines.append(f"{label:<22}" + "".join(f"{fmt(m[key]):>12}" for m in report["per_stage"].values()))
        if "attribute_accuracy" in report:
            accuracy = report["attribute_accuracy"]
            lines.append(f"{'attribute accuracy':<22}{fmt(accuracy['mean']):>12} (last stage; majority baseline "
                         f"{fmt(accuracy['majority_baseline'])})")
    else:
        width = max(len(label) for label, _ in rows)
        lines += [f"{label:<{width}}  {value}" for label, value in rows]
    if "attribute_accuracy" in report:
        per, recall = report["attribute_accuracy"]["per_attribute"], report["attribute_accuracy"].get("recall", {})
        lines.append("  accuracy / recall per attribute: " + ", ".join(
            f"{k} {fmt(v)} / {fmt(recall.get(k))}" for k, v in per.items()))
    lines.append("")
    lines.append("protocol")
    for key, value in report["protocol"].items():
        if value is not None:
            lines.append(f"  {key:<24} {fmt(value)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint or sampling export, or 'demo' for the embedded demo model")
    parser.add_argument(
        "--features", required=True,
        help="features file whose test split gives prompts and real images, or a toy faces source (toyfaces:N)",
    )
    parser.add_argument("--out", required=True, help="report JSON file to write")
    parser.add_argument("--n-images", type=int, default=None, help="images to generate (default: one per test image)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt choice and noise (image i uses seed + i)")
    parser.add_argument(
        "--stage", default=None, choices=[*map(str, STAGE_CHOICES), "all"],
        help=f"{describe_stages()}; all = every stage (default: the last stage)",
    )
    parser.add_argument(
        "--feature-extractor", default="auto", choices=EXTRACTORS,
        help="FID/KID features: inception (standard, downloads its weights once), clip (the checkpoint's CLIP), "
        "random-conv (offline stand-in); auto = inception when its weights load, else clip",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per generation batch")
    parser.add_argument("--truncation", type=float, default=None, help="truncate the noise to [-T, T] (default: none)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def toyfaces_features(spec: str, model: Any, folder: str | os.PathLike) -> Path:
    """Extract the toy faces source ``spec`` (``toyfaces`` or ``toyfaces:N``) into ``folder``
    with the generator's CLIP, so that a toy faces source can stand in for a features file."""
    from .extract import extract_features

    out = Path(folder) / "toyfaces.pt"
    extract_features(spec, out, clip=model.clip_spec, device=model.device, data_dir=Path(folder) / "data",
                     resume=False)
    return out


def run(args: argparse.Namespace) -> int:
    from . import sample

    model = sample.load_generator(None if args.checkpoint == "demo" else args.checkpoint, device=args.device)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        features = args.features
        if not Path(features).is_file() and str(features).startswith("toyfaces"):
            print(f"extracting {features} with the checkpoint's CLIP ({model.clip_spec}) ...")
            features = toyfaces_features(features, model, tmp)
        report = evaluate(
            model, features, n_images=args.n_images, seed=args.seed, stage=args.stage,
            feature_extractor=args.feature_extractor, truncation=args.truncation, batch_size=args.batch_size,
        )
    report["protocol"]["features"] = str(args.features)
    path = write_report(report, args.out)
    print(format_report(report))
    print(f"\nreport written to {path}")
    return 0
