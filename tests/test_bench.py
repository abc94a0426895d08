"""Benchmarks and the inference speed-ups, on tiny models on the CPU (no timing assertions:
timings on a shared machine are noisy; FLOP counts and report fields are not)."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from helpers.tools import bench
from helpers.__main__ import main
from helpers.config import ModelConfig
from helpers.network import build_models, fold_batchnorm
from helpers.sample import generate_from_features, load_generator, save_generator
from helpers.train import TrainConfig

TINY = dict(text_dim=32, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=2)
TINY_SETTINGS = bench.BenchSettings(warmup=0, repeats=1, matmul_size=128, loader_images=6)


def random_batchnorm_statistics(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine weights (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tiny_report():
    config = TrainConfig(model=ModelConfig(**TINY), batch_size=3)
    case = bench.Case("tiny", config, "tiny-random", sample_batches=(1, 3), compare_unfolded=(3,))
    rows = []
    report = bench.run_bench(device="cpu", cases=[case], settings=TINY_SETTINGS, on_row=rows.append)
    return report, rows


# --------------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("batch", [1, 3])
def test_folded_generator_matches_the_eval_generator(batch):
    G, _ = build_models(ModelConfig(**TINY), seed=0)
    random_batchnorm_statistics(G)
    G.eval()
    folded = fold_batchnorm(G)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in G.modules())  # the original is untouched
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    g = torch.Generator().manual_seed(1)
    text = nn.functional.normalize(torch.randn(batch, TINY["text_dim"], generator=g), dim=1)
    z, eps = torch.randn(batch, TINY["z_dim"], generator=g), torch.randn(batch, TINY["cond_dim"], generator=g)
    with torch.no_grad():
        expected, mu, _ = G(text, z, eps)
        got, mu_folded, _ = folded(text, z, eps)
    assert torch.equal(mu, mu_folded)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_fold_batchnorm_handles_linear_and_transposed_conv_without_bias():
    for layer, bn, x in (
        (nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), torch.randn(4, 5)),
        (nn.ConvTranspose2d(3, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), torch.randn(2, 3, 5, 5)),
        (nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), torch.randn(2, 3, 5, 5)),
    ):
        seq = nn.Sequential(layer, bn, nn.ReLU())
        random_batchnorm_statistics(seq)
        seq.eval()
        folded = fold_batchnorm(seq)
        assert isinstance(folded[1], nn.Identity)
        torch.testing.assert_close(folded(x), seq(x), atol=1e-5, rtol=1e-4)


def test_sampling_runs_the_lean_copy_with_the_same_images(tmp_path):
    G, _ = build_models(ModelConfig(**TINY), seed=0)
    random_batchnorm_statistics(G)
    path = save_generator(tmp_path / "g.pt", G, clip_spec="tiny-random")
    model = load_generator(path, device="cpu")
    assert model.inference is not None and not any(isinstance(m, nn.BatchNorm2d) for m in model.inference.modules())
    assert model.inference.heads[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    text = nn.functional.normalize(torch.randn(3, TINY["text_dim"]), dim=1)
    fast = generate_from_features(model, text, [5, 6, 7])
    plain = generate_from_features(dataclasses.replace(model, inference=None), text, [5, 6, 7])
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the benchmark run


def test_report_has_every_measurement_with_positive_flops(tiny_report):
    report, rows = tiny_report
    json.loads(json.dumps(report))  # the report is plain JSON
    assert report["format"] == bench.BENCH_FORMAT
    assert report["matmul"]["gflop_per_s"] > 0 and report["matmul"]["dtype"] == "float32"
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] >= 1
    kinds = [(r["kind"], r["batch"], r.get("variant")) for r in report["rows"]]
    assert kinds == [
        ("sample", 1, "folded+NHWC"), ("sample", 3, "folded+NHWC"), ("sample", 3, "folded"), ("sample", 3, "plain"),
        ("train", 3, "fp32"), ("train", 3, "fp32, fused Adam"), ("loader", 3, None),
    ]
    assert [r["kind"] for r in rows] == ["matmul"] + [k for k, _, _ in kinds]  # on_row saw each as it came
    for r in report["rows"]:
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["peak_memory_mb"] > 0
        if r["kind"] != "loader":
            assert r["gflop_per_image"] > 0 and r["gflop_per_s"] > 0 and r["fraction_of_matmul"] > 0
    lean, folded, plain = report["rows"][1:4]
    # folding and the layout save memory passes and reorders, not FLOPs
    assert lean["gflop_per_image"] == pytest.approx(plain["gflop_per_image"]) == pytest.approx(folded["gflop_per_image"])


def test_training_step_flops_per_image_stay_under_the_no_waste_bound(tiny_report):
    report, _ = tiny_report
    train, fused = [r for r in report["rows"] if r["kind"] == "train"]
    assert fused["gflop_per_image"] == pytest.approx(train["gflop_per_image"])  # the optimiser is not counted
    forward = train["forward_gflop_per_image"]
    assert forward["G"] > 0 and len(forward["D"]) == TINY["num_stages"] and all(d > 0 for d in forward["D"])
    assert len(forward["clip"]) == 1 and forward["clip"][0] > 0  # CLIP loss at the last stage only
    bound = bench.step_flops_bound(forward["G"], forward["D"], forward["clip"])
    assert train["bound_gflop_per_image"] == pytest.approx(bound)
    # the step is at least a forward and a backward of G and a forward of every D on its three batches
    assert 3 * forward["G"] + 3 * sum(forward["D"]) < train["gflop_per_image"] <= bound


def test_breakdown_and_table(tiny_report, tmp_path):
    report, _ = tiny_report
    for key in ("sample", "train"):
        b = report["breakdown"][key]
        assert set(b["share"]) >= {"matmul/conv", "outside ops"}
        assert sum(b["share"].values()) == pytest.approx(1.0, abs=0.02)
        assert b["matmul_conv_fraction_of_matmul"] > 0 and b["top_ops"]
    assert report["breakdown"]["sample"]["flops_by_module"]
    optimizers = report["breakdown"]["train"]["optimizers"]
    assert optimizers["params"] > 0 and optimizers["seconds"] > 0 and optimizers["fused_seconds"] > 0
    table = bench.format_table(report)
    assert "| sample tiny | folded+NHWC | 3 |" in table and "| train step tiny | fp32 | 3 |" in table
    assert "Reference rate: 128x128 float32 matmul" in table
    path = bench.write_report(report, tmp_path / "out" / "bench.json")
    assert json.loads(path.read_text())["rows"][0]["name"] == "sample tiny"


def test_step_flops_bound_counts_three_batches_per_discriminator():
    assert bench.step_flops_bound(1.0, [1.0, 2.0], [0.5]) == pytest.approx(3 * (1 + 3 * 3 + 0.5))


# --------------------------------------------------------------------------- presets, CLIP, CLI


def test_preset_cases_follow_the_presets():
    faces, demo = bench.preset_case("faces", batch_size=4), bench.preset_case("demo", batch_size=6)
    assert faces.config.batch_size == 4 and faces.config.model.ng == 1024 and faces.config.model.text_dim == 512
    assert faces.config.clip_stages == [-1] and faces.clip_spec == "ViT-B-32/random"
    assert demo.config.batch_size == 6 and demo.config.model.text_dim == 128 and demo.clip_spec == "demo/random"
    assert demo.config.clip_stages == [0, -1]
    with pytest.raises(ValueError, match="unknown preset"):
        bench.preset_case("huge")


def test_random_clip_architectures_build_offline():
    clip = bench.make_clip("demo/random", torch.device("cpu"))
    assert clip.dim == 128 and clip.image_size == 64 and clip.spec == "demo/random"
    images = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    assert clip.embed_generated(images).shape == (2, 128)
    vit = bench.make_clip("ViT-B-32/random", torch.device("cpu"))  # OpenAI's architecture, random weights
    assert vit.dim == 512 and vit.image_size == 224 and not any(p.requires_grad for p in vit.parameters())


def test_cli_rejects_a_batch_of_one(capsys):
    assert main(["bench", "--batch-size", "1"]) == 2
    assert "--batch-size must be at least 2" in capsys.readouterr().err


def test_the_bound_counts_the_mode_seeking_draws():
    config = TrainConfig(model=ModelConfig(**TINY), batch_size=4, mode_seeking_weight=1.0)
    case = bench.Case("tiny", config, "tiny-random")
    rows, _ = bench.training_rows(case, device=torch.device("cpu"), settings=TINY_SETTINGS, rate=1.0)
    train = rows[0]
    assert train["g_rows"] == 1.25  # one of the four texts goes through G a second time
    forward = train["forward_gflop_per_image"]
    bound = bench.step_flops_bound(forward["G"], forward["D"], forward["clip"], g_rows=1.25)
    assert train["bound_gflop_per_image"] == pytest.approx(bound)
    assert 3 * 1.25 * forward["G"] + 3 * sum(forward["D"]) < train["gflop_per_image"] <= bound
    assert bench.g_term(1.25) == "G x 1.25" and bench.g_term(1.0) == "G"  # as the table prints the bound


def test_the_bound_holds_with_lazy_penalties_and_a_clip_aided_discriminator():
    """R1 differentiates D twice more on penalty steps (every reg_every-th); the bound allows for it,
    and a CLIP-aided D's forward counts its CLIP (flop counting works inside autograd.grad)."""
    config = TrainConfig(model=ModelConfig(**TINY, d_clip_head=True), batch_size=3, r1_weight=0.05, reg_every=2)
    case = bench.Case("tiny", config, "tiny-random")
    clip = bench.make_clip("tiny-random", torch.device("cpu"))
    batch = bench.random_batch(config, dim=clip.dim, generator=torch.Generator().manual_seed(0))
    from helpers.train import Trainer

    trainer = Trainer(config, clip=clip)
    per = bench.forward_flops(case, trainer, clip, batch)
    assert per["penalty_rate"] == 0.5
    plain = bench.forward_flops(bench.Case("tiny", dataclasses.replace(config, model=ModelConfig(**TINY)),
                                           "tiny-random"), Trainer(dataclasses.replace(config, model=ModelConfig(**TINY)),
                                                                   clip=clip), clip, batch)
    assert per["D"][-1] - plain["D"][-1] >= 0.9 * per["clip"][0]  # the last D's forward includes a CLIP forward
    steps = [bench.count_flops(lambda: trainer.train_step(batch)) / 3 for _ in range(2)]
    assert steps[0] > steps[1]  # the penalty step costs more
    assert sum(steps) / 2 <= per["bound"]
