"""A CLIP-conditioned, three-stage (64/128/256 px) text-to-image GAN.

The package behind the numbered notebooks and the ``python -m helpers`` command
line: networks (``network``), configuration (``config``), CLIP encoders
(``clip_encoder``), checkpoints (``checkpoint``) and the jobs built on them.
"""

__version__ = "0.1.0"
