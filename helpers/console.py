"""Output that survives a closed terminal pipe.

``python -m helpers train ... 2>&1 | tee log`` and a Ctrl-C in the terminal: the
signal reaches tee too, tee exits, and the next write to the pipe raises
``BrokenPipeError``. Progress bars and status lines go through ``SafeStream``,
which drops output once its stream is gone, so a lost terminal never costs the
checkpoint that training saves next.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any


class SafeStream:
    """A text stream wrapper whose writes and flushes never raise ``OSError`` (output is dropped instead)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.closed_pipe = stream is None

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                self.stream.write(text)  # type: ignore[union-attr]
            except (OSError, ValueError):  # BrokenPipeError, EPIPE, or a closed file object
                self.closed_pipe = True
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                self.closed_pipe = True

    def isatty(self) -> bool:
        try:
            return not self.closed_pipe and bool(self.stream.isatty())  # type: ignore[union-attr]
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def say(message: str, *, err: bool = False) -> None:
    """Print one line to stdout (or stderr); a closed pipe drops it instead of raising."""
    stream = SafeStream(sys.stderr if err else sys.stdout)
    stream.write(message + "\n")
    stream.flush()


def silence_closed_stdout() -> None:
    """After a ``BrokenPipeError`` on stdout: point it at /dev/null so that Python's exit flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
