"""One training run per folder: an advisory lock on ``RUN_DIR/.lock``.

The lock is an ``fcntl.flock`` on an open file, so the operating system drops it
when its process ends, however it ends (a kill, a crash, a Colab disconnect): a
lock left by a dead process never blocks a restart. The file records who holds it
(process id, host, start time) for the message a second ``train`` prints. On file
systems without ``flock`` (and on Windows) runs are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another process is training in the same run folder."""


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's lock for the block (creates the folder)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            from .files import output_error

            raise output_error(self.path, err) from err
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise RunLocked(
                f"{self.run_dir} is in use by another training run ({holder}): wait for it to finish or stop it, "
                "or choose another --out"
            ) from None
        except OSError:  # the file system has no flock (some network mounts): run unlocked
            file.close()
            return self
        file.seek(0)
        file.truncate()
        file.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))))
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say who it is"
