"""A CLIP-conditioned, three-stage (64/128/256 px) text-to-image GAN.

The package behind the numbered notebooks and the ``python -m helpers`` command
line: networks (``network``), configuration and the stage schedule (``config``),
CLIP encoders (``clip_encoder``), the training step (``trainer``) and its loop
(``train``), checkpoints (``checkpoint``) and the jobs built on them. Maintainer
tools (benchmarks, the builds of the shipped assets) live in ``helpers.tools``.
"""

__version__ = "0.1.0"
