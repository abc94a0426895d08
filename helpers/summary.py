"""``python -m helpers summary``: the per-stage shape and parameter table of a preset."""

from __future__ import annotations

import argparse

from .config import MODEL_PRESETS, STAGE_CHOICES, model_preset
from .network import format_summary, summary_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="faces", help="model preset")
    parser.add_argument("--stages", type=int, choices=STAGE_CHOICES, default=None, help="number of stages")


def run(args: argparse.Namespace) -> int:
    overrides = {} if args.stages is None else {"num_stages": args.stages}
    cfg = model_preset(args.preset, **overrides)
    print(f"preset {args.preset}: {cfg}")
    print(format_summary(summary_rows(cfg)))
    return 0
