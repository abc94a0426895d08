"""Training through its public entry points, on tiny synthetic data, on the CPU."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from helpers import losses
from helpers import trainer as trainer_module
from helpers.__main__ import main
from helpers.checkpoint import CHECKPOINT_FORMAT, export_generator, load_checkpoint, prune_snapshots
from helpers.config import ModelConfig
from helpers.errors import UserError
from helpers.features import FeaturesDataset
from helpers.network import Generator
from helpers.train import (
    RunBatches,
    SeededItems,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    apply_overrides,
    load_preview_captions,
    plot_loss_curves,
    pseudo_text_features,
    read_metrics,
    run_config,
    train,
    train_preset,
)

# two stages: the 256 px stage would cost most of a step (test_network covers three)
TINY = dict(text_dim=32, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=2)
TINY_SET = [f"{k}={v}" for k, v in TINY.items() if k != "text_dim"]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        model=ModelConfig(**TINY), batch_size=4, steps=4, diffaugment="color,translation,cutout",
        log_every=1, preview_every=2, checkpoint_every=2, snapshot_every=2,
    )
    return TrainConfig(**{**values, **overrides})


def model_tensors(ckpt):
    """Every weight and optimiser moment of a checkpoint, flattened to name -> tensor."""
    out = {f"G.{k}": v for k, v in ckpt["G"].items()}
    out.update({f"G_ema.{k}": v for k, v in ckpt["G_ema"].items()})
    for i, state in enumerate(ckpt["D"]):
        out.update({f"D{i}.{k}": v for k, v in state.items()})
    for name, opts in (("opt_G", [ckpt["opt_G"]]), ("opt_D", ckpt["opt_D"])):
        for j, opt in enumerate(opts):
            for p, s in opt["state"].items():
                out.update({f"{name}{j}.{p}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


# --------------------------------------------------------------------------- the command line


def test_cli_trains_and_writes_checkpoint_metrics_and_previews(synthetic_features, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "train", "--features", str(synthetic_features), "--out", str(out), "--preset", "demo",
        "--steps", "3", "--batch-size", "4", "--device", "cpu", "--no-progress",
        "--set", *TINY_SET, "log_every=1", "preview_every=2", "checkpoint_every=2", "snapshot_every=2",
    ])
    assert code == 0, capsys.readouterr().err
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert set(ckpt) == {"format", "step", "epoch", "train_config", "clip_spec", "clip_identity", "G", "G_ema", "D",
                         "opt_G", "opt_D", "scaler", "rng"}  # the model config once, inside train_config
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 3 and ckpt["clip_spec"] == "tiny-random"
    model = ckpt["train_config"]["model"]
    assert model["text_dim"] == 32  # taken from the features file
    assert len(ckpt["D"]) == len(ckpt["opt_D"]) == 2 and model["num_stages"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step_0000002.pt", "step_0000003.pt"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/d"]) and math.isfinite(r["loss/g"]) for r in rows)
    assert {"loss/d/stage0/align", "loss/g/stage1/clip", "loss/g/kl", "perf/images_per_s"} <= set(rows[-1])
    assert "loss/g/stage0/clip" not in rows[-1]  # the CLIP loss runs at the last stage only
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "step_0000000.png", "step_0000002.png", "step_0000003.png"
    ]
    assert (out / "loss_curves.png").stat().st_size > 0
    assert "done: 3 steps" in capsys.readouterr().out

    # the sampling-only export rebuilds G_ema from the config alone
    export = export_generator(out / "checkpoints" / "latest.pt", tmp_path / "g.pt")
    small = load_checkpoint(export)
    assert set(small) == {"format", "model_config", "clip_spec", "clip_identity", "step", "G_ema"}
    G = Generator(ModelConfig.from_dict(small["model_config"]))
    G.load_state_dict(small["G_ema"])
    images, _, _ = G.eval()(torch.randn(2, 32), torch.randn(2, 8))
    assert [tuple(i.shape) for i in images] == [(2, 3, 64, 64), (2, 3, 128, 128)]

    # a second run into the same folder must ask for --resume
    again = main(["train", "--features", str(synthetic_features), "--out", str(out), "--steps", "4",
                  "--no-progress", "--set", *TINY_SET])
    assert again == 2 and "--resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("extra", [{}, {"mode_seeking_weight": 1.0}], ids=["plain", "mode-seeking"])
def test_resume_continues_exactly(synthetic_features, tmp_path, tiny_clip, extra):
    straight = train(synthetic_features, tmp_path / "a", tiny_config(steps=4, **extra), clip=tiny_clip, progress=False)
    train(synthetic_features, tmp_path / "b", tiny_config(steps=2, **extra), clip=tiny_clip, progress=False)
    resumed = train(synthetic_features, tmp_path / "b", None, overrides={"steps": 4}, resume=True,
                    clip=tiny_clip, progress=False)
    assert straight.step == resumed.step == 4
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 4
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["loss/g"] == pytest.approx(straight.history[-1]["loss/g"], rel=1e-5)

    # loading puts every trained model back in train mode (the reference left them in eval)
    trainer = Trainer(tiny_config(), clip=tiny_clip)
    trainer.G.eval()
    trainer.D.eval()
    trainer.load_state_dict(b)
    assert trainer.step == 4 and trainer.G.training and all(d.training for d in trainer.D)
    assert all(p.requires_grad for p in trainer.D.parameters()) and not trainer.G_ema.training


def test_run_batches_resume_mid_epoch_and_drop_the_last_partial_batch():
    full = list(RunBatches(9, 4, seed=3, start_step=0, total_steps=6))
    assert [len(b) for b in full] == [4] * 6  # 2 steps per epoch: the 9th image waits for the next epoch
    assert list(RunBatches(9, 4, seed=3, start_step=3, total_steps=6)) == full[3:]
    epoch0 = [i for b in full[:2] for i, _ in b]
    assert len(set(epoch0)) == 8
    halves = [list(RunBatches(9, 4, seed=3, start_step=0, total_steps=6, rank=r, world_size=2)) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(b) for b in full]
    with pytest.raises(UserError, match="fewer than the batch size"):
        RunBatches(3, 4, seed=0, start_step=0, total_steps=1)


def test_seeded_items_do_not_depend_on_the_global_rng(synthetic_features):
    items = SeededItems(FeaturesDataset(synthetic_features))
    torch.manual_seed(1)
    a = items[(2, 1234)]
    torch.manual_seed(2)
    b = items[(2, 1234)]
    assert torch.equal(a["text_feature"], b["text_feature"])
    assert torch.equal(a["mismatched_text_feature"], b["mismatched_text_feature"])


# --------------------------------------------------------------------------- failures


def test_failed_checkpoint_write_keeps_the_previous_latest(synthetic_features, tmp_path, tiny_clip, monkeypatch):
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    from helpers.files import OutputError

    with pytest.raises(OutputError, match=r"cannot write \S*run/checkpoints/latest.pt: disk full"):
        train(synthetic_features, tmp_path / "run", tiny_config(steps=4, snapshot_every=100), clip=tiny_clip,
              progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "latest.pt")["step"] == 2
    assert [p.name for p in ckpt_dir.iterdir()] == ["latest.pt"]  # no temporary file left behind


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    synthetic_features, tmp_path, tiny_clip, monkeypatch
):
    real_kl, calls = losses.kl_loss, []

    def kl_that_breaks(mu, logvar):
        calls.append(1)
        return real_kl(mu, logvar) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(losses, "kl_loss", kl_that_breaks)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3 \(generator step\): .*kl=nan"):
        train(synthetic_features, tmp_path / "run", tiny_config(checkpoint_every=1), clip=tiny_clip, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "previews" / "step_0000003.png").exists()


def test_keyboard_interrupt_saves_before_leaving(synthetic_features, tmp_path, tiny_clip):
    # Python's own Ctrl-C handler, even where the test runner was started with SIGINT ignored
    # (a background job of a non-interactive shell).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_log(row):
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C: finish the step, save, stop

    with pytest.raises(KeyboardInterrupt):
        train(synthetic_features, tmp_path / "run", tiny_config(steps=8, checkpoint_every=100, snapshot_every=100),
              clip=tiny_clip, on_log=on_log, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 3
    try:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    finally:
        signal.signal(signal.SIGINT, outer)


# --------------------------------------------------------------------------- the step


@pytest.fixture
def trainer_and_batch(synthetic_features, tiny_clip):
    from torch.utils.data import default_collate

    ds = FeaturesDataset(synthetic_features)
    batch = default_collate([ds[i] for i in range(3)])
    return Trainer(tiny_config(), clip=tiny_clip), batch


def test_d_step_sends_no_gradient_to_G_and_g_step_none_to_D(trainer_and_batch):
    trainer, batch = trainer_and_batch
    b = trainer.prepare_batch(batch)
    fakes = trainer.generate(b["text"])
    values = trainer.d_step(b, fakes)
    assert all(p.grad is None for p in trainer.G.parameters())  # fakes were detached
    assert all(p.grad is not None for d in trainer.D for p in d.parameters())
    assert set(values) == {"loss/d", "loss/d/stage0", "loss/d/stage1"} | {
        f"loss/d/stage{i}/{term}" for i in (0, 1) for term in ("cond", "uncond", "align")}
    assert values["loss/d"] == pytest.approx(values["loss/d/stage0"] + values["loss/d/stage1"], rel=1e-6)
    d_grads = [p.grad.clone() for p in trainer.D.parameters()]
    g_values = trainer.g_step(b, fakes)  # the same fakes, not regenerated
    assert set(g_values) == {"loss/g", "loss/g/stage0", "loss/g/stage1", "loss/g/kl", "loss/g/stage1/clip"} | {
        f"loss/g/stage{i}/{term}" for i in (0, 1) for term in ("adv", "align")}
    assert all(p.grad is not None for p in trainer.G.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, trainer.D.parameters()))
    assert all(p.requires_grad for p in trainer.D.parameters())


def test_mode_seeking_twins_reach_G_only(trainer_and_batch, tiny_clip, monkeypatch):
    _, batch = trainer_and_batch  # 3 images: one twin
    trainer = Trainer(tiny_config(mode_seeking_weight=1.0), clip=tiny_clip)
    seen = {}
    d_step = trainer.d_step

    def recording_d_step(prepared, fakes):
        seen["d"] = [f.shape[0] for f in fakes.images] + [fakes.mu.shape[0]]
        seen["twins"] = [f.shape[0] for f in fakes.twins] + [fakes.twin_z.shape[0]]
        return d_step(prepared, fakes)

    monkeypatch.setattr(trainer, "d_step", recording_d_step)
    values = trainer.train_step(batch)
    assert seen["d"] == [3, 3, 3]  # D judges the batch, not the twins
    assert seen["twins"] == [1, 1, 1]
    assert math.isfinite(values["loss/g/mode_seeking"]) and values["loss/g/mode_seeking"] > 0
    assert "loss/g/mode_seeking" not in Trainer(tiny_config(), clip=tiny_clip).train_step(batch)


def test_mode_seeking_stages_choose_the_stages_it_averages(trainer_and_batch, tiny_clip, monkeypatch):
    _, batch = trainer_and_batch
    seen = []
    real_loss = losses.mode_seeking_loss

    def recording(images_a, images_b, z_a, z_b, size=None):
        seen.append(([a.shape[-1] for a in images_a], size))
        return real_loss(images_a, images_b, z_a, z_b, size=size)

    monkeypatch.setattr(losses, "mode_seeking_loss", recording)
    for stages, sizes in ((None, [64, 128]), ([0], [64]), ([-1], [128])):
        Trainer(tiny_config(mode_seeking_weight=1.0, mode_seeking_stages=stages), clip=tiny_clip).train_step(batch)
        assert seen.pop() == (sizes, None)
    # mode_seeking_size: every stage's distance at that size
    Trainer(tiny_config(mode_seeking_weight=1.0, mode_seeking_size=32), clip=tiny_clip).train_step(batch)
    assert seen.pop() == ([64, 128], 32)
    with pytest.raises(ValueError, match="mode_seeking_size"):
        tiny_config(mode_seeking_size=48)
    with pytest.raises(ValueError, match="mode_seeking_stages"):
        tiny_config(mode_seeking_stages=[5])
    with pytest.raises(ValueError, match="at least one stage"):
        tiny_config(mode_seeking_stages=[])


def test_diffaugment_stages_choose_the_stages_whose_d_sees_augmented_images(trainer_and_batch, tiny_clip,
                                                                           monkeypatch):
    _, batch = trainer_and_batch
    seen, ratios, chances = [], [], []
    real_augment = trainer_module.diff_augment

    def recording(images, policy, *, generator=None, translation=0.125, probability=1.0):
        seen.append(images.shape[-1])
        ratios.append(translation)
        chances.append(probability)
        return real_augment(images, policy, generator=generator, translation=translation, probability=probability)

    monkeypatch.setattr(trainer_module, "diff_augment", recording)
    for stages, sizes in ((None, {64, 128}), ([0], {64}), ([-1], {128}), ([1], {128})):
        Trainer(tiny_config(diffaugment_stages=stages), clip=tiny_clip).train_step(batch)
        assert set(seen) == sizes, stages
        seen.clear()
    assert set(ratios) == {0.125} and set(chances) == {1.0}  # DiffAugment's 1/8, every image, unless told
    Trainer(tiny_config(diffaugment_translation=1 / 64), clip=tiny_clip).train_step(batch)
    assert ratios[-1] == 1 / 64
    Trainer(tiny_config(diffaugment_probability=0.5), clip=tiny_clip).train_step(batch)
    assert chances[-1] == 0.5
    with pytest.raises(ValueError, match="diffaugment_stages"):
        tiny_config(diffaugment_stages=[2])
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="diffaugment_translation"):
            tiny_config(diffaugment_translation=bad)
    with pytest.raises(ValueError, match="at least one stage"):
        tiny_config(diffaugment_stages=[])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="diffaugment_probability"):
            tiny_config(diffaugment_probability=bad)


@pytest.mark.parametrize("switch, weight, name", [("color_consistency", 50.0, "loss/g/color"),
                                                  ("layout_consistency", 10.0, "loss/g/layout"),
                                                  ("spectral_weight", 1.0, "loss/g/spectrum")])
def test_consistency_terms(trainer_and_batch, tiny_clip, switch, weight, name):
    _, batch = trainer_and_batch
    values = Trainer(tiny_config(**{switch: weight}), clip=tiny_clip).train_step(batch)
    assert math.isfinite(values[name]) and values[name] > 0
    plain = Trainer(tiny_config(), clip=tiny_clip).train_step(batch)
    assert name not in plain
    # the weighted term is part of G's total
    assert values["loss/g"] - plain["loss/g"] == pytest.approx(weight * values[name], rel=1e-3)
    with pytest.raises(ValueError, match=switch):
        tiny_config(**{switch: -1.0})


def test_language_free_step_and_pseudo_text_features(trainer_and_batch, tiny_clip):
    f = torch.nn.functional.normalize(torch.randn(5, 32), dim=1)
    pseudo = pseudo_text_features(f, 0.5, generator=torch.Generator().manual_seed(0))
    assert pseudo.shape == (5, 32) and torch.allclose(pseudo.norm(dim=1), torch.ones(5))
    cos = (pseudo * f).sum(1)
    assert (cos > 0.7).all() and (cos < 1.0).all()  # near the image feature, not on it
    _, batch = trainer_and_batch
    trainer = Trainer(tiny_config(language_free=True, mismatch=False, uncond_weight=0.0), clip=tiny_clip)
    values = trainer.train_step(batch)
    assert trainer.step == 1 and all(math.isfinite(v) for v in values.values())
    assert "loss/d/stage0/uncond" not in values


# --------------------------------------------------------------------------- config


def test_config_presets_round_trip_and_overrides():
    for name in ("faces", "demo"):
        cfg = train_preset(name)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg = apply_overrides(train_preset("demo"), ["lr_g=1e-4", "nd=4", "model.z_dim=8", "amp=false",
                                                 "diffaugment=color,cutout", "steps=null", "lr_d=1"])
    assert (cfg.lr_g, cfg.model.nd, cfg.model.z_dim, cfg.amp, cfg.diffaugment, cfg.steps) == (
        1e-4, 4, 8, False, "color,cutout", None
    )
    assert isinstance(cfg.lr_d, float)
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        apply_overrides(cfg, ["learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        apply_overrides(cfg, {"batch_size": 1})
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        apply_overrides(cfg, {"diffaugment": "flip"})
    with pytest.raises(ValueError, match="clip_stages"):
        apply_overrides(cfg, {"clip_stages": [3]})


def test_prune_snapshots_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "latest.pt").write_bytes(b"x")
    removed = prune_snapshots(tmp_path, 2)
    assert [p.name for p in removed] == ["step_0000001.pt", "step_0000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_0000003.pt", "step_0000004.pt"]


# --------------------------------------------------------------------------- contracts


class PooledDiscriminator(torch.nn.Module):
    """Another discriminator behind the same interface: features(), then heads() returning one DiscOutput."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
        self.uncond, self.align = torch.nn.Linear(16, 1), torch.nn.Linear(16, cfg.text_dim)
        self.cond = torch.nn.Bilinear(16, cfg.cond_dim, 1)

    def features(self, images):
        return self.trunk(images)

    def heads(self, features, condition=None, *, mismatched=None, align=True):
        from helpers.network import DiscOutput

        def cond(c):
            return None if c is None else self.cond(features, c.to(features.dtype)).squeeze(1)

        return DiscOutput(self.uncond(features).squeeze(1), cond(condition), self.align(features) if align else None,
                          cond(mismatched))


