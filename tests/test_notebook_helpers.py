"""helpers.notebook: modes, shared paths, files found or made, pictures, the live training display."""

import pytest
import torch

from helpers import notebook as nb
from helpers.errors import UserError


def test_smoke_mode_reads_one_variable():
    assert nb.smoke_mode({"HELPERS_SMOKE": "1"}) and nb.smoke_mode({"HELPERS_SMOKE": "yes"})
    for value in ("", "0", "false", "No", "off"):
        assert not nb.smoke_mode({"HELPERS_SMOKE": value})
    assert not nb.smoke_mode({})


def test_colab_links_point_at_the_notebooks_folder():
    url = nb.colab_url("03_training.ipynb")
    assert url == f"https://colab.research.google.com/github/{nb.REPO}/blob/main/notebooks/03_training.ipynb"
    assert nb.colab_badge("03_training.ipynb").endswith(f"({url})")


def test_config_full_path_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_WORKDIR", str(tmp_path))
    cfg = nb.notebook_config(smoke=False, drive=None, name="celeba")
    assert (cfg.source, cfg.clip, cfg.preset, cfg.captions_per_image) == ("mm-celeba-hq", "ViT-B-32", "faces", 10)
    assert cfg.features == tmp_path / "data" / "celeba.pt"
    assert cfg.run_dir == tmp_path / "runs" / "celeba"
    assert cfg.mirror_dir is None and cfg.latest_checkpoint() is None


def test_config_smoke_mode_replaces_the_heavy_choices(tmp_path):
    cfg = nb.notebook_config(smoke=True, workdir=tmp_path, source="mm-celeba-hq", clip="ViT-B-32", name="faces")
    assert cfg.smoke and cfg.source.startswith("toyfaces:") and cfg.clip == "tiny-random"
    assert (cfg.preset, cfg.device, cfg.drive) == ("demo", "cpu", None)
    train_cfg = nb.train_config(cfg, epochs=10, batch_size=24)  # the form's values are ignored
    assert train_cfg.steps == nb.SMOKE_STEPS and train_cfg.batch_size == 4


def test_drive_mirror_and_latest_checkpoint(tmp_path):
    cfg = nb.notebook_config(smoke=False, workdir=tmp_path / "local", drive=tmp_path / "drive", name="r")
    assert nb.train_config(cfg, epochs=1).mirror_dir == str(tmp_path / "drive" / "runs" / "r")
    mirrored = tmp_path / "drive" / "runs" / "r" / "checkpoints" / "latest.pt"
    mirrored.parent.mkdir(parents=True)
    mirrored.write_bytes(b"x")
    assert cfg.latest_checkpoint() == mirrored  # a fresh runtime resumes from Drive
    local = cfg.run_dir / "checkpoints" / "latest.pt"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    assert cfg.latest_checkpoint() == local


def test_device_report_warns_on_a_colab_runtime_without_gpu():
    lines = nb.device_report(smoke=False, colab=True, cuda=False)
    assert any("no GPU" in line and "Change runtime type" in line for line in lines)
    assert not any("WARNING" in line for line in nb.device_report(smoke=True, colab=False, cuda=False))
    assert not any("GPU" in line for line in nb.device_report(smoke=False, colab=True, cuda=True)[2:])


def test_ensure_features_finds_copies_or_explains(tmp_path, synthetic_features):
    cfg = nb.notebook_config(smoke=False, workdir=tmp_path / "w", drive=None, name="features")
    with pytest.raises(UserError, match="01_feature_extraction"):
        nb.ensure_features(cfg)
    drive = tmp_path / "drive"
    nb.copy_features(synthetic_features, drive / "data" / "features.pt")
    cfg = nb.notebook_config(smoke=False, workdir=tmp_path / "w", drive=drive, name="features")
    path, note = nb.ensure_features(cfg)
    assert path == cfg.features and path.is_file() and "Google Drive" in note
    assert (cfg.data_dir / "features.images.npy").is_file()
    assert nb.ensure_features(cfg) == (path, f"features: {path}")


def test_ensure_checkpoint_choices(tmp_path):
    cfg = nb.notebook_config(smoke=False, workdir=tmp_path, drive=None)
    assert nb.ensure_checkpoint(cfg, "demo") is None
    assert nb.ensure_checkpoint(cfg, str(tmp_path / "g.pt")) == tmp_path / "g.pt"
    with pytest.raises(UserError, match="03_training"):
        nb.ensure_checkpoint(cfg, "")


def test_feature_statistics_and_pictures(synthetic_features):
    stats = nb.feature_statistics(synthetic_features)
    assert (stats["images"], stats["train"], stats["test"], stats["captions"]) == (12, 9, 3, 36)
    assert stats["clip_spec"] == "tiny-random" and stats["dim"] == 32
    assert stats["image_feature_norm"] == pytest.approx(1.0, abs=1e-2)
    assert len(stats["matched"]) == len(stats["mismatched"]) == 12
    text = nb.format_statistics(stats)
    assert "matched cosine" in text and "[" not in text  # the lists stay out of the table
    assert nb.similarity_histogram(stats).size[0] > 100
    images, captions, ids = nb.sample_pairs(synthetic_features, n=5, seed=1)
    assert images.shape == (5, 3, 256, 256) and images.min() >= -1 and images.max() <= 1
    assert len(captions) == len(ids) == 5 and captions[0].startswith("caption 0 of image")


class FakeHandle:
    def __init__(self, log, obj):
        self.log, self.shown = log, [obj]
        log.append(self)

    def update(self, obj):
        self.shown.append(obj)


def test_live_training_keeps_three_slots_up_to_date(tmp_path):
    from PIL import Image

    handles = []
    live = nb.LiveTraining([dict(step=1, d_loss=1.0, g_loss=2.0)], plot_every_s=3600,
                           display=lambda obj, display_id: FakeHandle(handles, obj))
    grid = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(grid)
    live.on_sample(0, torch.zeros(3, 8, 8), grid)
    live.on_log(dict(step=2, epoch=0, d_loss=0.5, g_loss=1.5, images_per_s=3.0))
    live.on_log(dict(step=3, epoch=0, d_loss=0.4, g_loss=1.4, images_per_s=3.0))
    assert len(handles) == 3  # status, loss curves, preview: created once, then updated
    status, loss, preview = handles
    assert "step 3" in status.shown[-1].data and "D 0.4000" in status.shown[-1].data
    assert len(loss.shown) == 2  # placeholder + one plot: the second row came within plot_every_s
    live.finish()
    assert len(loss.shown) == 3 and loss.shown[-1].data.startswith(b"\x89PNG")
    assert preview.shown[-1].data == grid.read_bytes()
    assert [row["step"] for row in live.history] == [1, 2, 3]


def test_training_arguments_resume_a_run_that_has_a_checkpoint(tmp_path):
    cfg = nb.notebook_config(smoke=False, workdir=tmp_path, drive=tmp_path / "drive", name="r")
    train_cfg = nb.train_config(cfg, epochs=3)
    assert nb.training_arguments(cfg, train_cfg) == dict(config=train_cfg, overrides={}, resume=False)
    latest = cfg.mirror_dir / "checkpoints" / "latest.pt"  # only Drive has it: a fresh Colab runtime
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"x")
    args = nb.training_arguments(cfg, train_cfg)
    assert args["resume"] is True and args["config"] is None  # the checkpoint's own config
    assert args["overrides"]["epochs"] == 3 and args["overrides"]["mirror_dir"] == str(cfg.mirror_dir)
