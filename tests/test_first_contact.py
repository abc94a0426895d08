"""What a new user meets first: precision on their GPU, interrupts, resume, one run per folder, files and errors."""

import multiprocessing
import os
import signal
import stat
import sys

import pytest
import torch

from helpers.__main__ import main
from helpers.checkpoint import load_checkpoint
from helpers.files import atomic_write_bytes
from helpers.errors import UserError
from helpers.train import TrainingInterrupted, Trainer, train

from test_train import TINY_SET, tiny_config


def _cli_train(features, out, *extra):
    return main([
        "train", "--features", str(features), "--out", str(out), "--preset", "demo", "--steps", "2",
        "--batch-size", "4", "--device", "cpu", "--no-progress",
        "--set", *TINY_SET, "log_every=1", "preview_every=100", "checkpoint_every=1", "snapshot_every=100",
        *extra,
    ])


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_uses_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    from helpers import devices

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4" if capability < (8, 0) else "A100")
    assert devices.amp_dtype("cuda") == expected
    line = devices.precision_line(torch.device("cuda"), expected)
    assert ("fp16 with a GradScaler" in line) == (expected == torch.float16) and f"{capability[0]}.{capability[1]}" in line


# --------------------------------------------------------------------------- interrupts


def _sigint_handler():
    return signal.signal(signal.SIGINT, signal.default_int_handler)


def _train_with_an_event_in_a_step(monkeypatch, features, run, clip, *, before_step, event, match, **config):
    """Train with ``event()`` run at the start of step ``before_step + 1`` (Python's Ctrl-C handler on);
    the run must stop with a TrainingInterrupted whose message matches ``match``."""
    outer = _sigint_handler()
    real_step = Trainer.train_step

    def step(self, batch):
        if self.step == before_step:
            event()
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    progress = config.pop("progress", False)
    try:
        with pytest.raises(TrainingInterrupted, match=match):
            train(features, run, tiny_config(steps=8, snapshot_every=100, **config), clip=clip, progress=progress)
    finally:
        signal.signal(signal.SIGINT, outer)


def test_second_ctrl_c_mid_step_keeps_the_last_good_checkpoint(synthetic_features, tmp_path, tiny_clip, monkeypatch):
    def twice():  # two Ctrl-C in the middle of step 4: D updated, G not
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    _train_with_an_event_in_a_step(monkeypatch, synthetic_features, tmp_path / "run", tiny_clip, before_step=3,
                                   event=twice, match="middle of step 4.*last good checkpoint.*step 2",
                                   checkpoint_every=2)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 2


class _PipeToTee:
    """stderr piped into tee: it works until tee dies (the same Ctrl-C reaches it), then every write fails."""

    def __init__(self):
        self.broken, self.text = False, []

    def write(self, text):
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        self.text.append(text)
        return len(text)

    def flush(self):
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")

    def isatty(self):
        return False


def test_a_closed_pipe_does_not_cost_the_save(synthetic_features, tmp_path, tiny_clip, monkeypatch):
    import time

    pipe = _PipeToTee()
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(sys, "stdout", pipe)

    def tee_dies():  # during step 3: Ctrl-C, tee exits, and the bar's next write meets a closed pipe
        pipe.broken = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.25)  # past tqdm's mininterval: the bar writes at the end of this step

    _train_with_an_event_in_a_step(monkeypatch, synthetic_features, tmp_path / "run", tiny_clip, before_step=2,
                                   event=tee_dies, match="saved .*latest.pt at step 3", checkpoint_every=100,
                                   progress=True)
    assert any("train" in t for t in pipe.text)  # the bar was writing to the pipe before it closed
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 3


