"""Where the shipped files live: ``assets/`` beside the package, and each file in it.

Every module that reads or writes a shipped file names it from here, so moving
or renaming an asset is a change to this file only.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"

DEMO_GENERATOR = ASSETS / "demo_generator.pt"  # the embedded demo's EMA generator (sampling export)
DEMO_CLIP = ASSETS / "demo_clip.pt"  # the small CLIP trained on toy faces (``load_clip("demo")``)
ATTRIBUTE_CLASSIFIER = ASSETS / "attribute_classifier.pt"  # the toy-face attribute classifier
PREVIEW_CAPTIONS = ASSETS / "preview_captions.txt"  # the fixed captions of training previews
DEMO_GRID = ASSETS / "demo_grid.png"  # the README's example grid
DEMO_REPORT = ASSETS / "demo_report.json"  # what the demo build measured
DEMO_BEFORE_AFTER = ASSETS / "demo_before_after.png"  # the README's picture of the demo before and after a recipe change