def test_a_discriminator_with_the_interface_trains_without_other_changes(trainer_and_batch, tiny_clip):
    _, batch = trainer_and_batch
    trainer = Trainer(tiny_config(mode_seeking_weight=1.0), clip=tiny_clip)
    trainer.D = torch.nn.ModuleList([PooledDiscriminator(trainer.cfg.model) for _ in trainer.D])
    trainer.opt_D = [torch.optim.Adam(d.parameters(), lr=1e-3) for d in trainer.D]
    before = [p.clone() for p in trainer.D.parameters()]
    values = trainer.train_step(batch)
    assert all(math.isfinite(v) for v in values.values())
    assert {"loss/d/stage1/align", "loss/g/stage0/adv", "loss/g/mode_seeking"} <= set(values)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.D.parameters()))  # every D learned


def test_metric_names_are_hierarchical_and_the_loss_plot_draws_every_term(tmp_path):
    from helpers.run_folder import loss_panels, metric_name, read_metrics

    row = {"step": 1, "loss/d": 1.0, "loss/d/stage0": 1.0, "loss/d/stage0/cond": 0.5, "loss/g": 2.0,
           "loss/g/kl": 0.1, "loss/g/mode_seeking": 0.3, "loss/g/stage0": 1.5, "loss/g/stage0/clip": 0.2,
           "perf/images_per_s": 9.0}
    panels = loss_panels(list(row))
    assert panels == {"loss": ["loss/d", "loss/g"], "loss/d": ["loss/d/stage0"], "loss/d/stage0": ["loss/d/stage0/cond"],
                      "loss/g": ["loss/g/kl", "loss/g/mode_seeking", "loss/g/stage0"],
                      "loss/g/stage0": ["loss/g/stage0/clip"]}
    assert sorted(k for keys in panels.values() for k in keys) == sorted(k for k in row if k.startswith("loss/"))
    assert plot_loss_curves([row, {**row, "step": 2}], tmp_path / "curves.png").stat().st_size > 0
    # a run from before the names were hierarchical reads with today's names (a resume mixes both)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "d_loss": 1.0, "d0_cond": 0.5, "g1": 2.0, "g0_clip": 0.2, "kl": 0.1, "mode_seeking": 0.3,
         "images_per_s": 9.0, "epoch": 0}) + "\n")
    assert read_metrics(tmp_path / "metrics.jsonl") == [{
        "step": 1, "loss/d": 1.0, "loss/d/stage0/cond": 0.5, "loss/g/stage1": 2.0, "loss/g/stage0/clip": 0.2,
        "loss/g/kl": 0.1, "loss/g/mode_seeking": 0.3, "perf/images_per_s": 9.0, "epoch": 0}]
    assert metric_name("loss/d") == "loss/d"


