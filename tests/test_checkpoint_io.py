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


def test_one_owner_reads_both_layouts_and_refuses_an_export_for_resume(tmp_path):
    from helpers.checkpoint import (
        export_generator,
        read_generator,
        read_training_checkpoint,
        save_generator,
        save_training_checkpoint,
    )
    from helpers.network import Generator
    from helpers.train_config import TrainConfig

    cfg = TrainConfig()
    G = Generator(cfg.model)
    state = dict(step=7, G=G.state_dict(), G_ema=G.state_dict(), D=[], opt_G={}, opt_D=[], scaler=None, rng={})
    path = save_training_checkpoint(tmp_path / "latest.pt", cfg, state, clip_spec="demo", clip_identity=None, epoch=1)
    raw = load_checkpoint(path)
    assert "model_config" not in raw and raw["train_config"]["model"] == cfg.model.to_dict()  # stored once
    read = read_training_checkpoint(path)
    assert read.config == cfg and read.step == 7 and read.epoch == 1 and read.clip_spec == "demo"
    assert read_generator(path).model_config == cfg.model

    export = export_generator(path, tmp_path / "g.pt")
    assert set(load_checkpoint(export)) == {"format", "model_config", "clip_spec", "clip_identity", "step", "G_ema"}
    assert read_generator(export).step == 7
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_training_checkpoint(export)
    assert read_generator(save_generator(tmp_path / "h.pt", G, clip_spec="demo", step=3)).step == 3

    # a training checkpoint of the first layout (the model config beside the training config) still reads
    old = dict(raw, format="helpers-t2i-gan/1", model_config=cfg.model.to_dict())
    torch.save(old, tmp_path / "old.pt")
    assert read_training_checkpoint(tmp_path / "old.pt").config == cfg
    assert read_generator(tmp_path / "old.pt").model_config == cfg.model


def test_exports_keep_their_first_tag_and_a_newer_file_says_so(tmp_path):
    from helpers.checkpoint import EXPORT_FORMAT, save_generator
    from helpers.config import ModelConfig
    from helpers.network import Generator

    export = save_generator(tmp_path / "g.pt", Generator(ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128,
                                                                      nd=4, num_stages=1)), clip_spec="demo")
    assert load_checkpoint(export)["format"] == EXPORT_FORMAT == "helpers-t2i-gan/1"  # older checkouts read it
    atomic_save({"format": "helpers-t2i-gan/9"}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer version of this project"):
        load_checkpoint(tmp_path / "future.pt")
