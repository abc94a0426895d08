"""A training run's folder: checkpoints, previews, metrics, the loss plot and the Drive mirror.

``RUN_DIR/checkpoints/latest.pt`` (+ ``step_XXXXXXX.pt`` snapshots),
``RUN_DIR/previews/step_XXXXXXX.png``, ``RUN_DIR/metrics.jsonl`` (one JSON row
per log step, hierarchical names such as ``loss/d/stage0/cond``) and
``RUN_DIR/loss_curves.png``. With a mirror folder (Google Drive in Colab),
every write is copied there too, so a new runtime can continue from it. Only
one process writes (``writer=True``: rank 0 under torchrun); the others' calls
do nothing.
"""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .assets import PREVIEW_CAPTIONS
from .checkpoint import LATEST, prune_snapshots, save_training_checkpoint, snapshot_name
from .errors import UserError
from .files import atomic_write_bytes, copy_atomic, remove_stale_temps

IMAGES_PER_S = "perf/images_per_s"  # training speed of the logged steps
CHECKPOINTS = "checkpoints"  # the run folder's checkpoint folder (latest.pt and the snapshots)
# metrics.jsonl rows written before the names were hierarchical: old name -> new name
_FLAT_NAMES = {"d_loss": "loss/d", "g_loss": "loss/g", "kl": "loss/g/kl", "mode_seeking": "loss/g/mode_seeking",
               "images_per_s": IMAGES_PER_S}


def metric_name(old: str) -> str:
    """A metric's current name: ``d0_cond`` -> ``loss/d/stage0/cond``, ``g1`` -> ``loss/g/stage1``; others as they are."""
    if old in _FLAT_NAMES:
        return _FLAT_NAMES[old]
    side, rest = old[:1], old[1:]
    stage, _, term = rest.partition("_")
    if side in "dg" and stage.isdigit():
        return f"loss/{side}/stage{stage}" + (f"/{term}" if term else "")
    return old


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a missing file gives []); rows of older runs get today's names."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{metric_name(k): v for k, v in row.items()} for row in rows]


def load_preview_captions(path: str | os.PathLike | None = None) -> list[str]:
    """The fixed preview captions: one per non-empty line of ``path`` (default: assets/preview_captions.txt)."""
    path = Path(path) if path else PREVIEW_CAPTIONS
    if not path.is_file():
        raise UserError(f"preview captions file not found: {path} (one caption per line)")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise UserError(f"{path} has no captions: write one caption per line")
    return captions


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """Where a run folder (or its mirror) keeps its newest training checkpoint: RUN_DIR/checkpoints/latest.pt."""
    return Path(run_dir) / CHECKPOINTS / LATEST


def find_resume_checkpoint(
    run_dir: str | os.PathLike, resume: bool | str | os.PathLike, mirror_dir: str | os.PathLike | None,
) -> Path:
    """The checkpoint to resume from: an explicit path, or RUN_DIR/checkpoints/latest.pt, or the mirror's."""
    if not isinstance(resume, bool):
        return Path(resume)
    candidates = [latest_checkpoint(run_dir)]
    if mirror_dir:
        candidates.append(latest_checkpoint(mirror_dir))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"nothing to resume: no {candidates[0]}" + (f" or {candidates[1]}" if mirror_dir else "") +
                    "; start a new run without --resume")


def loss_panels(keys: list[str]) -> dict[str, list[str]]:
    """Metric names grouped for the loss plot: every ``loss/...`` name under its parent prefix.

    ``loss/d``, ``loss/g`` -> panel ``loss``; ``loss/d/stage0`` -> ``loss/d``;
    ``loss/d/stage0/cond`` -> ``loss/d/stage0``; in name order.
    """
    panels: dict[str, list[str]] = defaultdict(list)
    for key in sorted(k for k in keys if k.startswith("loss/")):
        panels[key.rpartition("/")[0]].append(key)
    return dict(sorted(panels.items()))


def plot_loss_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Plot every loss term of metrics rows into a PNG, one panel per prefix (``loss_panels``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    panels = loss_panels(sorted({k for row in history for k in row}))
    columns = min(4, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = Figure(figsize=(4 * columns, 3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for index, (title, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, columns, index + 1)
        for key in keys:
            label = key.removeprefix(title + "/")
            ax.plot(steps, [row.get(key, float("nan")) for row in history], label=label, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


class RunFolder:
    """The files of one run: saves checkpoints and previews, logs metrics, mirrors every write.

    ``writer=False`` (torchrun ranks other than 0) turns every write into a no-op.
    """

    def __init__(self, path: str | os.PathLike, *, mirror: str | os.PathLike | None = None, keep_snapshots: int = 3,
                 writer: bool = True) -> None:
        self.path = Path(path)
        self.mirror = Path(mirror) if mirror else None
        self.keep_snapshots, self.writer = keep_snapshots, writer
        self.checkpoints, self.previews = self.path / CHECKPOINTS, self.path / "previews"
        self.metrics_path, self.plot_path = self.path / "metrics.jsonl", self.path / "loss_curves.png"
        self.latest = latest_checkpoint(self.path)
        self.history: list[dict[str, Any]] = []

    def open(self, step: int) -> list[dict[str, Any]]:
        """Start writing at ``step``: remove temp files a killed write left (call under the run lock) and
        drop metric rows past the checkpoint; returns the metrics history up to ``step``."""
        source = self.metrics_path
        if not source.is_file() and self.mirror is not None:  # a new runtime resuming from the mirror alone
            source = self.mirror / self.metrics_path.name
        self.history = [row for row in read_metrics(source) if row["step"] <= step]
        if self.writer:
            remove_stale_temps(self.path, self.checkpoints, self.previews)  # not the mirror's: no lock covers it
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
        return self.history

    def _mirror(self, path: Path) -> None:
        if self.mirror is not None:
            copy_atomic(path, self.mirror / path.relative_to(self.path))

    def save_checkpoint(self, config: Any, state: dict[str, Any], *, snapshot: bool, **meta: Any) -> Path:
        """latest.pt (and with ``snapshot`` a kept step_XXXXXXX.pt, older ones pruned), mirrored with the metrics.

        ``state``: ``Trainer.state_dict()``; ``meta``: clip_spec, clip_identity, epoch
        (see ``checkpoint.save_training_checkpoint``).
        """
        if not self.writer:
            return self.latest
        path = save_training_checkpoint(self.latest, config, state, **meta)
        self._mirror(path)
        if snapshot:
            snap = copy_atomic(path, self.checkpoints / snapshot_name(int(state["step"])))
            self._mirror(snap)
            prune_snapshots(self.checkpoints, self.keep_snapshots)
            if self.mirror is not None:
                prune_snapshots(self.mirror / CHECKPOINTS, self.keep_snapshots)
        if self.metrics_path.is_file():
            self._mirror(self.metrics_path)
        return path

    def save_preview(self, step: int, picture: Any) -> Path:
        """A preview picture (PIL) -> previews/step_XXXXXXX.png, and the loss plot so far."""
        from .pictures import save_png

        path = self.previews / f"step_{step:07d}.png"
        if self.writer:
            save_png(picture, path)
            self._mirror(path)
            self.plot()
        return path

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (to the history, and to metrics.jsonl)."""
        self.history.append(row)
        if self.writer:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """loss_curves.png from the history (mirrored)."""
        if self.writer and self.history:
            self._mirror(plot_loss_curves(self.history, self.plot_path))
