"""Command line: ``python -m helpers SUBCOMMAND ...`` (see ``--help``).

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; those modules import heavy libraries inside functions so
that ``--help`` stays fast. Errors a user can fix (``UserError``, a missing
file, a bad value, a broken checkpoint) end with a one-line message and exit
code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .console import say
from .errors import UserError  # CheckpointError, OutputError and the rest are UserErrors

# name -> (module, one-line help); each module defines add_arguments() and run()
COMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("helpers.summary", "print the per-stage shape and parameter table of a preset"),
    "sample": ("helpers.sample", "generate images from prompts into a PNG (grid, stage panel or interpolation)"),
    "extract": ("helpers.extract", "turn a captioned image source into a features file (CLIP features + 256 px images)"),
    "train": ("helpers.train", "train G and the discriminators on a features file (checkpoints, previews, metrics)"),
    "evaluate": ("helpers.evaluate", "score a checkpoint on a features file's test split: FID/KID, CLIP score, R-precision"),
    "build-demo": ("helpers.tools.build_demo", "rebuild the embedded demo (toy faces, demo CLIP, demo generator) into assets/"),
    "toyfaces": ("helpers.toyfaces", "draw a captioned toy-face image folder (images, captions, attributes.csv)"),
    "train-classifier": ("helpers.tools.train_classifier", "retrain the toy-face attribute classifier from scratch (assets/)"),
    "quality": ("helpers.tools.quality", "train variants of the recipe on toy faces and measure what each learns"),
    "bench": ("helpers.tools.bench", "measure sampling, training and loading speed against this machine's matmul rate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers",
        description="CLIP-conditioned three-stage text-to-image GAN: extract, train, sample, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        say(f"error: {err}", err=True)
        return 2
    except OSError as err:  # the file system said no: one line naming the file, no traceback
        where = f"{err.filename}: " if err.filename else ""
        say(f"error: {where}{err.strerror or err}", err=True)
        return 2
    except KeyboardInterrupt:
        say(f"interrupted: {args.command} stopped before it finished", err=True)
        return 130


if __name__ == "__main__":
    code = main()
    try:
        sys.stdout.flush()
    except OSError:  # stdout went away (a closed pipe): nothing is left to say, keep the exit quiet
        from .console import silence_closed_stdout

        silence_closed_stdout()
    sys.exit(code)
