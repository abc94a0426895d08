"""Sampling: prompt -> CLIP text feature -> G_ema -> images at every stage.

The Python API the notebooks and the prompt widget call (``load_generator``,
``generate``, ``interpolate_prompts``) and ``python -m helpers sample``.

Sampling is deterministic by seed. Image j of every prompt draws both of its
noise vectors (z and the conditioning-augmentation noise) from its own
``torch.Generator`` seeded with ``seed + j``, on the CPU, and the generator
runs with BatchNorm in eval mode, so the same (prompt, seed) gives the same
image whatever else is in the batch and whichever device runs it (up to
floating-point rounding).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .assets import DEMO_GENERATOR
from .checkpoint import CheckpointError, read_generator, save_generator  # noqa: F401  (save_generator: re-exported)
from .config import STAGE_CHOICES, ModelConfig, describe_stages
from .devices import default_device, resolve_device  # noqa: F401  (default_device: re-exported)
from .errors import UserError
from .network import Generator, fold_batchnorm

MAX_IMAGES = 256  # images per call (prompts x n); more is almost surely a typo, and slow on a CPU
MAX_SEED = 2**62  # seeds are 0 <= seed < MAX_SEED (torch.Generator takes 64-bit seeds)
DEFAULT_BATCH_SIZE = 16  # samples per forward pass; results do not depend on it
DEFAULT_STEPS = 8  # images in a prompt interpolation strip


@dataclass(frozen=True)
class LoadedGenerator:
    """An EMA generator ready to sample, with what it needs from its checkpoint."""

    generator: Generator  # G_ema, eval mode, gradients off
    config: ModelConfig
    clip_spec: str  # the CLIP whose text features it was trained on
    step: int  # training step of the snapshot
    path: Path  # the checkpoint file
    # the same generator made lean for sampling (inference_copy: BatchNorm folded, channels_last):
    # what sampling runs; None: sample with ``generator``
    inference: Generator | None = field(default=None, repr=False, compare=False)
    # the CLIP network it was trained with (ClipEncoder.identity); None in files that predate it
    clip_identity: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def resolutions(self) -> list[int]:
        return self.config.resolutions

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device


# --------------------------------------------------------------------------- checkpoints


def load_generator(checkpoint: str | os.PathLike | None = None, *, device: str | torch.device | None = None) -> LoadedGenerator:
    """Load the EMA generator of a checkpoint (a training snapshot or a sampling export).

    ``checkpoint=None`` means the embedded demo model (``assets/demo_generator.pt``).
    The generator comes back in eval mode (BatchNorm uses its running
    statistics, so samples do not depend on each other) with gradients off, on
    ``device`` (default: CUDA when present). Raises ``CheckpointError`` for a
    missing, truncated or foreign file and ``UserError`` when the demo model is
    not built.
    """
    if checkpoint is None:
        path = DEMO_GENERATOR
        if not path.is_file():
            raise UserError(
                f"the embedded demo model is not built yet ({path} is missing): build it with "
                "`python -m helpers build-demo`, or pass --checkpoint PATH (checkpoint=...) "
                "pointing at a checkpoint written by `python -m helpers train`"
            )
    else:
        path = Path(checkpoint)
    stored = read_generator(path)
    try:
        generator = Generator(stored.model_config)
        generator.load_state_dict(stored.G_ema)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its generator does not match its model config: {err}") from err
    generator.eval().requires_grad_(False)
    generator.to(resolve_device(device))
    return LoadedGenerator(
        generator, stored.model_config, stored.clip_spec, stored.step, path, inference_copy(generator),
        stored.clip_identity,
    )


def inference_copy(generator: Generator) -> Generator:
    """The generator as sampling runs it: BatchNorm folded into the convolutions
    (``network.fold_batchnorm``) and the NHWC (``channels_last``) layout that oneDNN and
    cuDNN convolve without reordering. The same images up to float rounding."""
    return fold_batchnorm(generator).to(memory_format=torch.channels_last)


def _as_model(model: Any, device: str | torch.device | None) -> LoadedGenerator:
    return model if isinstance(model, LoadedGenerator) else load_generator(model, device=device)


_CLIPS: dict[tuple[str, str], Any] = {}


def get_clip(spec: str, *, device: str | torch.device | None = None):
    """``load_clip(spec, device)``, loaded once per (spec, device) in this process."""
    from .clip_encoder import load_clip

    device = resolve_device(device)
    key = (spec, str(device))
    if key not in _CLIPS:
        _CLIPS[key] = load_clip(spec, device=device)
    return _CLIPS[key]


# --------------------------------------------------------------------------- input checks


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of them -> a list; empty or blank prompts are a ``UserError``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompt given: write a sentence describing the face")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            where = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise UserError(f"{where} is empty: write a sentence describing the face")
    return prompts


def check_count(n: int, num_prompts: int = 1) -> None:
    """``n`` images per prompt must be >= 1 and ``n * num_prompts`` at most ``MAX_IMAGES``."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"the number of images must be a positive whole number, got {n!r}")
    if n * num_prompts > MAX_IMAGES:
        raise UserError(
            f"{n} images x {num_prompts} prompt(s) = {n * num_prompts} is more than {MAX_IMAGES} "
            "per call: ask for fewer, or run several calls with different seeds"
        )


