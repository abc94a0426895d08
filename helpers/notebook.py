"""What the numbered notebooks share: where they run, the smoke mode, where files live,
pictures of a features file, and a live display for training.

The notebooks run in two modes:

- the default, the real path for Google Colab: MM-CelebA-HQ (or CelebAMask-HQ with
  grammar captions), CLIP ViT-B/32, the ``faces`` preset, a GPU;
- the smoke mode, chosen by the environment variable ``HELPERS_SMOKE=1``: a few toy
  faces, the tiny random CLIP, the small ``demo`` model and a few CPU steps, so every
  notebook runs top to bottom in a minute or two offline (the test suite runs them so).

Each notebook's first cell only makes ``helpers`` importable (in Colab by cloning this
repository) and calls ``setup()``, which does the rest: installs the requirements and mounts
Google Drive in Colab, and moves to the repository root.

Notebooks share data through files under one work folder (``HELPERS_WORKDIR``,
default the repository root): ``data/NAME.pt`` (the features file of notebook 01) and
``runs/NAME/`` (the training run of notebook 03). In Colab, with Google Drive mounted,
training mirrors its checkpoints to ``MyDrive/clip-stackgan/runs/NAME`` and the features
file is copied to ``MyDrive/clip-stackgan/data``, so a new runtime picks up where the
last one stopped.

Nothing here prints: functions return text or pictures and the notebook shows them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .assets import ASSETS, DEMO_GENERATOR
from .errors import UserError

REPO = "clip-stackgan/clip-stackgan"  # GitHub owner/name that the badges open and Colab clones (a fork changes it)
BRANCH = "main"
REPO_URL_ENV = "HELPERS_REPO_URL"  # the setup cell clones this address in Colab (default: https://github.com/REPO)
REPO_ROOT = ASSETS.parent  # the repository this package sits in: data/ and runs/ are relative to it
SMOKE_ENV = "HELPERS_SMOKE"  # "1": the small offline smoke mode
WORKDIR_ENV = "HELPERS_WORKDIR"  # where data/ and runs/ live (default: the current folder, the repository root)
DRIVE_MOUNT = Path("/content/drive")
DRIVE_DIR = DRIVE_MOUNT / "MyDrive" / "clip-stackgan"  # this project's folder in a mounted Google Drive
NOTEBOOKS = (
    "01_feature_extraction.ipynb",
    "02_network.ipynb",
    "03_training.ipynb",
    "04_sampling.ipynb",
    "05_evaluation.ipynb",
)

SMOKE_IMAGES = 40  # toy faces in the smoke mode's features file
SMOKE_STEPS = 4  # training steps in the smoke mode
SMOKE_THREADS = 1  # torch threads in the smoke mode: its tensors are tiny, and on a busy machine a
# second thread mostly waits (measured: 4 training steps took 11 s on one thread, 148 s on two)


# --------------------------------------------------------------------------- where we run


def colab_url(notebook: str, *, repo: str = REPO, branch: str = BRANCH) -> str:
    """The "Open in Colab" address of ``notebooks/<notebook>`` on GitHub."""
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{notebook}"


def colab_badge(notebook: str, *, repo: str = REPO, branch: str = BRANCH) -> str:
    """Markdown of the "Open in Colab" badge of a notebook."""
    return f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook, repo=repo, branch=branch)})"


def smoke_mode(environ: dict[str, str] | None = None) -> bool:
    """True when ``HELPERS_SMOKE`` is set to anything but empty, ``0``, ``false`` or ``no``."""
    value = (os.environ if environ is None else environ).get(SMOKE_ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def mount_drive(mount: bool = True) -> Path | None:
    """In Colab (and when ``mount``), mount Google Drive and return this project's Drive folder;
    elsewhere a no-op that returns None."""
    if not mount or not in_colab():
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    if not (DRIVE_MOUNT / "MyDrive").is_dir():
        drive.mount(str(DRIVE_MOUNT))
    DRIVE_DIR.mkdir(parents=True, exist_ok=True)
    return DRIVE_DIR


def drive_dir() -> Path | None:
    """This project's folder in Google Drive when Drive is mounted (Colab), else None."""
    return DRIVE_DIR if (DRIVE_MOUNT / "MyDrive").is_dir() else None


