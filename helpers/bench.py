"""Moved to ``helpers.tools.bench`` (the benchmarks); this name stays for existing imports."""

from .tools.bench import *  # noqa: F401,F403