def check_seed(seed: int, n: int = 1) -> None:
    """Seeds ``seed .. seed + n - 1`` must lie in [0, MAX_SEED)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed + n > MAX_SEED:
        raise UserError(f"the seed must be a whole number from 0 to {MAX_SEED - n}, got {seed!r}")


def select_stages(stage: int | str | None, num_stages: int) -> list[int]:
    """Which stages to show, as 0-based indices.

    ``stage`` is a stage number (``config.describe_stages``), ``"all"``, or None for the last
    stage the checkpoint has. A stage the checkpoint lacks is a ``UserError``.
    """
    if stage is None:
        return [num_stages - 1]
    if str(stage).strip().lower() == "all":
        return list(range(num_stages))
    try:
        number = int(stage)
    except (TypeError, ValueError):
        raise UserError(f"stage must be a stage number ({describe_stages()}) or 'all', got {stage!r}") from None
    if not 1 <= number <= num_stages:
        raise UserError(
            f"this checkpoint has {num_stages} stage(s), so stage {number} does not exist: "
            f"choose {describe_stages(num_stages)} or 'all'"
        )
    return [number - 1]


def random_seed() -> int:
    """A fresh seed from the operating system (not from torch's global generator)."""
    return secrets.randbelow(2**31)


# --------------------------------------------------------------------------- noise and features


def _normal(shape: tuple[int, ...], generator: torch.Generator, truncation: float | None) -> Tensor:
    """Standard normal, or normal truncated to [-truncation, truncation] by the inverse CDF."""
    if truncation is None:
        return torch.randn(shape, generator=generator)
    low = 0.5 * math.erfc(truncation / math.sqrt(2))  # P(X < -truncation)
    u = low + torch.rand(shape, generator=generator, dtype=torch.float64) * (1 - 2 * low)
    x = math.sqrt(2) * torch.erfinv(2 * u - 1)
    return x.clamp(-truncation, truncation).float()


def sample_noise(
    seeds: Sequence[int], *, z_dim: int, cond_dim: int, truncation: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample noise: z [N, z_dim] and CA noise [N, cond_dim], row i from a CPU
    ``torch.Generator`` seeded with ``seeds[i]`` (z first, then the CA noise).

    ``truncation`` > 0 draws both from a normal truncated to [-truncation, truncation]
    (less variety, more typical images); None draws plain N(0, 1).
    """
    if truncation is not None and not (truncation > 0 and math.isfinite(truncation)):
        raise UserError(f"truncation must be a positive number (or None for none), got {truncation!r}")
    zs, eps = [], []
    for seed in seeds:
        rng = torch.Generator().manual_seed(int(seed))
        zs.append(_normal((z_dim,), rng, truncation))
        eps.append(_normal((cond_dim,), rng, truncation))
    return torch.stack(zs), torch.stack(eps)


def slerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    """Spherical interpolation between a [D] and b [D] at weights t [T] -> [T, D].

    For unit vectors the results are unit vectors on the great circle from a
    (t = 0) to b (t = 1); nearly parallel inputs fall back to a normalised lerp.
    """
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1)
    a_n, b_n = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a_n * b_n).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    if omega.abs() < 1e-4:
        return F.normalize((1 - t) * a_n + t * b_n, dim=-1)
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s) * a_n + (torch.sin(t * omega) / s) * b_n


def encode_prompts(model: LoadedGenerator, prompts: Sequence[str]) -> Tensor:
    """Prompts -> text features [P, text_dim] fp32 L2-normalised, from the checkpoint's CLIP.

    The CLIP encoder applies its rule for prompts over 77 tokens; a CLIP whose
    dimension differs from the checkpoint's ``text_dim`` is a ``UserError``.
    """
    prompts = check_prompts(prompts)
    clip = get_clip(model.clip_spec, device=model.device)
    if clip.dim != model.config.text_dim:
        raise UserError(
            f"the checkpoint {model.path} expects {model.config.text_dim}-d text features but its CLIP "
            f"{model.clip_spec!r} gives {clip.dim}-d ones: the checkpoint does not belong to this CLIP "
            "(sample with the checkpoint trained on features from it)"
        )
    if hasattr(clip, "identity"):
        from .clip_encoder import check_same_clip

        check_same_clip(model.clip_identity, clip, what=f"the checkpoint {model.path}")
    return clip.encode_text(prompts).to(model.device, torch.float32)


# --------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_from_features(
    model: LoadedGenerator,
    text_features: Tensor,
    seeds: Sequence[int],
    *,
    truncation: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Tensor]:
    """text_features [N, text_dim] L2-normalised, one seed per row -> per-stage images.

    Returns a list (one entry per stage) of [N, 3, 64 * 2**i, same] fp32 CPU
    tensors in [-1, 1]. Runs in chunks of ``batch_size``; the result does not
    depend on the chunking.
    """
    if text_features.ndim != 2 or text_features.shape[0] != len(seeds):
        raise ValueError(f"need one seed per text feature, got {list(text_features.shape)} and {len(seeds)} seeds")
    if text_features.shape[1] != model.config.text_dim:
        raise UserError(
            f"text features are {text_features.shape[1]}-d but the checkpoint expects {model.config.text_dim}-d"
        )
    z, eps = sample_noise(seeds, z_dim=model.config.z_dim, cond_dim=model.config.cond_dim, truncation=truncation)
    generator = model.inference if model.inference is not None else model.generator
    device = model.device
    generator.eval()  # BatchNorm must use running statistics: samples stay independent
    chunks: list[list[Tensor]] = []
    for start in range(0, len(seeds), max(1, batch_size)):
        end = start + max(1, batch_size)
        images, _, _ = generator(
            text_features[start:end].to(device, torch.float32), z[start:end].to(device), eps[start:end].to(device)
        )
        chunks.append([img.float().cpu() for img in images])
    return [torch.cat(parts) for parts in zip(*chunks)]


def generate(
    prompts: str | Sequence[str],
    *,
    n: int = 1,
    seed: int | None = None,
    truncation: float | None = None,
    model: LoadedGenerator | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Tensor]:
    """Generate ``n`` images for each prompt, at every stage of the generator.

    prompts: one sentence or a list of P sentences (non-empty; CLIP's rule for
    more than 77 tokens applies). Image j of every prompt uses seed
    ``seed + j`` (``seed=None``: a random one; call ``random_seed()`` first to
    know it). ``model`` is a ``LoadedGenerator``, a checkpoint path, or None for
    the embedded demo model (loaded onto ``device``, default CUDA when present).

    Returns a list with one entry per stage, stage i [P * n, 3, 64 * 2**i, same]
    fp32 CPU tensors in [-1, 1], prompt-major (image ``p * n + j`` is prompt p, seed + j).
    """
    prompts = check_prompts(prompts)
    check_count(n, len(prompts))
    seed = random_seed() if seed is None else seed
    check_seed(seed, n)
    model = _as_model(model, device)
    with torch.inference_mode():
        features = encode_prompts(model, prompts)
    seeds = [seed + j for _ in prompts for j in range(n)]
    return generate_from_features(
        model, features.repeat_interleave(n, dim=0), seeds, truncation=truncation, batch_size=batch_size
    )


def interpolate_prompts(
    prompt_a: str,
    prompt_b: str,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int | None = None,
    truncation: float | None = None,
    model: LoadedGenerator | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> list[Tensor]:
    """Walk from prompt A to prompt B: spherical interpolation of their text features
    at ``steps`` evenly spaced weights, with the same noise (one seed) for every step.

    Returns one entry per stage, stage i [steps, 3, 64 * 2**i, same] fp32 CPU in [-1, 1].
    """
    check_prompts([prompt_a, prompt_b])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 64:
        raise UserError(f"interpolation steps must be a whole number from 2 to 64, got {steps!r}")
    seed = random_seed() if seed is None else seed
    check_seed(seed)
    model = _as_model(model, device)
    with torch.inference_mode():
        a, b = encode_prompts(model, [prompt_a, prompt_b]).cpu()
        features = slerp(a, b, torch.linspace(0, 1, steps))
    return generate_from_features(model, features, [seed] * steps, truncation=truncation)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more sentences (quote each)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--checkpoint", default=None, help="checkpoint or sampling export (default: the embedded demo model)")
    parser.add_argument("--n", type=int, default=1, help=f"images per prompt, one column per seed (at most {MAX_IMAGES} in all)")
    parser.add_argument("--seed", type=int, default=None, help="first seed; image j uses seed + j (default: random, printed)")
    parser.add_argument(
        "--stage", default=None, choices=[*map(str, STAGE_CHOICES), "all"],
        help=f"{describe_stages()}; all = the stages side by side (default: the last stage)",
    )
    parser.add_argument("--interpolate", action="store_true", help="a strip from the first prompt to the second (needs two prompts)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="images in the interpolation strip")
    parser.add_argument("--truncation", type=float, default=None, help="truncate the noise to [-T, T] (e.g. 1.0)")
    parser.add_argument("--size", type=int, default=None, help="tile size in px (default: the largest stage shown)")
    parser.add_argument("--no-labels", action="store_true", help="leave out the prompts and seeds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def run(args: argparse.Namespace) -> int:
    import sys

    from . import pictures

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    prompts = check_prompts(args.prompts)
    if args.interpolate and len(prompts) != 2:
        raise UserError(f"--interpolate needs exactly two prompts, got {len(prompts)}")
    if not args.interpolate:
        check_count(args.n, len(prompts))
    if args.size is not None and not 8 <= args.size <= 1024:
        raise UserError(f"--size must be from 8 to 1024 px, got {args.size}")
    seed = random_seed() if args.seed is None else args.seed
    check_seed(seed, 1 if args.interpolate else args.n)
    model = load_generator(args.checkpoint, device=args.device)
    stages = select_stages(args.stage, model.num_stages)
    labels = not args.no_labels

    if args.interpolate:
        images = interpolate_prompts(
            prompts[0], prompts[1], steps=args.steps, seed=seed, truncation=args.truncation, model=model
        )
        picture = pictures.interpolation_strip(
            [images[i] for i in stages], prompts=(prompts[0], prompts[1]) if labels else None, size=args.size
        )
    else:
        images = generate(prompts, n=args.n, seed=seed, truncation=args.truncation, model=model)
        seeds = [seed + j for j in range(args.n)]
        if len(stages) == 1:
            picture = pictures.prompt_grid(images[stages[0]], prompts, seeds, labels=labels, size=args.size)
        else:
            row_labels = [f"{p} (seed {s})" for p in prompts for s in seeds] if labels else None
            picture = pictures.stage_panel([images[i] for i in stages], size=args.size, row_labels=row_labels)
    pictures.save_png(picture, out)
    if args.seed is None:
        print(f"seed {seed} (pass --seed {seed} to get the same images)", file=sys.stderr)
    print(out)
    return 0