def test_ctrl_c_during_extract_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from helpers import extract

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "extract_features", interrupted)
    code = main(["extract", "--source", "toyfaces:8", "--out", str(tmp_path / "f.pt"), "--clip", "tiny-random"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip().count("\n") == 0 and "f.pt.partial" in err and "same command again" in err
    assert "Traceback" not in err


def test_a_temp_file_left_by_a_kill_is_removed_when_the_run_starts(synthetic_features, tmp_path, tiny_clip):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".latest.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(synthetic_features, run, tiny_config(steps=1), clip=tiny_clip, progress=False)
    assert not stale.exists()
    assert not list(run.rglob("*.tmp"))


# --------------------------------------------------------------------------- resume


def test_rerunning_the_first_command_with_resume_works_and_a_change_is_refused(synthetic_features, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli_train(synthetic_features, out) == 0
    # the same command again, more steps, --resume appended: accepted
    code = _cli_train(synthetic_features, out, "--steps", "3", "--resume")
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 3
    capsys.readouterr()
    # a model field and the batch size differ: refused, each named, with what may change
    code = main(["train", "--features", str(synthetic_features), "--out", str(out), "--resume", "--steps", "4",
                 "--batch-size", "6", "--set", "nd=8", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "batch_size: checkpoint 4, asked 6" in err and "model.nd: checkpoint 4, asked 8" in err
    assert "may change only steps, epochs, lr_g, lr_d" in err


def test_a_new_learning_rate_on_resume_reaches_adam(synthetic_features, tmp_path, tiny_clip):
    run = tmp_path / "run"
    train(synthetic_features, run, tiny_config(steps=2), clip=tiny_clip, progress=False)
    train(synthetic_features, run, overrides=["steps=3", "lr_g=1e-5", "lr_d=3e-5"], resume=True, clip=tiny_clip,
          progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["train_config"]["lr_g"] == 1e-5
    assert [g["lr"] for g in ckpt["opt_G"]["param_groups"]] == [1e-5]
    assert {g["lr"] for o in ckpt["opt_D"] for g in o["param_groups"]} == {3e-5}


def test_a_model_field_on_resume_is_refused_by_name(synthetic_features, tmp_path, tiny_clip):
    run = tmp_path / "run"
    train(synthetic_features, run, tiny_config(steps=2), clip=tiny_clip, progress=False)
    with pytest.raises(UserError, match=r"model.ng: checkpoint 128, asked 64"):
        train(synthetic_features, run, overrides=["steps=3", "ng=64"], resume=True, clip=tiny_clip, progress=False)


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu(synthetic_features, tmp_path, tiny_clip, capsys):
    run = tmp_path / "run"
    train(synthetic_features, run, tiny_config(steps=2), clip=tiny_clip, progress=False)
    path = run / "checkpoints" / "latest.pt"
    ckpt = load_checkpoint(path)
    # what a CUDA generator's state looks like: 16 bytes (seed and offset), not the CPU's 5056
    ckpt["rng"]["step_generator"] = torch.zeros(16, dtype=torch.uint8)
    ckpt["rng"]["step_generator_device"] = "cuda"
    torch.save(ckpt, path)
    result = train(synthetic_features, run, overrides=["steps=3"], resume=True, clip=tiny_clip, progress=False)
    assert result.step == 3
    err = capsys.readouterr().err
    assert "written on cuda and this run is on cpu" in err and "reseeded from the seed and step 2" in err


def test_steps_already_done_says_there_is_nothing_to_do(synthetic_features, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli_train(synthetic_features, out) == 0
    capsys.readouterr()
    code = main(["train", "--features", str(synthetic_features), "--out", str(out), "--resume", "--steps", "2",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    assert "nothing to do: the run is already at step 2 of 2" in capsys.readouterr().out


# --------------------------------------------------------------------------- one run per folder


def _hold_lock(run_dir, ready, release):
    from helpers.runlock import RunLock

    with RunLock(run_dir):
        ready.set()
        release.wait(60)


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_is_gone(synthetic_features, tmp_path, tiny_clip):
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError, match=rf"in use by another training run \(process {holder.pid} on "):
            train(synthetic_features, run, tiny_config(steps=1), clip=tiny_clip, progress=False)
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # dies holding the lock: the operating system drops it
        holder.join()
    result = train(synthetic_features, run, tiny_config(steps=1), clip=tiny_clip, progress=False)
    assert result.step == 1


# --------------------------------------------------------------------------- files and errors


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_file_where_a_folder_should_be_is_one_line(synthetic_features, tmp_path, capsys):
    (tmp_path / "blocked").write_text("not a folder")
    code = _cli_train(synthetic_features, tmp_path / "blocked" / "run")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'blocked'} is a file, not a folder" in err and ".tmp" not in err


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_a_read_only_folder_is_one_line(synthetic_features, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = _cli_train(synthetic_features, ro / "run")
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(ro) in err


def test_a_full_disk_names_the_users_file_not_the_temp_file(tmp_path):
    import errno

    from helpers.files import OutputError, atomic_write

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.png.abcd.tmp"))

    with pytest.raises(OutputError) as info:
        atomic_write(tmp_path / "x.png", full)
    assert str(info.value) == f"cannot write {tmp_path / 'x.png'}: No space left on device (free some space or write elsewhere)"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device, message", [
    ("cuda", "asks for a GPU, but PyTorch sees none"),
    ("gpu", "unknown device 'gpu': use cpu, cuda, cuda:N"),
])
def test_bad_devices_are_one_line(synthetic_features, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "--features", str(synthetic_features), "--out", str(tmp_path / "run"),
                 "--device", device, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_unknown_clip_name_on_the_command_line(tmp_path, capsys):
    code = main(["extract", "--source", "toyfaces:8", "--out", str(tmp_path / "f.pt"), "--clip", "ViT-B-33",
                 "--data-dir", str(tmp_path / "data"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean ViT-B-32" in err


@pytest.mark.parametrize("which", ["features", "images"])
def test_a_truncated_features_file_says_so_and_makes_no_run_folder(synthetic_features, tmp_path, capsys, which):
    from helpers.features import images_path

    target = synthetic_features if which == "features" else images_path(synthetic_features)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    code = _cli_train(synthetic_features, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "truncated" in err and str(target) in err
    assert not (tmp_path / "run").exists()


def test_readme_says_how_to_install_the_cpu_build_of_pytorch():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_an_error_before_the_first_step_leaves_no_checkpoint(synthetic_features, tmp_path, tiny_clip, monkeypatch):
    from helpers import pictures

    def broken_preview(images, captions):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(pictures, "preview_picture", broken_preview)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(synthetic_features, tmp_path / "run", tiny_config(steps=2), clip=tiny_clip, progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()  # a fresh start stays possible


def test_a_preset_named_again_on_resume_keeps_the_checkpoints_mirror(synthetic_features, tmp_path, tiny_clip):
    from helpers.train import resume_config

    saved = tiny_config(steps=2, mirror_dir=str(tmp_path / "drive"), lr_g=1e-4)
    again = resume_config(saved, ["steps=3"], named=tiny_config(steps=2))
    assert again.mirror_dir == str(tmp_path / "drive") and again.lr_g == 1e-4 and again.steps == 3
    with pytest.raises(UserError, match=r"batch_size: checkpoint 4, asked 8"):
        resume_config(saved, named=tiny_config(batch_size=8))
