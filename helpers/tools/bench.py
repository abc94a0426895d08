"""Benchmarks: sampling, training steps and data loading, measured against the machine itself.

``python -m helpers bench`` times, with warm-up runs and medians:

- sampling (``sample.generate_from_features``, every stage) per image at batch 1 and 16,
  for the ``demo`` and ``faces`` presets, as sampling runs it (BatchNorm folded, NHWC
  layout) and, for before/after, folded only and plain;
- one full training step (``Trainer.train_step``: every D step and the G step, CLIP loss
  included) in images/s at a configurable batch, for both presets (on a CPU also with
  fused Adam, on a GPU with and without AMP);
- the data loader (``FeaturesDataset`` through the training loop's sampler) on its own, at steady
  state (the workers' start is reported apart);
- the machine's reference rate: a large square matmul, fp32 on a CPU, bf16 on a GPU.

Model FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention, forward and backward; BatchNorm and elementwise work count
zero), so every figure is also a fraction of the matmul rate measured in the same run:
absolute times on a shared machine are noisy, that fraction much less so.

The networks have random weights (speed does not depend on them). The ``faces`` CLIP
loss uses a randomly initialised open_clip ViT-B-32 (the same FLOPs as OpenAI's
weights, nothing downloaded); the ``demo`` one the demo CLIP's architecture.

An op-by-op breakdown of the faces rows splits their time into matmul/convolution ops,
normalisation and the rest (and their FLOPs by module), which says where a low fraction
comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

BENCH_FORMAT = "helpers-bench/1"
DEFAULT_TRAIN_BATCH = 4  # images per training step (the faces target of the speed work is batch 4)
SAMPLE_BATCHES = (1, 16)
SAMPLING_VARIANT = "folded+NHWC"  # what sampling runs: sample.inference_copy
RANDOM_SUFFIX = "/random"  # "ViT-B-32/random": the architecture with random weights, built offline
# The bootcamp's guideline: 24,000 images in 40-50 minutes per epoch on a Colab T4 (batch 24, AMP off).
REFERENCE_T4_IMAGES_PER_S = (8.0, 10.0)


@dataclass(frozen=True)
class BenchSettings:
    """How hard to measure."""

    warmup: int  # untimed runs before the timed ones (the FLOP-counting run comes on top)
    repeats: int  # timed runs; the median is reported
    matmul_size: int  # side of the square matmul giving the reference rate
    loader_images: int  # images in the synthetic features file of the loader benchmark
    breakdown: bool = True  # profile one faces sampling call and one faces training step


QUICK = BenchSettings(warmup=1, repeats=3, matmul_size=2048, loader_images=480)
FULL = BenchSettings(warmup=2, repeats=7, matmul_size=4096, loader_images=1920)


@dataclass
class Case:
    """One model to benchmark: its training config (model sizes, batch, losses) and its CLIP."""

    name: str  # "demo", "faces", or a test's own name
    config: Any  # helpers.train.TrainConfig; its batch_size is the training batch
    clip_spec: str  # a load_clip spec, or "ARCH/random" ("ViT-B-32/random", "demo/random")
    sample_batches: tuple[int, ...] = SAMPLE_BATCHES
    compare_unfolded: tuple[int, ...] = (16,)  # sampling batches also timed without BN folding
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """(median seconds of one call, every timed call) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class _TotalsOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts towards the total only.

    The tracker's backward hooks fail inside ``torch.autograd.grad`` (which R1 and MA-GP
    call during a step), and the bench needs totals, not a per-module table.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def totals_counter() -> Any:
    """A FlopCounterMode that keeps totals per op only (``_TotalsOnly``), usable on a step with R1."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    return counter


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmul/conv/attention, forward and backward), by FlopCounterMode."""
    with totals_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, *, size: int, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """The machine's reference rate: a [size, size] @ [size, size] matmul, fp32 on a CPU; on a GPU the
    dtype training's mixed precision uses there (bf16 where native, fp16 on a T4: ``devices.amp_dtype``).

    Returns dict(dtype, size, median_s, gflop_per_s).
    """
    from ..devices import amp_dtype

    dtype = amp_dtype(device) if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    seconds, _ = median_time(lambda: a @ b, device=device, warmup=warmup, repeats=repeats)
    return dict(dtype=str(dtype).removeprefix("torch."), size=size, median_s=seconds,
                gflop_per_s=2 * size**3 / seconds / 1e9)


