"""Shared test settings: CPU only, offline, small thread pools, headless plots."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the network

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_clip():
    """A small random CLIP built from open_clip classes (offline, seeded)."""
    from helpers.clip_encoder import load_clip

    return load_clip("tiny-random", device="cpu")