def device_report(*, smoke: bool | None = None, colab: bool | None = None, cuda: bool | None = None) -> list[str]:
    """Lines about the runtime: the mode, Colab or not, the device; a clear warning when a
    Colab runtime (or the real path anywhere) has no GPU."""
    import torch

    smoke = smoke_mode() if smoke is None else smoke
    colab = in_colab() if colab is None else colab
    cuda = torch.cuda.is_available() if cuda is None else cuda
    lines = [
        f"mode: {'smoke (toy faces, tiny CLIP, a few CPU steps)' if smoke else 'full (CLIP ViT-B/32, faces preset)'}"
        f"; {'Google Colab' if colab else 'local'}; torch {torch.__version__}",
        f"device: {torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else ('cuda' if cuda else 'CPU')}",
    ]
    if not cuda and colab:
        lines.append(
            "WARNING: this Colab runtime has no GPU. Choose Runtime > Change runtime type > a GPU (T4 or better), "
            "then run the notebook again from the top; the faces preset is far too slow on a CPU."
        )
    elif not cuda and not smoke:
        lines.append(
            "note: no GPU found. Extraction and sampling work on a CPU but slowly; training the faces preset "
            f"needs a GPU (for a quick CPU run set {SMOKE_ENV}=1 or choose the demo preset)."
        )
    return lines


def repo_url(environ: dict[str, str] | None = None) -> str:
    """The address the setup cell clones in Colab: ``HELPERS_REPO_URL``, else this repository on GitHub."""
    return (os.environ if environ is None else environ).get(REPO_URL_ENV) or f"https://github.com/{REPO}"


def install_requirements(root: str | os.PathLike = REPO_ROOT) -> None:
    """``pip install -r requirements.txt`` into this kernel's Python (Colab has torch, not the rest)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(Path(root) / "requirements.txt")],
                   check=True)


def setup(*, mount: bool = True, root: str | os.PathLike | None = None) -> list[str]:
    """Everything the notebooks' setup cell does once ``helpers`` imports; returns lines to print.

    In Colab: install ``requirements.txt`` and (when ``mount``) mount Google Drive. Everywhere:
    move to the repository root ``root`` (default: the one this package sits in), so that
    ``data/`` and ``runs/`` are relative to it as for the command line, and in the smoke mode
    run torch on ``SMOKE_THREADS`` thread(s). The lines name the repository, the Drive folder
    and the runtime (``device_report``).
    """
    root = Path(root) if root is not None else REPO_ROOT
    if in_colab():
        install_requirements(root)
    os.chdir(root)
    lines = [f"repository: {root}"]
    drive = mount_drive(mount)
    if drive is not None:
        lines.append(f"Google Drive: {drive}")
    if smoke_mode():
        import torch

        torch.set_num_threads(SMOKE_THREADS)
    return lines + device_report()


# --------------------------------------------------------------------------- the shared settings


@dataclass
class NotebookConfig:
    """The choices the notebooks share; each notebook's settings cell fills it from its form fields."""

    smoke: bool = False  # the small offline mode (HELPERS_SMOKE=1): toy faces, tiny CLIP, a few CPU steps
    source: str = "mm-celeba-hq"  # what extraction reads: mm-celeba-hq, celebamask-hq, toyfaces:N, a folder or zip
    clip: str = "ViT-B-32"  # CLIP for extraction; training and sampling follow the features file
    captions_per_image: int = 10  # captions encoded per image (MM-CelebA-HQ has 10)
    preset: str = "faces"  # training preset: faces (reference sizes, GPU) or demo (small, CPU)
    name: str = "faces"  # names the features file data/NAME.pt and the run folder runs/NAME
    workdir: Path = field(default_factory=Path.cwd)  # data/ and runs/ live here
    drive: Path | None = None  # this project's Google Drive folder (mirrored checkpoints, features copy)
    device: str | None = None  # "cuda" or "cpu"; None: CUDA when present

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def features(self) -> Path:
        """The features file notebook 01 writes: WORKDIR/data/NAME.pt (+ NAME.images.npy)."""
        return self.data_dir / f"{self.name}.pt"

    @property
    def run_dir(self) -> Path:
        """The training run of notebook 03: WORKDIR/runs/NAME."""
        return self.workdir / "runs" / self.name

    @property
    def mirror_dir(self) -> Path | None:
        """Where training mirrors its files in Google Drive (None without Drive)."""
        return self.drive / "runs" / self.name if self.drive is not None else None

    def latest_checkpoint(self) -> Path | None:
        """The run's latest.pt: the local one, else the Drive mirror's, else None."""
        from .run_folder import find_resume_checkpoint

        try:
            return find_resume_checkpoint(self.run_dir, True, self.mirror_dir)
        except UserError:
            return None


