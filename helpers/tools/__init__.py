"""Maintainer tools: the benchmarks and the builds of the shipped assets.

Nothing here is imported by the notebooks or by training and sampling; the
command line reaches these modules through ``python -m helpers bench``,
``build-demo`` and ``train-classifier``, and the notebooks' pictures are drawn
again by ``python -m helpers.tools.notebook_figures``.
"""
