"""Moved to ``helpers.tools.build_demo`` (the embedded demo's build); this name stays for existing imports."""

from .tools.build_demo import *  # noqa: F401,F403
