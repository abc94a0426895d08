"""Feature extraction: a captioned image source -> a features file (``python -m helpers extract``).

Every image is decoded once, converted to RGB, center-cropped to a square and
resized once to 256 px with Lanczos, stored as uint8, and encoded by CLIP; up to
K captions per image are encoded as text features. The split is decided from
the source's ids alone (MM-CelebA-HQ / CelebAMask-HQ: the reference's 24,000 /
6,000 by sorted id; otherwise a seeded test fraction), so reruns agree.

Extraction is resumable: work in progress lives in ``OUT.partial/`` (memory-mapped
arrays plus a small state file saved atomically every few batches); a rerun with
the same arguments continues from the last saved batch. Unreadable images are
skipped with a ``SkippedImageWarning`` naming them and listed in the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError
from .features import IMAGE_SIZE, write_features

PARTIAL_FORMAT = "helpers-t2i-extract-partial/1"
PREPROCESSING = (
    "EXIF orientation applied; converted to RGB (transparency over white, 16-bit scaled to 8-bit); "
    f"center-cropped to a square; resized once to {IMAGE_SIZE} px with Lanczos; uint8"
)
REFERENCE_TEST_FRACTION = 0.2  # the reference's 24,000 / 6,000
DEFAULT_TEST_FRACTION = 0.1


class SkippedImageWarning(UserWarning):
    """An image could not be decoded and was left out of the features file."""


# ----------------------------------------------------------------------------- images


def to_rgb(image) -> "PIL.Image.Image":  # noqa: F821
    """Any Pillow image (L, 1, P, RGBA, LA, CMYK, I;16, I, F, ...) -> an 8-bit RGB image.

    Transparent pixels are composited over white; 16-bit and 32-bit greys are scaled, not clipped.
    """
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(data: bytes, *, size: int = IMAGE_SIZE) -> tuple[np.ndarray, bool]:
    """Encoded image bytes -> (uint8 [size, size, 3], whether it had to be enlarged).

    Center-crops to a square and resizes once with Lanczos. Raises an exception
    (OSError, ValueError, ...) for unreadable or truncated data.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes now, so truncated files fail here
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block is not a reason to drop the pixels
            pass
        image = to_rgb(image)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
        return np.asarray(image, dtype=np.uint8).copy(), side < size


def _reason(err: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can read"
    return f"{type(err).__name__}: {err}"


def _try_load(data: bytes | Exception) -> tuple[np.ndarray, bool] | str:
    """load_image, with the failure as a one-line reason instead of an exception."""
    if isinstance(data, Exception):
        return _reason(data)
    try:
        return load_image(data)
    except Exception as err:  # any decoder failure on one file must not end a 30,000-image run
        return _reason(err)


# ----------------------------------------------------------------------------- split


def _reference_train_ids() -> set[str]:
    # The reference's list: the first 24,000 of sorted(str(i) for i in range(30000)), i.e. lexicographic.
    return set(sorted(str(i) for i in range(30000))[:24000])


def assign_split(ids: list[str], rule: str = "auto", *, kind: str = "folder", seed: int = 0) -> tuple[list[str], str]:
    """"train"/"test" per id, decided from the ids alone; returns (split, the rule used).

    rule: ``"auto"`` (the reference split for CelebA-HQ sources with CelebA-HQ ids, else a
    seeded 10% test fraction), ``"reference"``, ``"none"`` (all train) or a test fraction
    such as ``"0.2"``. A seeded fraction permutes the sorted ids with ``seed``: the same
    ids always give the same split, whatever their order.
    """
    reference = _reference_train_ids()
    all_hq = bool(ids) and all(i.isdigit() and int(i) < 30000 and str(int(i)) == i for i in ids)
    if rule == "auto":
        rule = "reference" if kind in ("mm-celeba-hq", "celebamask-hq") and all_hq else str(DEFAULT_TEST_FRACTION)
    if rule == "reference":
        if not all_hq:
            raise ValueError("the reference split needs CelebA-HQ ids 0..29999; use --split auto or a test fraction")
        return ["train" if i in reference else "test" for i in ids], "reference 24000/6000 by sorted id"
    if rule == "none":
        return ["train"] * len(ids), "none (all train)"
    try:
        fraction = float(rule)
    except ValueError:
        raise ValueError(f"--split must be auto, reference, none or a test fraction in [0, 1), got {rule!r}") from None
    if not 0 <= fraction < 1:
        raise ValueError(f"the test fraction must be in [0, 1), got {fraction}")
    order = sorted(range(len(ids)), key=lambda k: ids[k])
    num_test = round(fraction * len(ids))
    if fraction > 0 and len(ids) >= 2:
        num_test = max(1, num_test)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    test = {order[p] for p in perm[:num_test]}
    return ["test" if k in test else "train" for k in range(len(ids))], f"seeded fraction {fraction} (seed {seed})"


# ----------------------------------------------------------------------------- summary


@dataclass
class ExtractSummary:
    """What an extraction did; ``lines()`` is what the CLI prints."""

    out: Path
    source: str
    clip_spec: str
    num_listed: int = 0
    num_images: int = 0
    num_train: int = 0
    num_test: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    no_caption: int = 0
    captions: int = 0
    truncated_captions: int = 0
    enlarged: int = 0
    resumed_at: int = 0
    split_rule: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.out} ({self.num_images} images: {self.num_train} train, {self.num_test} test; "
            f"{self.captions} captions; CLIP {self.clip_spec}) in {self.seconds:.1f} s",
            f"split: {self.split_rule}",
        ]
        if self.resumed_at:
            out.append(f"resumed after {self.resumed_at} of {self.num_listed} images")
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} unreadable image(s):")
            out += [f"  {where}: {why}" for where, why in self.skipped]
        if self.no_caption:
            out.append(f"{self.no_caption} image(s) without a caption (their image feature stands in)")
        if self.truncated_captions:
            out.append(f"{self.truncated_captions} caption(s) longer than CLIP's 77 tokens were truncated")
        if self.enlarged:
            out.append(f"{self.enlarged} image(s) smaller than {IMAGE_SIZE} px were enlarged")
        return out + self.notes


