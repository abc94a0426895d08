"""Writing files safely: atomic writes that keep the umask, JSON reports, and errors that name the path.

Every file the project writes (checkpoints, features, previews, reports, metrics)
goes through ``atomic_write``: a temporary file beside the target, flushed and
renamed, so a reader (or a Colab disconnect) never sees half a file. Failures of
the file system become an ``OutputError`` naming the user's path, one line at the
command line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UserError

TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files are ".NAME.XXXXXXXX.tmp" beside NAME


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write``)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (UTF-8, a final newline) to ``path``, atomically. Returns the path."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file and a rename (``dst`` is never half-written)."""
    with open(src, "rb") as inp:
        return atomic_write(dst, lambda out: shutil.copyfileobj(inp, out, length=16 * 1024 * 1024))


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
