"""Moved to ``helpers.tools.demo_clip`` (the demo CLIP's training); this name stays for existing imports."""

from .tools.demo_clip import *  # noqa: F401,F403