def test_run_config_is_the_one_precedence_rule():
    saved = tiny_config(steps=2, lr_g=1e-4)
    assert run_config(None, {"steps": 5}) == apply_overrides(train_preset("demo"), {"steps": 5})  # a new run
    named = dataclasses.replace(saved, lr_g=5e-4, mirror_dir="drive")  # a preset named again, with other rates
    resumed = run_config(named, {"steps": 5}, saved=saved)
    assert (resumed.steps, resumed.lr_g, resumed.mirror_dir) == (5, 1e-4, None)  # compared, never adopted
    with pytest.raises(UserError, match=r"batch_size: checkpoint 4, asked 8"):
        run_config(None, ["batch_size=8"], saved=saved)


# --------------------------------------------------------------------------- recipe switches


@pytest.mark.parametrize("switches", [
    {"r1_weight": 1.0}, {"d_batches": "joint"}, {"clip_augment": True}, {"ma_gp_weight": 2.0},
    {"model": ModelConfig(**TINY, d_clip_head=True), "r1_weight": 1.0, "ma_gp_weight": 2.0},
    {"model": ModelConfig(**TINY, d_clip_head=True, d_minibatch_std=2), "r1_weight": 1.0},
], ids=["r1", "joint-batches", "clip-augment", "ma-gp", "clip-head-with-penalties", "minibatch-std-with-r1"])
def test_recipe_switches_train_and_name_their_terms(trainer_and_batch, tiny_clip, switches):
    _, batch = trainer_and_batch
    trainer = Trainer(tiny_config(**switches), clip=tiny_clip)
    values = trainer.train_step(batch)
    assert all(math.isfinite(v) for v in values.values())
    base = values["loss/d/stage0/cond"] + values["loss/d/stage0/uncond"] + 5 * values["loss/d/stage0/align"]
    if "r1_weight" in switches:
        assert values["loss/d/stage0/r1"] > 0 and values["loss/d/stage1/r1"] > 0
        base += 0.5 * switches["r1_weight"] * values["loss/d/stage0/r1"]
    else:
        assert "loss/d/stage0/r1" not in values
    if "ma_gp_weight" in switches:
        assert values["loss/d/stage0/ma_gp"] > 0 and values["loss/d/stage1/ma_gp"] > 0
        base += 2.0 * values["loss/d/stage0/ma_gp"]
    else:
        assert "loss/d/stage0/ma_gp" not in values
    assert values["loss/d/stage0"] == pytest.approx(base, rel=1e-5)