# ----------------------------------------------------------------------------- resumable work area


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an interrupted extraction to ``out`` keeps its work."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _fingerprint(source, clip_spec: str, k: int, split: list[str]) -> str:
    """Identifies one extraction's inputs; a partial area with another fingerprint is discarded."""
    listing = [(s.id, list(s.captions[:k]), s.attributes) for s in source.samples]
    text = json.dumps([PARTIAL_FORMAT, source.spec, source.kind, clip_spec, k, split, PREPROCESSING, listing])
    return hashlib.sha256(text.encode()).hexdigest()


class _WorkArea:
    """Memory-mapped arrays for N listed images plus a small state dict, saved atomically."""

    def __init__(self, folder: Path, *, n: int, k: int, dim: int, fingerprint: str, resume: bool) -> None:
        from numpy.lib.format import open_memmap

        self.folder = folder
        self.state_path = folder / "state.pt"
        state = None
        if resume and self.state_path.is_file():
            try:
                state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            except Exception:
                state = None
            if state is not None and state.get("fingerprint") != fingerprint:
                warnings.warn(f"{folder} holds an extraction with other inputs; starting over", stacklevel=3)
                state = None
        shapes = dict(images=((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                      image_features=((n, dim), np.float16), text_features=((n, k, dim), np.float16))
        self.arrays: dict[str, np.ndarray] = {}
        if state is not None:
            try:
                self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r+") for name in shapes}
            except (OSError, ValueError):
                state = None  # the arrays are gone or damaged: the saved state is worthless
            if any(self.arrays[name].shape != shape for name, (shape, _) in shapes.items() if name in self.arrays):
                state = None
        if state is None:
            self.arrays = {}
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            state = dict(fingerprint=fingerprint, next_index=0, kept=0, ids=[], captions=[], split=[],
                         counts=[], attributes=[], skipped=[], truncated=0, enlarged=0)
            self.arrays = {
                name: open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                for name, (shape, dtype) in shapes.items()
            }
        self.state: dict[str, Any] = state

    def save(self) -> None:
        from .files import atomic_save

        for array in self.arrays.values():
            array.flush()  # the arrays must be on disk before the state that points past them
        atomic_save(self.state, self.state_path)

    def remove(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- extraction


def _encode_captions(clip, texts: list[str], *, chunk: int = 256) -> torch.Tensor:
    from .clip_encoder import LongPromptWarning

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LongPromptWarning)  # counted and reported once in the summary
        for start in range(0, len(texts), chunk):
            out.append(clip.encode_text(texts[start : start + chunk]).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.dim)


def extract_features(
    source: Any,
    out: str | os.PathLike,
    *,
    clip: Any = "ViT-B-32",
    captions_per_image: int = 10,
    split: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = True,
    save_every: int = 10,
    workers: int | None = None,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExtractSummary:
    """Extract a features file ``out`` (+ ``out``'s image array) from ``source``.

    source: a spec for ``helpers.sources.open_source`` or an opened ``Source``;
    clip: a CLIP spec for ``load_clip`` or a loaded ``ClipEncoder``;
    captions_per_image: K, the most captions encoded per image (K >= 1);
    split: ``auto``, ``reference``, ``none`` or a test fraction (see ``assign_split``);
    resume: continue an interrupted run found in ``out.partial/`` (same inputs only);
    save_every: persist the work area every this many batches;
    on_batch(done, total): called after every batch with the number of listed images handled.
    Raises UserError when no image is usable (nothing is written then).
    """
    from tqdm.auto import tqdm

    from .clip_encoder import load_clip
    from .sources import Source, open_source

    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    out = Path(out)
    src = source if isinstance(source, Source) else open_source(
        source, data_dir=data_dir, captions_per_image=captions_per_image, seed=seed
    )
    try:
        if not src.samples:
            raise UserError(f"no images found in {src.location} (looked for {', '.join(_extensions())})")
        encoder = load_clip(clip, device) if isinstance(clip, str) else clip
        k = captions_per_image
        ids = [s.id for s in src.samples]
        split_of, split_rule = assign_split(ids, split, kind=src.kind, seed=seed)
        area = _WorkArea(partial_dir(out), n=len(ids), k=k, dim=encoder.dim,
                         fingerprint=_fingerprint(src, encoder.spec, k, split_of), resume=resume)
        summary = ExtractSummary(out=out, source=src.spec, clip_spec=encoder.spec, num_listed=len(ids),
                                 split_rule=split_rule, notes=list(src.notes), resumed_at=area.state["next_index"])
        _run_batches(src, encoder, area, split_of, k=k, batch_size=batch_size, save_every=save_every,
                     workers=workers, progress=progress, on_batch=on_batch, tqdm=tqdm)
        return _finish(src, encoder, area, summary, k=k, seed=seed, started=started)
    finally:
        if src is not source:
            src.close()


def _extensions() -> list[str]:
    from .sources import IMAGE_EXTENSIONS

    return list(IMAGE_EXTENSIONS)


def _run_batches(src, encoder, area: _WorkArea, split_of, *, k, batch_size, save_every, workers, progress, on_batch, tqdm):
    state, arrays = area.state, area.arrays
    total = len(src.samples)
    workers = workers or min(16, os.cpu_count() or 1)
    bar = tqdm(total=total, initial=state["next_index"], disable=not progress, desc="extract", unit="img")
    batches = 0
    starts = list(range(state["next_index"], total, batch_size))

    def submit(pool, start):
        batch = src.samples[start : start + batch_size]
        raw = []
        for sample in batch:  # reads stay in this thread: a zip is read through one handle
            try:
                raw.append(sample.read())
            except Exception as err:
                raw.append(err)
        return batch, [pool.submit(_try_load, data) for data in raw]

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = submit(pool, starts[0]) if starts else None
            for number, start in enumerate(starts):
                batch, futures = pending
                results = [f.result() for f in futures]
                # Decode the next batch while CLIP encodes this one.
                pending = submit(pool, starts[number + 1]) if number + 1 < len(starts) else None
                good, skipped = [], []
                for sample, index, result in zip(batch, range(start, start + len(batch)), results):
                    if isinstance(result, str):
                        skipped.append((sample.name, result))
                    else:
                        good.append((sample, index, *result))
                if good:
                    _encode_batch(encoder, arrays, state, good, split_of, k=k)
                # the batch's state in one go after its encoding: an interrupted batch is redone, never counted twice
                state["skipped"].extend(skipped)
                state["next_index"] = start + len(batch)
                for name, reason in skipped:
                    warnings.warn(f"skipped {name}: {reason}", SkippedImageWarning, stacklevel=4)
                batches += 1
                if batches % save_every == 0:
                    area.save()
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(state["next_index"], total)
    except BaseException:
        area.save()  # whatever stopped us, the finished batches are kept for the next run
        raise
    finally:
        bar.close()
    area.save()


def _encode_batch(encoder, arrays, state, good, split_of, *, k) -> None:
    kept, n = state["kept"], len(good)
    pixels = np.stack([g[2] for g in good])  # [n, 256, 256, 3] uint8
    arrays["images"][kept : kept + n] = pixels
    batch = torch.from_numpy(pixels).to(encoder.device).permute(0, 3, 1, 2)
    arrays["image_features"][kept : kept + n] = encoder.encode_images(batch).cpu().half().numpy()
    captions = [list(sample.captions[:k]) for sample, *_ in good]
    flat = [c for caps in captions for c in caps]
    truncated = len(encoder.too_long(flat)) if flat else 0
    text = _encode_captions(encoder, flat).half().numpy()
    row = 0
    for j, caps in enumerate(captions):
        if caps:
            arrays["text_features"][kept + j, : len(caps)] = text[row : row + len(caps)]
        row += len(caps)
    # the state changes only here, after the slow part: an interrupt above leaves it as the last batch left it
    state["truncated"] += truncated
    for sample, index, _, enlarged in good:
        state["ids"].append(sample.id)
        state["captions"].append(list(sample.captions[:k]))
        state["counts"].append(len(sample.captions[:k]))
        state["split"].append(split_of[index])
        state["attributes"].append(sample.attributes)
        state["enlarged"] += bool(enlarged)
    state["kept"] = kept + n


def _finish(src, encoder, area: _WorkArea, summary: ExtractSummary, *, k, seed, started) -> ExtractSummary:
    state, arrays = area.state, area.arrays
    n = state["kept"]
    summary.skipped = [tuple(s) for s in state["skipped"]]
    if n == 0:
        area.remove()
        raise UserError(
            f"no usable images in {src.location}: all {summary.num_listed} listed file(s) were unreadable "
            f"(first: {summary.skipped[0][0]}: {summary.skipped[0][1]}); nothing was written"
        )
    counts = torch.tensor(state["counts"], dtype=torch.long)
    width = int(counts.max())  # K actually used: the most captions any kept image has
    attributes = None
    if src.attribute_names and all(a is not None for a in state["attributes"]):
        attributes = dict(names=list(src.attribute_names), values=torch.tensor(state["attributes"], dtype=torch.bool))
    meta = dict(
        clip_spec=encoder.spec,
        clip_identity=getattr(encoder, "identity", None),  # spec, activation, open_clip version
        clip_image_size=encoder.image_size,
        source=src.spec,
        source_kind=src.kind,
        source_location=src.location,
        preprocessing=PREPROCESSING,
        captions_per_image=k,
        split_rule=summary.split_rule,
        seed=seed,
        num_listed=summary.num_listed,
        skipped=[list(s) for s in summary.skipped],
        truncated_captions=state["truncated"],
    )
    write_features(
        summary.out,
        images=arrays["images"][:n],
        image_features=torch.from_numpy(np.array(arrays["image_features"][:n])),
        text_features=torch.from_numpy(np.array(arrays["text_features"][:n, :width])),
        caption_counts=counts,
        captions=state["captions"],
        ids=state["ids"],
        split=state["split"],
        meta=meta,
        attributes=attributes,
    )
    area.remove()
    summary.num_images = n
    summary.num_train = state["split"].count("train")
    summary.num_test = n - summary.num_train
    summary.captions = int(counts.sum())
    summary.no_caption = int((counts == 0).sum())
    summary.truncated_captions = state["truncated"]
    summary.enlarged = state["enlarged"]
    summary.seconds = time.perf_counter() - started
    return summary


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="a folder of captioned images, an MM-CelebA-HQ or CelebAMask-HQ zip/folder, "
                             "'toyfaces[:N]', 'mm-celeba-hq' or 'celebamask-hq'")
    parser.add_argument("--out", required=True, help="features file to write (NAME.pt; NAME.images.npy beside it)")
    parser.add_argument("--clip", default="ViT-B-32",
                        help="CLIP spec: ViT-B-32 (default), MODEL/PRETRAINED, a weights file, demo, tiny-random")
    parser.add_argument("--captions-per-image", type=int, default=10, metavar="K",
                        help="encode at most K captions per image (default 10)")
    parser.add_argument("--split", default="auto",
                        help="auto (default), reference (24000/6000 by sorted id), none, or a test fraction like 0.1")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, generated captions and toy faces")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--data-dir", default=None, help="where downloads and toy faces are kept (default ./data)")
    parser.add_argument("--restart", action="store_true", help="ignore an interrupted run's work and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # one line, above the progress bar


def run(args: argparse.Namespace) -> int:
    from .console import say

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # restored when the block ends
        try:
            summary = _extract_from_args(args)
        except KeyboardInterrupt:
            say(f"interrupted: the images done so far are kept in {partial_dir(args.out)}; run the same command "
                "again to continue (--restart starts over)", err=True)
            return 130
    say("\n".join(summary.lines()))
    return 0


def _extract_from_args(args: argparse.Namespace) -> ExtractSummary:
    return extract_features(
        args.source, args.out, clip=args.clip, captions_per_image=args.captions_per_image, split=args.split,
        seed=args.seed, batch_size=args.batch_size, device=args.device, data_dir=args.data_dir,
        resume=not args.restart, progress=not args.quiet,
    )
