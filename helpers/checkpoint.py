"""Checkpoint files: atomic writes and loads that fail with a clear message.

A checkpoint is one ``torch.save`` dict with ``"format": CHECKPOINT_FORMAT``.
A training snapshot holds everything needed to resume exactly (step, configs,
G, G_ema, every D, every optimiser, the AMP scaler, RNG states, CLIP spec); a
sampling export holds only ``model_config``, ``clip_spec``, ``clip_identity``, ``step`` and
``G_ema``. Files are written to a temporary name and renamed, so an
interrupted write (a Colab disconnect) never leaves a broken file behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import UserError

CHECKPOINT_FORMAT = "helpers-t2i-gan/1"
TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files are ".NAME.XXXXXXXX.tmp" beside NAME


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated or not one of ours."""


class OutputError(UserError):
    """An output file cannot be written (read-only folder, full disk, a file where a folder should be)."""


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and put back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def output_error(path: Path, err: OSError) -> OutputError:
    """One line naming the user's ``path`` (never the temporary file) and what went wrong."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return OutputError(f"cannot write {path}: {parent} is a file, not a folder; choose another path")
            break
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space or write elsewhere)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (choose a folder you can write to)"
    return OutputError(f"cannot write {path}: {reason}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader never sees half a file, and a failed write leaves the previous file
    (if any) in place and no temporary file behind. Parent folders are created.
    The file gets the permissions of any new file (0666 less the umask). An
    ``OSError`` of the file system becomes an ``OutputError`` naming ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            try:
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a program's files follow the umask
            except OSError:
                pass  # file systems without permissions (vfat, some network mounts): their own modes
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise output_error(path, err) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(*folders: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed process left in ``folders`` (not recursive); returns them.

    Only call this while holding the folder's run lock: another writer's file in
    flight looks the same.
    """
    removed = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by this project.

    Raises CheckpointError naming the file and what to do when it is missing,
    unreadable (truncated, not a torch file) or lacks the project's format tag.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or train one first)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for broken files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}. The file is truncated "
            "or not a checkpoint; use an earlier snapshot or copy it again."
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r})"
        )
    return ckpt


# --------------------------------------------------------------------------- run directories

LATEST = "latest.pt"  # the newest training checkpoint of a run, in RUN_DIR/checkpoints/


def snapshot_name(step: int) -> str:
    """File name of the periodic snapshot at ``step``: ``step_0001234.pt``."""
    return f"step_{step:07d}.pt"


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file and a rename (``dst`` is never half-written)."""
    with open(src, "rb") as inp:
        return atomic_write(dst, lambda out: shutil.copyfileobj(inp, out, length=16 * 1024 * 1024))


def prune_snapshots(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_*.pt`` snapshots in ``directory``; returns the removed paths.

    ``keep <= 0`` keeps every snapshot. ``latest.pt`` is never touched.
    """
    if keep <= 0:
        return []
    snapshots = sorted(Path(directory).glob("step_*.pt"))
    removed = snapshots[:-keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def export_generator(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a sampling-only file (format, model_config, clip_spec, step, G_ema) from a training checkpoint.

    The export is a few times smaller than the training checkpoint: no
    discriminators, optimiser moments or RNG states.
    """
    ckpt = load_checkpoint(checkpoint_path)
    missing = [k for k in ("model_config", "clip_spec", "G_ema") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{checkpoint_path} lacks {missing}: it is not a training checkpoint or an export")
    export = dict(
        format=CHECKPOINT_FORMAT,
        model_config=ckpt["model_config"],
        clip_spec=ckpt["clip_spec"],
        clip_identity=ckpt.get("clip_identity"),
        step=int(ckpt.get("step", 0)),
        G_ema=ckpt["G_ema"],
    )
    return atomic_save(export, out_path)