def test_lazy_regularisation_runs_the_penalties_every_few_steps_at_that_weight(trainer_and_batch, tiny_clip):
    _, batch = trainer_and_batch
    trainer = Trainer(tiny_config(r1_weight=1.0, ma_gp_weight=2.0, reg_every=2), clip=tiny_clip)
    first, second, third = (trainer.train_step(batch) for _ in range(3))
    assert "loss/d/stage0/r1" in first and "loss/d/stage0/r1" in third
    assert not any(k.endswith(("/r1", "/ma_gp")) for k in second)
    assert first["loss/d/stage1"] == pytest.approx(
        first["loss/d/stage1/cond"] + first["loss/d/stage1/uncond"] + 5 * first["loss/d/stage1/align"]
        + 2 * (0.5 * first["loss/d/stage1/r1"] + 2.0 * first["loss/d/stage1/ma_gp"]), rel=1e-5)


def test_the_clip_aided_discriminator_judges_clip_features_and_saves_no_clip_weights(trainer_and_batch, tiny_clip):
    from helpers.network import ClipAidedDiscriminator, Discriminator

    _, batch = trainer_and_batch
    cfg = tiny_config(model=ModelConfig(**TINY, d_clip_head=True))
    trainer = Trainer(cfg, clip=tiny_clip)
    assert [type(d) for d in trainer.D] == [Discriminator, ClipAidedDiscriminator]  # the last stage only
    last = trainer.D[-1]
    assert not any("clip_trunk" not in k and "visual" in k for k in last.state_dict())  # no CLIP weights saved
    trainer.train_step(batch)
    assert last.clip_psi.weight.grad is not None and last.clip_project.weight.grad is not None  # the head learns
    images, c = torch.rand(2, 3, 128, 128) * 2 - 1, torch.randn(2, 8)
    conv = Discriminator.heads(last, last.features(images)[0], c)
    both = last.heads(last.features(images), c)
    assert not torch.allclose(conv.cond, both.cond) and torch.equal(conv.uncond, both.uncond)
    fresh = ClipAidedDiscriminator(cfg.model, 1)
    with pytest.raises(RuntimeError, match="attach_clip"):
        fresh.features(images)