def notebook_config(*, smoke: bool | None = None, workdir: str | os.PathLike | None = None, **fields: Any) -> NotebookConfig:
    """The notebooks' settings from their form fields (keyword arguments named like the fields).

    smoke: default from ``HELPERS_SMOKE``; in the smoke mode the source, CLIP, captions,
    preset, name, Drive and device are replaced by the smoke values (toy faces, tiny random
    CLIP, demo preset, CPU). workdir: default ``HELPERS_WORKDIR``, else the current folder.
    """
    smoke = smoke_mode() if smoke is None else smoke
    workdir = Path(workdir or os.environ.get(WORKDIR_ENV) or Path.cwd()).expanduser().resolve()
    fields.setdefault("drive", drive_dir())
    if smoke:
        fields.update(source=f"toyfaces:{SMOKE_IMAGES}", clip="tiny-random", captions_per_image=2,
                      preset="demo", name="smoke", drive=None, device="cpu")
    return NotebookConfig(smoke=smoke, workdir=workdir, **fields)


def train_config(cfg: NotebookConfig, **overrides: Any):
    """The ``TrainConfig`` of notebook 03: the preset with the form's overrides (and the Drive
    mirror); in the smoke mode a few tiny CPU steps instead, whatever the form says."""
    from .train import train_preset

    if cfg.smoke:
        return train_preset("demo", steps=SMOKE_STEPS, batch_size=4, log_every=1, preview_every=2,
                            checkpoint_every=2, snapshot_every=SMOKE_STEPS, num_workers=0)
    if cfg.mirror_dir is not None:
        overrides.setdefault("mirror_dir", str(cfg.mirror_dir))
    return train_preset(cfg.preset, **overrides)


# the form fields a rerun passes on (a subset of train_config.RESUMABLE, which resume_config enforces)
RERUN_FIELDS = ("steps", "epochs", "mirror_dir", "log_every", "preview_every", "checkpoint_every")


def training_arguments(cfg: NotebookConfig, train_cfg: Any) -> dict[str, Any]:
    """``config``, ``overrides`` and ``resume`` for ``helpers.train.train`` in notebook 03.

    A new run starts from ``train_cfg``. When the run already has a ``latest.pt`` (here or in
    the Drive mirror), it continues exactly, with the checkpoint's own config: only the
    run's length, its intervals and the mirror come from ``train_cfg`` (as ``--resume`` with
    ``--epochs``/``--steps``/``--mirror`` does on the command line).
    """
    if cfg.latest_checkpoint() is None:
        return dict(config=train_cfg, overrides={}, resume=False)
    return dict(config=None, overrides={k: getattr(train_cfg, k) for k in RERUN_FIELDS}, resume=True)


# --------------------------------------------------------------------------- files the notebooks share


def copy_features(src: Path, dst: Path) -> Path:
    """Copy a features file and its image array (each atomically, the array first)."""
    from .files import copy_atomic
    from .features import images_path

    copy_atomic(images_path(src), images_path(dst))
    return copy_atomic(src, dst)


def extract(cfg: NotebookConfig, **kwargs: Any):
    """Notebook 01's extraction: ``cfg.source`` -> ``cfg.features`` with ``cfg.clip`` (resumable),
    then a copy to Google Drive when mounted. Returns the ``ExtractSummary``."""
    from .extract import extract_features

    summary = extract_features(cfg.source, cfg.features, clip=cfg.clip, captions_per_image=cfg.captions_per_image,
                               data_dir=cfg.data_dir, device=cfg.device, **kwargs)
    if cfg.drive is not None:
        copy_features(cfg.features, cfg.drive / "data" / cfg.features.name)
    return summary


def ensure_features(cfg: NotebookConfig) -> tuple[Path, str]:
    """The features file, found or made: local, else copied from Drive, else (smoke mode only)
    extracted now. Returns (path, what happened). Raises UserError when the real path has none."""
    if cfg.features.is_file():
        return cfg.features, f"features: {cfg.features}"
    if cfg.drive is not None and (cfg.drive / "data" / cfg.features.name).is_file():
        copy_features(cfg.drive / "data" / cfg.features.name, cfg.features)
        return cfg.features, f"features: copied from Google Drive to {cfg.features}"
    if cfg.smoke:
        summary = extract(cfg, progress=False)
        return cfg.features, f"features: none yet, extracted {summary.num_images} toy faces into {cfg.features}"
    raise UserError(f"no features file {cfg.features}: run 01_feature_extraction first with the same NAME "
                    f"({cfg.name!r}), or put a features file there")


