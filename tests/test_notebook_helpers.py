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


def fake_colab(monkeypatch, tmp_path):
    """Stand-ins for Colab: google.colab.drive (its mount makes MyDrive) and pip (recorded, never run)."""
    import subprocess
    import sys
    import types

    calls = []

    def mount(where):
        calls.append(("mount", where))
        (tmp_path / "drive" / "MyDrive").mkdir(parents=True)

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(nb, "DRIVE_MOUNT", tmp_path / "drive")
    monkeypatch.setattr(nb, "DRIVE_DIR", tmp_path / "drive" / "MyDrive" / "clip-stackgan")
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(("run", command, kwargs)))
    return calls


def test_setup_in_colab_installs_mounts_and_moves_to_the_repository(tmp_path, monkeypatch):
    import sys

    monkeypatch.chdir(tmp_path)  # restored after the test
    monkeypatch.setenv("HELPERS_SMOKE", "0")
    calls = fake_colab(monkeypatch, tmp_path)
    root = tmp_path / "clip-stackgan"
    root.mkdir()
    lines = nb.setup(mount=True, root=root)
    assert calls[0] == ("run", [sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")],
                        dict(check=True))
    assert calls[1] == ("mount", str(tmp_path / "drive"))
    assert nb.Path.cwd() == root  # data/ and runs/ are relative to the repository
    assert lines[:2] == [f"repository: {root}", f"Google Drive: {nb.DRIVE_DIR}"] and nb.DRIVE_DIR.is_dir()
    assert any("Google Colab" in line for line in lines)
    del calls[:]
    nb.setup(mount=False, root=root)  # a rerun with the box unticked: pip again, no Drive
    assert [c[0] for c in calls] == ["run"]


def test_setup_elsewhere_only_moves_to_the_repository(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HELPERS_SMOKE", "1")
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing is installed outside Colab"))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    lines = nb.setup(mount=True)
    assert nb.Path.cwd() == nb.REPO_ROOT and (nb.REPO_ROOT / "helpers" / "__init__.py").is_file()
    assert lines[0] == f"repository: {nb.REPO_ROOT}" and not any("Drive" in line for line in lines)
    assert threads == [nb.SMOKE_THREADS]


def test_repo_url_follows_the_environment():
    assert nb.repo_url({}) == f"https://github.com/{nb.REPO}"
    assert nb.repo_url({"HELPERS_REPO_URL": "https://github.com/me/fork"}) == "https://github.com/me/fork"


def test_picture_note_explains_gray_pictures_in_the_smoke_mode_only(tmp_path):
    from types import SimpleNamespace

    smoke = nb.notebook_config(smoke=True, workdir=tmp_path)
    note = nb.picture_note(smoke)
    assert note.startswith("smoke mode:") and "near-gray" in note and "HELPERS_SMOKE" in note and "\n" not in note
    assert "4 steps" in nb.picture_note(smoke, SimpleNamespace(step=4, path=tmp_path / "latest.pt"))
    assert nb.picture_note(smoke, SimpleNamespace(step=4000, path=nb.DEMO_GENERATOR)) == ""  # the demo is trained
    assert nb.picture_note(nb.notebook_config(smoke=False, workdir=tmp_path, drive=None)) == ""


def test_loss_table_sorts_whatever_terms_come_back():
    table = nb.loss_table({"loss/g/kl": 0.25, "loss/d/stage0/cond": 1.5, "loss/d/stage0/align": 2.0})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines] == ["loss/d/stage0/align", "loss/d/stage0/cond", "loss/g/kl"]
    assert lines[0].endswith("2.0000") and len({len(line) for line in lines}) == 1  # aligned columns
    assert nb.loss_table({}) == "(no loss terms)"


def test_with_text_dim_sets_the_model_text_size(tmp_path):
    cfg = nb.train_config(nb.notebook_config(smoke=True, workdir=tmp_path))
    fitted = nb.with_text_dim(cfg, 32)
    assert fitted.model.text_dim == 32 and fitted.batch_size == cfg.batch_size
    assert fitted.model.z_dim == cfg.model.z_dim


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

    from helpers.train import D_LOSS, G_LOSS, IMAGES_PER_S

    handles = []
    live = nb.LiveTraining([{"step": 1, D_LOSS: 1.0, G_LOSS: 2.0}], plot_every_s=3600,
                           display=lambda obj, display_id: FakeHandle(handles, obj))
    grid = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(grid)
    live.on_sample(0, torch.zeros(3, 8, 8), grid)  # the grid as a tensor [3, H, W] in [0, 1]
    live.on_log({"step": 2, "epoch": 0, D_LOSS: 0.5, G_LOSS: 1.5, IMAGES_PER_S: 3.0})
    live.on_log({"step": 3, "epoch": 0, D_LOSS: 0.4, G_LOSS: 1.4, IMAGES_PER_S: 3.0})
    assert len(handles) == 3  # status, loss curves, preview: created once, then updated
    status, loss, preview = handles
    assert "step 3" in status.shown[-1].data and "D 0.4000" in status.shown[-1].data
    assert "G 1.4000" in status.shown[-1].data and "3.0 images/s" in status.shown[-1].data
    assert len(loss.shown) == 2  # placeholder + one plot: the second row came within plot_every_s
    live.finish()
    assert len(loss.shown) == 3 and loss.shown[-1].data.startswith(b"\x89PNG")
    assert preview.shown[-1].data == grid.read_bytes()
    assert [row["step"] for row in live.history] == [1, 2, 3]


def test_live_training_shows_a_pil_preview_or_a_tensor_grid(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    handles = []
    live = nb.LiveTraining(display=lambda obj, display_id: FakeHandle(handles, obj))
    labelled = Image.new("RGB", (30, 20), (10, 200, 30))  # what preview_picture returns
    live.on_sample(2, labelled, tmp_path / "step_2.png")  # the file need not be read
    shown = Image.open(io.BytesIO(handles[2].shown[-1].data))
    assert shown.size == (30, 20) and shown.getpixel((0, 0)) == (10, 200, 30)
    grid = torch.zeros(3, 4, 6)
    grid[0] = 1.0  # red in [0, 1]
    live.on_sample(4, grid, tmp_path / "step_4.png")
    shown = np.asarray(Image.open(io.BytesIO(handles[2].shown[-1].data)))
    assert shown.shape == (4, 6, 3) and (shown == [255, 0, 0]).all()
    assert live.previews == [tmp_path / "step_2.png", tmp_path / "step_4.png"]


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


def test_a_rerun_passes_on_only_what_a_resume_may_change():
    from helpers.train_config import RESUMABLE

    assert set(nb.RERUN_FIELDS) <= set(RESUMABLE)