def test_balanced_sampling_draws_rare_attributes_more_often():
    from helpers.batches import balance_weights

    attrs = torch.zeros(100, 2, dtype=torch.bool)
    attrs[:10, 0] = True  # 10% have the rare attribute
    attrs[:60, 1] = True  # 60% the common one
    assert torch.equal(balance_weights(attrs, 0.0), torch.ones(100))
    w = balance_weights(attrs, 1.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] / w[50] == pytest.approx(10 / (1 / 0.6))  # the rarest attribute it has decides
    assert w[50] / w[99] == pytest.approx(1 / 0.6)  # an image with none weighs 1 before normalising
    draws = RunBatches(100, 10, seed=0, start_step=0, total_steps=1000, weights=balance_weights(attrs, 0.5))
    rows = torch.tensor([i for batch in draws for i, _ in batch])
    plain = torch.tensor([i for batch in RunBatches(100, 10, seed=0, start_step=0, total_steps=1000) for i, _ in batch])
    assert (plain < 10).float().mean().item() == pytest.approx(0.10)  # a permutation per epoch
    assert (rows < 10).float().mean().item() > 0.18  # sqrt(10) / mean weight ~ 2.2x as often
    again = RunBatches(100, 10, seed=0, start_step=400, total_steps=1000, weights=balance_weights(attrs, 0.5))
    assert [b for b in again] == list(draws)[400:]  # a resume draws the same order