def ensure_checkpoint(cfg: NotebookConfig, choice: str = "") -> Path | None:
    """The checkpoint a notebook samples or evaluates: ``choice`` "demo" means the embedded demo
    model (None), a path means that file, "" means the run of notebook 03 (in the smoke mode a
    few steps are trained first when it has none). Raises UserError when there is nothing."""
    choice = str(choice).strip()
    if choice == "demo":
        return None
    if choice:
        return Path(choice).expanduser()
    found = cfg.latest_checkpoint()
    if found is not None:
        return found
    if cfg.smoke:
        from .train import train

        features, _ = ensure_features(cfg)
        return train(features, cfg.run_dir, train_config(cfg), device=cfg.device, progress=False).checkpoint
    raise UserError(f"no checkpoint in {cfg.run_dir / 'checkpoints'}: train in 03_training first (same NAME "
                    f"{cfg.name!r}), or set CHECKPOINT to a checkpoint path or to 'demo'")


# --------------------------------------------------------------------------- pictures


def picture_note(cfg: NotebookConfig, model: Any = None) -> str:
    """One line to print beside generated pictures: in the smoke mode, why they are near-gray
    ("" otherwise, and "" for the embedded demo model, which is trained). ``model``: the
    ``LoadedGenerator`` that drew them, when there is one (its step is named)."""
    if not cfg.smoke or (model is not None and Path(model.path) == DEMO_GENERATOR):
        return ""
    steps = f"{model.step} steps" if model is not None else f"a few steps ({SMOKE_STEPS})"
    return (f"smoke mode: the pictures come from a tiny model trained for {steps}, so they are near-gray; "
            f"run without {SMOKE_ENV} for real pictures.")


def sample_pairs(features: str | os.PathLike, *, n: int = 8, seed: int = 0) -> tuple[Any, list[str], list[str]]:
    """``n`` random images of a features file with one caption each.

    Returns (images [n, 3, 256, 256] in [-1, 1], captions, ids); an image without a
    caption gets "(no caption)".
    """
    import torch

    from .features import FeaturesDataset

    data = FeaturesDataset(features, split="all", num_stages=1)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=gen)[: min(n, len(data))].tolist()
    images = torch.stack([data.image(i) for i in rows])
    captions = [data.captions[i][0] if data.captions[i] else "(no caption)" for i in rows]
    return images, captions, [data.ids[i] for i in rows]


def feature_statistics(features: str | os.PathLike, *, seed: int = 0) -> dict[str, Any]:
    """Numbers that say whether a features file looks right.

    counts (images, train/test, captions), the CLIP spec and feature size, the mean
    norm of the stored features (1 when L2-normalised), and the cosine similarity of
    every image with its own first caption (``matched``) and with another image's
    caption (``mismatched``): CLIP should score the matched pairs clearly higher.
    Also returns the two similarity lists for a histogram.
    """
    import torch

    from .features import read_features

    data = read_features(features)
    image = data["image_features"].float()  # [N, D]
    counts = data["caption_counts"]
    has = counts > 0
    text = data["text_features"][:, 0].float()  # [N, D] first caption
    idx = torch.nonzero(has).flatten()
    matched = (image[idx] * text[idx]).sum(1)
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, max(len(idx), 2), (), generator=gen) if len(idx) > 1 else 0
    others = idx.roll(int(shift))
    mismatched = (image[idx] * text[others]).sum(1)
    split = data["split"]
    return dict(
        images=len(split),
        train=sum(s == "train" for s in split),
        test=sum(s == "test" for s in split),
        captions=int(counts.sum()),
        images_without_caption=int((~has).sum()),
        clip_spec=str(data["meta"].get("clip_spec", "")),
        dim=int(image.shape[1]),
        image_feature_norm=float(image.norm(dim=1).mean()),
        text_feature_norm=float(text[idx].norm(dim=1).mean()) if len(idx) else float("nan"),
        matched_cosine=float(matched.mean()) if len(idx) else float("nan"),
        mismatched_cosine=float(mismatched.mean()) if len(idx) else float("nan"),
        attributes=list(data["attributes"]["names"]) if "attributes" in data else [],
        matched=matched.tolist(),
        mismatched=mismatched.tolist(),
    )


