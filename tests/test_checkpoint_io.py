"""Atomic checkpoint writes and clear errors for broken files."""

import pytest
import torch

from helpers.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from helpers.files import atomic_save


def test_round_trip(tmp_path):
    path = atomic_save({"format": CHECKPOINT_FORMAT, "step": 3, "w": torch.ones(2)}, tmp_path / "a" / "c.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and torch.equal(ckpt["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "latest.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"format": CHECKPOINT_FORMAT, "step": 2, "x": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = atomic_save({"format": CHECKPOINT_FORMAT, "w": torch.randn(1000)}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(text)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