def test_balanced_sampling_without_attributes_says_it_draws_uniformly(synthetic_features, tmp_path, tiny_clip, capsys):
    train(synthetic_features, tmp_path / "a", tiny_config(steps=1, balance_attributes=0.5), clip=tiny_clip,
          progress=False)
    assert "the features file has no attributes" in capsys.readouterr().err


def test_balanced_sampling_trains_on_features_with_attributes(toy_features, tmp_path, tiny_clip):
    result = train(toy_features, tmp_path / "a", tiny_config(steps=2, balance_attributes=0.5), clip=tiny_clip,
                   progress=False)
    assert load_checkpoint(result.checkpoint)["step"] == 2


def test_an_overflowing_penalty_under_fp16_scaling_is_skipped_not_a_divergence(trainer_and_batch, tiny_clip):
    """fp16: the penalty differentiates the scaled verdict; an overflow there is the GradScaler's to
    handle (it skips the step), while the same overflow without a scaler is a divergence."""
    trainer = Trainer(tiny_config(r1_weight=1.0), clip=tiny_clip)
    terms = {"loss/d/stage0/cond": torch.tensor(0.7), "loss/d/stage0/r1": torch.tensor(math.inf),
             "loss/d/stage0": torch.tensor(math.inf), "loss/d": torch.tensor(math.inf)}
    with pytest.raises(TrainingDiverged, match="loss/d/stage0/r1=inf"):
        trainer._floats(terms, "discriminator step")
    trainer.scaler = object()  # as on a T4 (fp16 with a GradScaler)
    assert trainer._floats(terms, "discriminator step") == {"loss/d/stage0/cond": pytest.approx(0.7)}
    terms["loss/d/stage0/cond"] = torch.tensor(math.nan)
    terms["loss/d/stage0/r1"] = torch.tensor(1.0)
    with pytest.raises(TrainingDiverged):  # a NaN elsewhere is still a divergence
        trainer._floats(terms, "discriminator step")