def format_statistics(stats: dict[str, Any]) -> str:
    """The scalar entries of ``feature_statistics`` as aligned text lines."""
    lines = []
    for key, value in stats.items():
        if key in ("matched", "mismatched"):
            continue
        if key == "attributes":
            value = ", ".join(value) if value else "none"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key.replace('_', ' '):<24} {value}")
    return "\n".join(lines)


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def similarity_histogram(stats: dict[str, Any]):
    """A PIL picture: histograms of the matched and mismatched cosine similarities."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(6, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = stats["matched"] + stats["mismatched"]
    bins = 30 if values else 1
    ax.hist(stats["matched"], bins=bins, alpha=0.6, label="image and its caption")
    ax.hist(stats["mismatched"], bins=bins, alpha=0.6, label="image and another caption")
    ax.set_xlabel(f"cosine similarity ({stats['clip_spec']})")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Image.open(io.BytesIO(_figure_png(fig)))


# --------------------------------------------------------------------------- one training step by hand


def loss_table(values: dict[str, float]) -> str:
    """The loss terms of one training step (``Trainer.train_step``'s dict) as aligned lines,
    sorted by name, so that terms with a common prefix (the D terms, the G terms) sit together."""
    if not values:
        return "(no loss terms)"
    width = max(len(name) for name in values)
    return "\n".join(f"{name:<{width}}  {value:>10.4f}" for name, value in sorted(values.items()))


def with_text_dim(train_cfg: Any, dim: int) -> Any:
    """``train_cfg`` with ``model.text_dim = dim``: a ``Trainer`` built by hand needs the features
    file's text size, which ``helpers.train.train`` sets the same way."""
    return dataclasses.replace(train_cfg, model=dataclasses.replace(train_cfg.model, text_dim=dim))


# --------------------------------------------------------------------------- live training display


class LiveTraining:
    """``on_log`` / ``on_sample`` callbacks for ``helpers.train.train`` that keep three
    outputs of a notebook cell up to date: a status line, the loss curves and the
    latest preview grid.

    history: rows already logged (e.g. ``read_metrics(run_dir / "metrics.jsonl")`` when
    resuming), so the curves start at step 0. The loss plot is redrawn at most every
    ``plot_every_s`` seconds (and by ``finish()``). ``display`` defaults to IPython's
    ``display``; it is called as ``display(obj, display_id=True)`` and must return a
    handle with ``update(obj)``.
    """

    def __init__(self, history: list[dict[str, Any]] | None = None, *, plot_every_s: float = 10.0,
                 display: Callable[..., Any] | None = None) -> None:
        if display is None:
            from IPython.display import display
        self._display = display
        self.history: list[dict[str, Any]] = list(history or [])
        self.plot_every_s = plot_every_s
        self._last_plot = -float("inf")
        self._handles: dict[str, Any] = {}
        self.previews: list[Path] = []

    def _show(self, key: str, obj: Any) -> None:
        if not self._handles:  # three output slots, always in this order
            from IPython.display import Pretty

            for name in ("status", "loss", "preview"):
                self._handles[name] = self._display(Pretty(""), display_id=True)
        self._handles[key].update(obj)

    @staticmethod
    def status(row: dict[str, Any]) -> str:
        """One line for a metrics row: step, epoch, the D and G totals, speed."""
        from .train import D_LOSS, G_LOSS, IMAGES_PER_S

        nan = float("nan")
        return (f"step {row['step']}  epoch {row.get('epoch', 0)}  D {row.get(D_LOSS, nan):.4f}  "
                f"G {row.get(G_LOSS, nan):.4f}  {row.get(IMAGES_PER_S, 0.0):.1f} images/s")

    def plot(self) -> bytes | None:
        """Draw the loss curves of the rows so far; PNG bytes (None before the first row)."""
        from IPython.display import Image

        from .train import plot_loss_curves

        if not self.history:
            return None
        with tempfile.TemporaryDirectory(prefix="live-training-") as folder:
            data = plot_loss_curves(self.history, Path(folder) / "loss_curves.png").read_bytes()
        self._show("loss", Image(data=data, format="png"))
        self._last_plot = time.monotonic()
        return data

    def on_log(self, row: dict[str, Any]) -> None:
        """The ``on_log`` callback: a new metrics row."""
        from IPython.display import Pretty

        self.history.append(row)
        self._show("status", Pretty(self.status(row)))
        if time.monotonic() - self._last_plot >= self.plot_every_s:
            self.plot()

    def on_sample(self, step: int, grid: Any, path: Path) -> None:
        """The ``on_sample`` callback: a new preview (rows: stages, columns: preview captions).

        grid: a PIL image (a labelled ``preview_picture``) or a tensor [3, H, W] in [0, 1];
        path: the PNG file training wrote.
        """
        from IPython.display import Image

        from .pictures import png_bytes, to_pil

        self.previews.append(Path(path))
        picture = grid if hasattr(grid, "save") else to_pil(grid.detach().float().cpu() * 2 - 1)  # [0, 1] -> [-1, 1]
        self._show("preview", Image(data=png_bytes(picture), format="png"))

    def finish(self) -> None:
        """Draw the final curves (call after training, or after an interruption)."""
        self.plot()