def _cpu_peak_reset() -> bool:
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    """Peak resident memory since the last reset (VmHWM), else the process's lifetime peak (maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux kB


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measures the peak memory of the block: yields a dict whose ``bytes`` is filled on exit.

    GPU: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's peak
    resident set (reset at entry where Linux allows, else the peak since the process began).
    """
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["reset"] = _cpu_peak_reset()
    try:
        yield out
    finally:
        synchronize(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak_bytes()


# --------------------------------------------------------------------------- the models


def make_clip(spec: str, device: torch.device):
    """A ClipEncoder: ``load_clip(spec)``, or for ``"ARCH/random"`` that architecture with random weights.

    ``"ViT-B-32/random"`` is open_clip's ViT-B-32 (any open_clip model name works), randomly
    initialised: the same FLOPs as OpenAI's weights, built offline. ``"demo/random"`` is the
    demo CLIP's architecture (``demo_clip.DEMO_CLIP_CONFIG``).
    """
    from ..clip_encoder import ClipEncoder, _image_size, build_clip_model, load_clip

    if not spec.endswith(RANDOM_SUFFIX):
        return load_clip(spec, device=device)
    import open_clip

    arch = spec[: -len(RANDOM_SUFFIX)]
    if arch == "demo":
        from .demo_clip import DEMO_CLIP_CONFIG

        model = build_clip_model(DEMO_CLIP_CONFIG, seed=0)
    else:
        logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: that is the point
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = open_clip.create_model(arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return ClipEncoder(model, tokenizer, spec, image_size=_image_size(model)).to(device)


def preset_case(preset: str, *, batch_size: int = DEFAULT_TRAIN_BATCH) -> Case:
    """The benchmark case of a preset: ``faces`` with a random ViT-B-32 CLIP loss on the last stage,
    ``demo`` as the embedded demo trains it (demo-CLIP loss at 64 px and at the last stage)."""
    from ..config import model_preset
    from .build_demo import demo_train_config
    from ..train import train_preset

    if preset == "faces":
        return Case("faces", train_preset("faces", batch_size=batch_size), "ViT-B-32" + RANDOM_SUFFIX)
    if preset == "demo":
        from .demo_clip import DEMO_CLIP_CONFIG

        model = model_preset("demo", text_dim=DEMO_CLIP_CONFIG["embed_dim"])  # the demo CLIP's feature size
        config = dataclasses.replace(demo_train_config(1), batch_size=batch_size, model=model)
        return Case("demo", config, "demo" + RANDOM_SUFFIX)
    raise ValueError(f"unknown preset {preset!r}; choose demo or faces")


def random_batch(config, *, dim: int, generator: torch.Generator) -> dict[str, Any]:
    """A collated batch shaped like FeaturesDataset's: images per stage [B, 3, 64*2**i, same]
    in [-1, 1], text / mismatched / image features [B, dim] L2-normalised."""
    B = config.batch_size

    def feature() -> Tensor:
        return nn.functional.normalize(torch.randn(B, dim, generator=generator), dim=1)

    images = [torch.rand(B, 3, r, r, generator=generator) * 2 - 1 for r in config.model.resolutions]
    return dict(images=images, text_feature=feature(), mismatched_text_feature=feature(),
                image_feature=feature(), index=torch.arange(B))


def forward_flops(case: Case, trainer, clip, batch: dict[str, Any]) -> dict[str, Any]:
    """Forward FLOPs per image of G, of each D (trunk and every head) and of the CLIP image tower,
    and the step's bound derived from them (see ``step_flops_bound``)."""
    B = case.config.batch_size
    prepared = trainer.prepare_batch(batch)
    with torch.no_grad():
        g = count_flops(lambda: trainer.G(prepared["text"], torch.randn(B, case.config.model.z_dim, device=trainer.device)))
    mu = torch.zeros(B, case.config.model.cond_dim, device=trainer.device)

    # Inputs that need a gradient, as in the G step: without one, nn.MultiheadAttention takes a fused
    # inference path whose projections FlopCounterMode does not see (CLIP, and a CLIP-aided D's CLIP).
    def needs_grad(images: Tensor) -> Tensor:
        return images.detach().requires_grad_(True)

    d = [count_flops(lambda i=i, disc=disc: disc(needs_grad(prepared["real"][i]), mu)) for i, disc in enumerate(trainer.D)]
    c = [count_flops(lambda i=i: clip.embed_generated(needs_grad(prepared["real"][i]))) for i in trainer.clip_stages]
    per = dict(G=g / B, D=[x / B for x in d], clip=[x / B for x in c], g_rows=(B + trainer.twins(B)) / B)
    cfg = case.config
    per["penalty_rate"] = (1.0 / cfg.reg_every) if cfg.r1_weight > 0 or cfg.ma_gp_weight > 0 else 0.0
    per["bound"] = step_flops_bound(per["G"], per["D"], per["clip"], g_rows=per["g_rows"],
                                    penalty_rate=per["penalty_rate"])
    return per


def step_flops_bound(
    g: float, d: list[float], clip: list[float], *, g_rows: float = 1.0, penalty_rate: float = 0.0,
) -> float:
    """FLOPs per image a training step with no wasted work stays under (averaged over steps).

    Each network runs forward once per image batch it sees: G once (fakes generated
    once, reused by D and G), each D three times (real, detached fakes, fakes for G;
    its trunk once per batch, all heads on the same features), CLIP once per configured
    stage; a backward costs at most twice its forward. So 3 * (G + 3 * sum(D) + sum(CLIP)).
    Regenerating the fakes for the G step, backpropagating through G once per
    discriminator, or running a D trunk per head all break it. ``g_rows``: images G
    generates per batch image (1.25 with the mode-seeking term's second draws).
    ``penalty_rate``: the share of steps with a gradient penalty (R1 / MA-GP: 1 / reg_every);
    such a step differentiates D's verdict on the real batch twice more (the input gradient
    with its graph, then that graph's backward), at most 4 * sum(D) more.
    """
    return 3.0 * (g_rows * g + 3.0 * sum(d) + sum(clip)) + penalty_rate * 4.0 * sum(d)


# --------------------------------------------------------------------------- the rows


def _row(kind: str, name: str, batch: int, seconds: float, flops_per_call: int | None, rate: float,
         memory: dict[str, Any], **extra: Any) -> dict[str, Any]:
    per_image = flops_per_call / batch if flops_per_call is not None else None
    gflop_s = flops_per_call / seconds / 1e9 if flops_per_call is not None else None
    return dict(
        kind=kind, name=name, batch=batch, median_s=seconds, ms_per_image=1e3 * seconds / batch,
        images_per_s=batch / seconds, gflop_per_image=None if per_image is None else per_image / 1e9,
        gflop_per_s=gflop_s, fraction_of_matmul=None if gflop_s is None else gflop_s / rate,
        peak_memory_mb=memory["bytes"] / 2**20, **extra,
    )


def sampling_rows(case: Case, *, device: torch.device, settings: BenchSettings, rate: float) -> list[dict[str, Any]]:
    """Sampling time per image through ``generate_from_features`` at each batch of the case.

    Variant ``folded+NHWC`` is what sampling runs (``sample.inference_copy``); at the
    batches in ``case.compare_unfolded`` also ``folded`` (BatchNorm folded, NCHW) and
    ``plain`` (the eval-mode generator as trained), for before/after.
    """
    from ..network import build_models, fold_batchnorm
    from ..sample import LoadedGenerator, generate_from_features, inference_copy

    cfg = case.config.model
    generator, _ = build_models(cfg, seed=0)
    generator = generator.eval().requires_grad_(False).to(device)
    path = Path("<random weights>")
    lean = LoadedGenerator(generator, cfg, case.clip_spec, 0, path, inference_copy(generator))
    rows = []
    for batch in case.sample_batches:
        variants = [(SAMPLING_VARIANT, lean)]
        if batch in case.compare_unfolded:
            variants.append(("folded", LoadedGenerator(generator, cfg, case.clip_spec, 0, path, fold_batchnorm(generator))))
            variants.append(("plain", LoadedGenerator(generator, cfg, case.clip_spec, 0, path)))
        for variant, model in variants:
            text = nn.functional.normalize(torch.randn(batch, cfg.text_dim, generator=torch.Generator().manual_seed(1)), dim=1)
            seeds = list(range(batch))

            def call(model=model, text=text, seeds=seeds, batch=batch) -> None:
                generate_from_features(model, text, seeds, batch_size=batch)

            with peak_memory(device) as mem:
                flops = count_flops(call)
                seconds, _ = median_time(call, device=device, warmup=settings.warmup, repeats=settings.repeats)
            rows.append(_row("sample", f"sample {case.name}", batch, seconds, flops, rate, mem, preset=case.name,
                             variant=variant))
    return rows


def use_fused_adam(trainer) -> None:
    """Replace the Trainer's Adam optimisers by fused ones (same parameters and settings):
    one kernel pass per tensor instead of one op per update term. Fused Adam runs on the
    CPU too (torch >= 2.4); the Trainer fuses on CUDA only."""
    def fused(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        params = [p for group in opt.param_groups for p in group["params"]]
        return torch.optim.Adam(params, lr=opt.defaults["lr"], betas=opt.defaults["betas"], fused=True)

    trainer.opt_G = fused(trainer.opt_G)
    trainer.opt_D = [fused(opt) for opt in trainer.opt_D]


def training_rows(case: Case, *, device: torch.device, settings: BenchSettings, rate: float,
                  amp_variants: tuple[bool, ...] = (True, False)) -> tuple[list[dict[str, Any]], Any]:
    """One full training step (every D step + the G step, CLIP loss included) in images/s.

    Returns (rows, the first Trainer, for a breakdown). On a GPU each AMP setting in
    ``amp_variants`` gets its own row; on the CPU (no AMP) the step as the Trainer runs it
    and the same step with fused Adam (``use_fused_adam``), for before/after.
    """
    from ..train import Trainer

    clip = make_clip(case.clip_spec, device)
    variants = [(amp, False) for amp in amp_variants] if device.type == "cuda" else [(False, False), (False, True)]
    rows, first = [], None
    for amp, fused in variants:
        config = dataclasses.replace(case.config, amp=amp)
        batch = random_batch(config, dim=clip.dim, generator=torch.Generator().manual_seed(0))
        with peak_memory(device) as mem:
            trainer = Trainer(config, clip=clip, device=device)
            if fused:
                use_fused_adam(trainer)
            per = forward_flops(case, trainer, clip, batch)
            # the mean over a cycle of lazy regularisation (one penalty step, reg_every - 1 without);
            # these are also the first warm-up steps
            cycle = config.reg_every if per["penalty_rate"] else 1
            flops = sum(count_flops(lambda: trainer.train_step(batch)) for _ in range(cycle)) // cycle
            seconds, _ = median_time(lambda: trainer.train_step(batch), device=device,
                                     warmup=settings.warmup, repeats=settings.repeats)
        variant = ("AMP " + str(trainer.amp_dtype).removeprefix("torch.")) if trainer.use_amp else "fp32"
        rows.append(_row(
            "train", f"train step {case.name}", config.batch_size, seconds, flops, rate, mem, preset=case.name,
            variant=variant + (", fused Adam" if fused else ""), clip=case.clip_spec, clip_stages=list(trainer.clip_stages),
            forward_gflop_per_image=dict(G=per["G"] / 1e9, D=[x / 1e9 for x in per["D"]], clip=[x / 1e9 for x in per["clip"]]),
            g_rows=per["g_rows"],
            bound_gflop_per_image=per["bound"] / 1e9,
        ))
        if first is None:
            first = trainer
    return rows, first


def write_random_features(path: Path, *, n: int, dim: int, seed: int = 0) -> Path:
    """A features file of ``n`` random 256 px images and features (for the loader benchmark)."""
    import numpy as np

    from ..features import write_features

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    k = 2
    return write_features(
        path,
        images=rng.integers(0, 256, size=(n, 256, 256, 3), dtype=np.uint8),
        image_features=nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1),
        text_features=nn.functional.normalize(torch.randn(n, k, dim, generator=g), dim=-1),
        caption_counts=torch.full((n,), k),
        captions=[[f"caption {j}" for j in range(k)] for _ in range(n)],
        ids=[f"{i:06d}" for i in range(n)],
        split=["train"] * n,
        meta=dict(clip_spec="tiny-random", source="bench"),
    )


def loader_row(*, device: torch.device, settings: BenchSettings, batch_size: int, num_stages: int = 3) -> dict[str, Any]:
    """The training loop's data path on its own (FeaturesDataset, seeded items, the run's
    sampler, its worker count and pinning), in images/s at steady state over a random file.

    Training keeps one loader for the whole run, so the workers' start (until the first
    batch arrives) is reported apart (``startup_s``) and not counted in the rate.
    """
    from torch.utils.data import DataLoader

    from ..features import FeaturesDataset
    from ..train import RunBatches, SeededItems

    n = max(settings.loader_images, 4 * batch_size)
    workers = 2 if device.type == "cuda" else 0  # what train() uses by default
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_features(Path(tmp) / "bench.pt", n=n, dim=32)
        dataset = FeaturesDataset(path, split="train", num_stages=num_stages)
        steps = len(dataset) // batch_size

        def one_pass() -> tuple[float, float]:
            """(seconds until the first batch, seconds per image after it)."""
            t0 = time.perf_counter()
            sampler = RunBatches(len(dataset), batch_size, seed=0, start_step=0, total_steps=steps)
            loader = iter(DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                                     pin_memory=device.type == "cuda"))
            [x.to(device, non_blocking=True) for x in next(loader)["images"]]
            synchronize(device)
            t1 = time.perf_counter()
            for batch in loader:
                [x.to(device, non_blocking=True) for x in batch["images"]]
            synchronize(device)
            return t1 - t0, (time.perf_counter() - t1) / ((steps - 1) * batch_size)

        with peak_memory(device) as mem:
            for _ in range(settings.warmup):
                one_pass()
            passes = [one_pass() for _ in range(max(1, settings.repeats // 2))]
    per_image = statistics.median(p[1] for p in passes)
    row = _row("loader", "data loader", batch_size, per_image * batch_size, None, 1.0, mem, workers=workers,
               startup_s=statistics.median(p[0] for p in passes))
    return row


# --------------------------------------------------------------------------- breakdown


NORM_OPS = ("batch_norm", "layer_norm", "group_norm")


def _op_timer(device: torch.device):
    """A dispatch mode adding up the time of every aten op (forward and backward) by op name."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class OpTimer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: dict[str, float] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._overloadpacket not in flop_registry:
                # time composite ops by their parts, as FlopCounterMode counts them (conv2d -> convolution)
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            synchronize(device)  # GPU ops are asynchronous: time each one to its end
            name = str(func.overloadpacket)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

    return OpTimer()


def op_category(name: str, flops: int) -> str:
    """'matmul/conv' (ops with counted FLOPs), 'normalisation', or 'elementwise/other'."""
    if flops > 0:
        return "matmul/conv"
    if any(k in name for k in NORM_OPS):
        return "normalisation"
    return "elementwise/other"


def time_breakdown(fn: Callable[[], Any], *, device: torch.device, rate: float, top: int = 8) -> dict[str, Any]:
    """Count the FLOPs of one call of ``fn`` per op, then time a second call op by op.

    Returns the share of the second call's time per kind of op and per op, and the rate
    of the matmul/conv ops alone (their FLOPs over their time) as a fraction of the matmul
    rate. Time outside aten ops (Python, autograd bookkeeping) is its own share.
    """
    with totals_counter() as counter:  # a run of its own: the counter's overhead stays out of the times
        fn()
    flops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    timer = _op_timer(device)
    t0 = time.perf_counter()
    with timer:
        fn()
    synchronize(device)
    wall = time.perf_counter() - t0
    categories: dict[str, float] = {}
    conv_flops = conv_s = 0.0
    for name, seconds in timer.seconds.items():
        kind = op_category(name, flops.get(name, 0))
        categories[kind] = categories.get(kind, 0.0) + seconds
        if kind == "matmul/conv":
            conv_flops, conv_s = conv_flops + flops[name], conv_s + seconds
    categories["outside ops"] = max(0.0, wall - sum(timer.seconds.values()))
    ops = sorted(timer.seconds.items(), key=lambda kv: -kv[1])[:top]
    return dict(
        wall_s=wall,
        share=dict(sorted(((k, v / wall) for k, v in categories.items()), key=lambda kv: -kv[1])),
        top_ops=[dict(op=name, share=s / wall, gflop_per_s=flops.get(name, 0) / s / 1e9 if s else None) for name, s in ops],
        matmul_conv_fraction_of_matmul=(conv_flops / conv_s / 1e9 / rate) if conv_s > 0 else None,
    )


def layer_flops(fn: Callable[[], Any], *, depth: int = 3) -> dict[str, float]:
    """Share of the counted FLOPs per module (module paths ``depth`` levels deep)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, depth=depth) as counter:
        fn()
    counts = counter.get_flop_counts()
    total = counter.get_total_flops() or 1
    out = {}
    for module, ops in counts.items():
        if module != "Global" and module.count(".") == depth - 1:
            out[module] = sum(ops.values()) / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- the whole run


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU or GPU name, threads, torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(device=str(device), cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(
    *,
    device: str | torch.device | None = None,
    quick: bool = False,
    cases: list[Case] | None = None,
    batch_size: int = DEFAULT_TRAIN_BATCH,
    settings: BenchSettings | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every measurement; returns the report (see ``format_table``; ``json.dumps``-able).

    cases: what to measure (default: the demo and faces presets at ``batch_size``);
    settings: default ``QUICK`` or ``FULL``; on_row(row) is called as each row is done.
    """
    from ..devices import resolve_device

    device = resolve_device(device)
    settings = settings or (QUICK if quick else FULL)
    cases = cases if cases is not None else [preset_case(p, batch_size=batch_size) for p in ("demo", "faces")]
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train() does: denormal floats make CPU arithmetic crawl

    def emit(row: dict[str, Any]) -> dict[str, Any]:
        if on_row is not None:
            on_row(row)
        return row

    started = time.perf_counter()
    reference = matmul_rate(device, size=settings.matmul_size, warmup=2, repeats=max(3, settings.repeats))
    rate = reference["gflop_per_s"]
    emit(dict(kind="matmul", name=f"matmul {reference['size']}^2 {reference['dtype']}", **reference))
    rows: list[dict[str, Any]] = []
    breakdown: dict[str, Any] = {}
    for case in cases:
        rows += [emit(r) for r in sampling_rows(case, device=device, settings=settings, rate=rate)]
    for case in cases:
        train_rows, trainer = training_rows(case, device=device, settings=settings, rate=rate)
        rows += [emit(r) for r in train_rows]
        if settings.breakdown and case is cases[-1]:
            breakdown = _breakdowns(case, trainer, device=device, rate=rate)
    rows.append(emit(loader_row(device=device, settings=settings, batch_size=cases[-1].config.batch_size)))
    # the matmul rate again at the end: how much the machine's speed drifted during the run
    after = matmul_rate(device, size=settings.matmul_size, warmup=1, repeats=max(3, settings.repeats))
    return dict(
        format=BENCH_FORMAT,
        machine=machine_description(device),
        settings=dict(quick=quick, **settings.__dict__),
        matmul=reference,
        matmul_after=after,
        rows=rows,
        breakdown=breakdown,
        reference_t4_images_per_s=list(REFERENCE_T4_IMAGES_PER_S),
        wall_s=time.perf_counter() - started,
    )


def _breakdowns(case: Case, trainer, *, device: torch.device, rate: float) -> dict[str, Any]:
    """Op-by-op breakdowns of the largest sampling batch and of the training step of ``case``."""
    from ..sample import LoadedGenerator, generate_from_features, inference_copy

    cfg = case.config.model
    batch = max(case.sample_batches)
    G = trainer.G_ema.eval()
    model = LoadedGenerator(G, cfg, case.clip_spec, 0, Path("<random weights>"), inference_copy(G))
    text = nn.functional.normalize(torch.randn(batch, cfg.text_dim), dim=1)

    def sample() -> None:
        generate_from_features(model, text, list(range(batch)), batch_size=batch)

    sample()  # warm-up
    out = dict(sample=dict(name=f"sample {case.name}", batch=batch, **time_breakdown(sample, device=device, rate=rate)))
    out["sample"]["flops_by_module"] = layer_flops(sample, depth=3)
    step_batch = random_batch(case.config, dim=trainer.clip.dim, generator=torch.Generator().manual_seed(0))
    step = lambda: trainer.train_step(step_batch)  # noqa: E731
    out["train"] = dict(name=f"train step {case.name}", batch=case.config.batch_size,
                        **time_breakdown(step, device=device, rate=rate))
    out["train"]["optimizers"] = optimizer_times(trainer, device=device)
    return out


def optimizer_times(trainer, *, device: torch.device, repeats: int = 3) -> dict[str, Any]:
    """Seconds of the optimiser steps of one training step (G's and every D's Adam, as the
    Trainer built them), and of the same steps with fused Adam kernels (one pass per tensor
    instead of one op per update term). Uses the gradients the last step left."""
    optimizers = [trainer.opt_G, *trainer.opt_D]
    already = all(bool(o.defaults.get("fused")) for o in optimizers)

    def step_all(opts: list[torch.optim.Optimizer]) -> None:
        for opt in opts:
            opt.step()

    seconds, _ = median_time(lambda: step_all(optimizers), device=device, warmup=1, repeats=repeats)
    out: dict[str, Any] = dict(params=sum(p.numel() for o in optimizers for g in o.param_groups for p in g["params"]),
                               fused=already, seconds=seconds)
    if not already:
        fused = [torch.optim.Adam([p for g in o.param_groups for p in g["params"]], lr=o.defaults["lr"],
                                  betas=o.defaults["betas"], fused=True) for o in optimizers]
        out["fused_seconds"], _ = median_time(lambda: step_all(fused), device=device, warmup=1, repeats=repeats)
        del fused
    return out


# --------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def g_term(g_rows: float) -> str:
    """'G', or 'G x 1.25' when G generates more images than the batch (mode seeking)."""
    return "G" if g_rows == 1.0 else f"G x {g_rows:g}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, with the machine and the reference rate above it."""
    m, ref = report["machine"], report["matmul"]
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"Machine: {where} ({m['device']}, {m['torch_threads']} torch threads, {m['cpu_count']} CPUs), "
        f"torch {m['torch']}, Python {m['python']}.",
        f"Reference rate: {ref['size']}x{ref['size']} {ref['dtype']} matmul {ref['gflop_per_s']:.0f} GFLOP/s "
        f"(at the end of the run: {report['matmul_after']['gflop_per_s']:.0f}).",
        "",
        "| measurement | variant | batch | ms / image | images/s | GFLOP / image | GFLOP/s | % of matmul | peak memory MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        frac = None if r["fraction_of_matmul"] is None else 100 * r["fraction_of_matmul"]
        variant = r.get("variant", f"{r.get('workers', 0)} workers, steady")
        lines.append(
            f"| {r['name']} | {variant} | {r['batch']} | {_fmt(r['ms_per_image'], '.1f')} | "
            f"{_fmt(r['images_per_s'], '.1f')} | {_fmt(r['gflop_per_image'], '.2f')} | {_fmt(r['gflop_per_s'], '.0f')} | "
            f"{_fmt(frac, '.0f')} | {_fmt(r['peak_memory_mb'], '.0f')} |"
        )
    for r in report["rows"]:
        if r["kind"] == "train":
            f = r["forward_gflop_per_image"]
            lines.append("")
            lines.append(
                f"{r['name']} ({r['variant']}): forward GFLOP per image G {f['G']:.2f}, "
                f"D {' + '.join(f'{x:.2f}' for x in f['D'])}, CLIP {' + '.join(f'{x:.2f}' for x in f['clip']) or '0'}; "
                f"step {r['gflop_per_image']:.1f} <= bound 3 ({g_term(r.get('g_rows', 1.0))} + 3 D + CLIP) "
                f"= {r['bound_gflop_per_image']:.1f}."
            )
    for key, b in (report.get("breakdown") or {}).items():
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["share"].items())
        conv = b["matmul_conv_fraction_of_matmul"]
        lines.append("")
        lines.append(
            f"Time of {b['name']} (batch {b['batch']}) by kind of op: {share}; the matmul/conv kernels alone "
            f"run at {_fmt(None if conv is None else 100 * conv, '.0f')}% of the matmul rate."
        )
        lines.append("Top ops: " + ", ".join(
            f"{o['op']} {100 * o['share']:.0f}%" + (f" ({o['gflop_per_s']:.0f} GFLOP/s)" if o["gflop_per_s"] else "")
            for o in b["top_ops"]) + ".")
        if "optimizers" in b:
            o = b["optimizers"]
            lines.append(
                f"Optimiser steps ({o['params'] / 1e6:.1f}M parameters, Adam{' fused' if o['fused'] else ''}): "
                f"{o['seconds']:.2f} s per training step"
                + (f"; with fused Adam kernels {o['fused_seconds']:.2f} s." if "fused_seconds" in o else ".")
            )
        if "flops_by_module" in b:
            lines.append("FLOPs by module: " + ", ".join(
                f"{k.removeprefix('Generator.')} {100 * v:.0f}%" for k, v in list(b["flops_by_module"].items())[:8]) + ".")
    lines.append("")
    lines.append(f"Benchmark wall time {report['wall_s']:.0f} s ({'quick' if report['settings']['quick'] else 'full'} mode).")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically."""
    from ..files import write_json

    return write_json(path, report)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller matmul (minutes on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN_BATCH,
                        help=f"images per training step (default {DEFAULT_TRAIN_BATCH})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, usually one per core)")
    parser.add_argument("--presets", nargs="+", choices=["demo", "faces"], default=["demo", "faces"],
                        help="which presets to measure (default both)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (BatchNorm and InfoNCE need a batch), got {args.batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    def on_row(row: dict[str, Any]) -> None:
        if row["kind"] == "matmul":
            print(f"{row['name']}: {row['gflop_per_s']:.0f} GFLOP/s", flush=True)
        else:
            frac = row["fraction_of_matmul"]
            print(f"{row['name']} [{row.get('variant', str(row.get('workers', 0)) + ' workers')}] batch {row['batch']}: {row['images_per_s']:.2f} images/s"
                  + ("" if frac is None else f", {100 * frac:.0f}% of matmul")
                  + (f" (after {row['startup_s']:.2f} s to the first batch)" if "startup_s" in row else ""), flush=True)

    cases = [preset_case(p, batch_size=args.batch_size) for p in args.presets]
    report = run_bench(device=args.device, quick=args.quick, cases=cases, on_row=on_row)
    print()
    print(format_table(report))
    if args.json:
        print(f"\nwrote {write_report(report, args.json)}")
    return 0