def test_joint_batches_give_the_separate_verdicts_without_batchnorm(trainer_and_batch, tiny_clip):
    """With BatchNorm out of the way, judging real and fake as one batch changes nothing else."""
    from helpers.network import DiscOutput

    cfg = tiny_config(model=ModelConfig(**TINY, d_norm="none"))
    trainer = Trainer(cfg, clip=tiny_clip)
    real, fake, c = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64), torch.randn(3, 8)
    a = trainer._judge(trainer.D[0], real, fake, c, c.flip(0))
    trainer.cfg = dataclasses.replace(cfg, d_batches="joint")
    b = trainer._judge(trainer.D[0], real, fake, c, c.flip(0))
    for verdicts in (a, b):  # (real, fake): the mismatched caption is asked of the real batch only
        assert all(isinstance(v, DiscOutput) for v in verdicts)
        assert verdicts[0].mismatched is not None and verdicts[1].mismatched is None
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert (s is None) == (t is None)
            if s is not None:
                torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-4)


def test_standing_statistics_change_the_saved_ema_only(synthetic_features, tmp_path, tiny_clip):
    plain = train(synthetic_features, tmp_path / "a", tiny_config(steps=2), clip=tiny_clip, progress=False)
    standing = train(synthetic_features, tmp_path / "b", tiny_config(steps=2, ema_standing_stats=2), clip=tiny_clip,
                     progress=False)
    a, b = load_checkpoint(plain.checkpoint), load_checkpoint(standing.checkpoint)
    for key in a["G"]:  # training is the same
        torch.testing.assert_close(a["G"][key], b["G"][key])
    means = [k for k in a["G_ema"] if k.endswith("running_mean")]
    assert means and all(torch.equal(a["G_ema"][k], a["G"][k]) for k in means)  # copied from G
    assert any(not torch.equal(b["G_ema"][k], b["G"][k]) for k in means)  # recomputed for G_ema's weights
    for key in a["G_ema"]:
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(a["G_ema"][key], b["G_ema"][key])


def test_standing_statistics_are_recomputed_alike_from_the_saved_weights(synthetic_features, tmp_path, tiny_clip):
    """``build_demo.standing_export`` recomputes, from an export, what ``ema_standing_stats`` saved."""
    from helpers.checkpoint import save_generator
    from helpers.tools.build_demo import standing_export

    cfg = tiny_config(steps=2, ema_standing_stats=2)
    run = train(synthetic_features, tmp_path / "run", cfg, clip=tiny_clip, progress=False)
    ckpt = load_checkpoint(run.checkpoint)
    copied = Generator(cfg.model)  # G_ema's weights with G's statistics: G_ema as training left it
    copied.load_state_dict({k: ckpt["G"][k] if "running" in k or "num_batches" in k else v
                            for k, v in ckpt["G_ema"].items()})
    plain = save_generator(tmp_path / "plain.pt", copied, clip_spec=ckpt["clip_spec"], step=2)
    out = standing_export(plain, synthetic_features, tmp_path / "standing.pt", cfg)
    again = load_checkpoint(out)["G_ema"]
    means = [k for k in again if k.endswith(("running_mean", "running_var"))]
    assert means and any(not torch.equal(again[k], ckpt["G"][k]) for k in means)
    for key, value in ckpt["G_ema"].items():
        torch.testing.assert_close(again[key], value)


def test_previews_draw_the_saved_ema_generator(synthetic_features, tmp_path, tiny_clip):
    """With standing statistics, a preview shows what sampling the step's checkpoint gives."""
    import numpy as np

    from helpers.pictures import preview_picture

    cfg = tiny_config(steps=2, ema_standing_stats=2)
    shown = {}
    run = train(synthetic_features, tmp_path / "run", cfg, clip=tiny_clip, progress=False,
                on_sample=lambda step, picture, path: shown.update({step: np.asarray(picture)}))
    ckpt = load_checkpoint(run.checkpoint)
    generator = Generator(cfg.model)
    generator.load_state_dict(ckpt["G_ema"])
    captions = load_preview_captions(cfg.preview_captions)
    z = torch.randn(len(captions), cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    ca = torch.randn(len(captions), cfg.model.cond_dim, generator=torch.Generator().manual_seed(cfg.seed + 2))
    with torch.no_grad():
        images, _, _ = generator.eval()(tiny_clip.encode_text(captions).float(), z, ca)
    expected = np.asarray(preview_picture([x.float() for x in images], captions))
    assert np.abs(shown[2].astype(int) - expected.astype(int)).max() <= 1


def test_the_reference_preset_keeps_the_bootcamp_recipe():
    from helpers.train_config import reference_recipe

    ref = train_preset("reference")
    assert (ref.model.upsample, ref.model.ca_init_gain, ref.model.ca_noise, ref.model.d_norm,
            ref.model.d_spectral_norm, ref.model.d_clip_head) == ("deconv", None, 1.0, "batch", False, False)
    assert (ref.temperature, ref.r1_weight, ref.clip_augment, ref.d_batches, ref.ema_standing_stats,
            ref.balance_attributes, ref.ma_gp_weight, ref.reg_every, ref.color_consistency, ref.layout_consistency,
            ref.spectral_weight) == (0.5, 0.0, False, "separate", 0, 0.0, 0.0, 1, 0.0, 0.0, 0.0)
    assert (ref.model.ng, ref.model.nd, ref.batch_size, ref.lr_g) == (1024, 64, 24, 2e-4)
    # the faces preset is the same run with the adopted switches: back at the reference values, it is the reference
    faces = train_preset("faces")
    assert (faces.model.upsample, faces.model.ca_noise, faces.r1_weight, faces.clip_augment) == (
        "nearest_glu", 0.0, 0.05, True)
    assert dataclasses.replace(reference_recipe(faces), preset="reference") == ref


def test_the_d_step_moves_no_statistics_of_a_head_no_loss_reads(trainer_and_batch):
    trainer, batch = trainer_and_batch
    align_norm = trainer.D[0].align_head[1]
    trainer.train_step(batch)
    # one D step (real images) and one G step (fakes): the detached fakes of the D step are not counted
    assert int(align_norm.num_batches_tracked) == 2


def test_a_resume_from_the_mirror_alone_keeps_the_mirrors_metrics(synthetic_features, tmp_path, tiny_clip):
    import shutil

    mirror = tmp_path / "drive"
    train(synthetic_features, tmp_path / "run", tiny_config(steps=2, mirror_dir=str(mirror)), clip=tiny_clip,
          progress=False)
    shutil.rmtree(tmp_path / "run")  # a new Colab runtime: only Drive is left
    result = train(synthetic_features, tmp_path / "run", None, overrides={"steps": 4, "mirror_dir": str(mirror)},
                   resume=True, clip=tiny_clip, progress=False)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(mirror / "metrics.jsonl")] == [1, 2, 3, 4]
