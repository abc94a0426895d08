"""Shapes, gradients, determinism and parameter counts of the networks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.config import ModelConfig, model_preset
from helpers.network import (
    ConditioningAugmentation,
    Discriminator,
    Generator,
    build_models,
    count_parameters,
    format_summary,
    summary_rows,
)

# A small config that keeps the tests fast; the same code builds the big presets.
SMALL = dict(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4)


def small_cfg(num_stages: int = 3, **overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides}, num_stages=num_stages)


def text(batch: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim), dim=1)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generator_and_discriminator_shapes(num_stages, batch, mode):
    cfg = small_cfg(num_stages)
    G, Ds = build_models(cfg, seed=0)
    G.train(mode == "train")
    Ds.train(mode == "train")
    if mode == "train" and batch == 1:
        # BatchNorm cannot estimate a variance from one value per channel: the
        # generator's mapping (BatchNorm1d) refuses a batch of 1 in train mode.
        with pytest.raises(ValueError, match="more than 1 value"):
            G(text(1, cfg.text_dim), torch.randn(1, cfg.z_dim))
        return
    images, mu, logvar = G(text(batch, cfg.text_dim), torch.randn(batch, cfg.z_dim))
    assert len(images) == num_stages
    for i, img in enumerate(images):
        assert img.shape == (batch, 3, 64 * 2**i, 64 * 2**i)
        assert img.min() >= -1 and img.max() <= 1
    assert mu.shape == logvar.shape == (batch, cfg.cond_dim)
    for D, img in zip(Ds, images):
        out = D(img, mu)
        assert out.uncond.shape == (batch,)
        assert out.cond.shape == (batch,)
        assert out.align.shape == (batch, cfg.text_dim)
        assert D(img).cond is None


def test_discriminator_batch_of_one_in_train_mode():
    # The discriminators' BatchNorm2d layers see several values per channel
    # (a spatial map), so a batch of 1 trains; only the generator's BatchNorm1d can't.
    cfg = small_cfg(3)
    _, Ds = build_models(cfg, seed=0)
    Ds.train()
    for stage, D in enumerate(Ds):
        res = 64 * 2**stage
        out = D(torch.rand(1, 3, res, res) * 2 - 1, torch.randn(1, cfg.cond_dim))
        assert out.cond.shape == (1,) and out.align.shape == (1, cfg.text_dim)


def test_discriminator_rejects_wrong_resolution():
    D = Discriminator(small_cfg(3), stage=1)
    with pytest.raises(ValueError, match="128 px"):
        D(torch.zeros(2, 3, 64, 64))


def test_generator_rejects_wrong_text_dim():
    G = Generator(small_cfg(1)).eval()
    with pytest.raises(ValueError, match=r"text_emb must be \[B, 16\]"):
        G(torch.zeros(2, 15), torch.zeros(2, 8))


def test_last_stage_gradient_reaches_every_generator_parameter():
    cfg = small_cfg(3)
    G, _ = build_models(cfg, seed=0)
    G.train()
    images, _, _ = G(text(3, cfg.text_dim), torch.randn(3, cfg.z_dim))
    images[-1].square().mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # The earlier stages' image heads do not feed the last image, by design.
    missing = [n for n in missing if not n.startswith(("heads.0.", "heads.1."))]
    assert missing == []


def test_alignment_head_ignores_the_condition():
    cfg = small_cfg(2)
    _, Ds = build_models(cfg, seed=0)
    D = Ds[1].eval()
    img = torch.rand(3, 3, 128, 128) * 2 - 1
    a = D(img, torch.randn(3, cfg.cond_dim))
    b = D(img, torch.randn(3, cfg.cond_dim))
    assert torch.equal(a.align, b.align)
    assert torch.equal(a.uncond, b.uncond)
    assert not torch.allclose(a.cond, b.cond)


def test_conditioning_augmentation_is_linear_and_reparameterised():
    ca = ConditioningAugmentation(16, 8)
    t = text(4, 16)
    eps = torch.randn(4, 8)
    cond, mu, logvar = ca(t, eps)
    torch.testing.assert_close(cond, mu + torch.exp(0.5 * logvar) * eps)
    # No ReLU: means and log-variances take both signs.
    assert (mu < 0).any() and (mu > 0).any() and (logvar < 0).any()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(ca(t, generator=g1)[0], ca(t, generator=g2)[0])


def test_ca_noise_scales_the_sampled_part_of_the_condition_in_the_generator():
    t, eps = text(4, 16), torch.randn(4, 8)
    for noise in (0.0, 0.5):
        cfg = small_cfg(1, text_dim=16, cond_dim=8, ca_noise=noise)
        G, _ = build_models(cfg, seed=0)
        cond, mu, logvar = G.ca(t, eps)
        torch.testing.assert_close(cond, mu + noise * torch.exp(0.5 * logvar) * eps)
    G.eval()  # at 0 the noise changes nothing: the image depends on z alone
    G0, _ = build_models(small_cfg(1, text_dim=16, cond_dim=8, ca_noise=0.0), seed=0)
    G0.eval()
    z = torch.randn(4, G0.cfg.z_dim)
    assert torch.equal(G0(t, z, eps).images[0], G0(t, z, torch.randn(4, 8)).images[0])
    with pytest.raises(ValueError, match="ca_noise must be in"):
        small_cfg(1, ca_noise=1.5)


def test_z_every_stage_gives_the_upper_stages_the_noise_beside_the_condition():
    cfg = small_cfg(3, z_every_stage=True, ca_noise=0.0)
    G, _ = build_models(cfg, seed=0)
    seen = []
    G.stages[1].register_forward_hook(lambda module, args, out: seen.append(args[1]))
    t, z = text(2, cfg.text_dim), torch.randn(2, cfg.z_dim)
    images = G(t, z).images
    assert [x.shape[-1] for x in images] == [64, 128, 256]
    torch.testing.assert_close(seen[0], torch.cat([G.condition_mean(t), z], dim=1))
    plain, _ = build_models(small_cfg(3), seed=0)
    assert sum(p.numel() for p in G.parameters()) > sum(p.numel() for p in plain.parameters())


def test_seeded_construction_and_forward_are_deterministic():
    cfg = small_cfg(3)
    outs = []
    for _ in range(2):
        G, Ds = build_models(cfg, seed=123)
        G.eval()
        gen = torch.Generator().manual_seed(7)
        z = torch.randn(2, cfg.z_dim, generator=gen)
        images, _, _ = G(text(2, cfg.text_dim) * 0 + 0.25, z, generator=gen)
        outs.append((images[-1], Ds[2].eval()(images[-1]).uncond))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    G3, _ = build_models(cfg, seed=124)
    assert not torch.equal(next(G3.parameters()), next(build_models(cfg, seed=123)[0].parameters()))


def test_weight_init_follows_the_reference():
    G, Ds = build_models(model_preset("demo"), seed=0)
    conv = Ds[0].trunk[1][0].weight
    assert abs(conv.std().item() - 0.02) < 0.002 and abs(conv.mean().item()) < 0.002
    bn = Ds[0].trunk[1][1]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.bias.abs().max() == 0


def test_reference_preset_parameter_counts_match_the_reference():
    rows = summary_rows(model_preset("reference"))
    g_total = sum(r["g_params"] for r in rows)
    # The reference (mentor's solution): G 15.4M; D 9.7M / 22.8M / 75.3M per stage.
    # Our alignment head drops the condition's input channels, hence slightly fewer.
    assert abs(g_total - 15.4e6) / 15.4e6 < 0.10
    for row, ref in zip(rows, [9.7e6, 22.8e6, 75.3e6]):
        assert abs(row["d_params"] - ref) / ref < 0.10
    assert [r["resolution"] for r in rows] == [64, 128, 256]
    assert [r["features"][0] for r in rows] == [64, 32, 16]
    assert "total" in format_summary(rows)


def test_generator_parameter_count_matches_summary():
    cfg = small_cfg(3)
    G, _ = build_models(cfg, seed=0)
    assert count_parameters(G) == sum(r["g_params"] for r in summary_rows(cfg))


@pytest.mark.parametrize("size", [(2, 2), (5, 3), (16, 16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_tiled_equals_convolving_the_tiled_map(size, batch):
    from helpers.network import conv_tiled, tile

    vector, weight = torch.randn(batch, 6), torch.randn(4, 6, 3, 3)
    like = torch.zeros(batch, 1, *size)
    expected = F.conv2d(tile(vector, like), weight, padding=1)
    torch.testing.assert_close(conv_tiled(vector, weight, size), expected, rtol=1e-5, atol=1e-5)


def test_next_stage_equals_concatenate_then_join():
    from helpers.network import NextStage, tile

    stage = NextStage(8, 5, 2).eval()
    x, c = torch.randn(3, 8, 16, 16), torch.randn(3, 5)
    expected = stage.up(stage.res(stage.join(torch.cat([tile(c, x), x], dim=1))))
    torch.testing.assert_close(stage(x, c), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- recipe switches


@pytest.mark.parametrize("mode", ["nearest", "nearest_glu", "bilinear", "bilinear_glu"])
def test_upsampling_modes_keep_the_shapes_and_fold_exactly(mode):
    from helpers.network import fold_batchnorm

    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=2, upsample=mode)
    G, _ = build_models(cfg, seed=0)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in G.modules())
    text, z, eps = torch.nn.functional.normalize(torch.randn(3, 16), dim=1), torch.randn(3, 8), torch.randn(3, 8)
    images, _, _ = G.eval()(text, z, eps)
    assert [tuple(i.shape) for i in images] == [(3, 3, 64, 64), (3, 3, 128, 128)]
    folded, _, _ = fold_batchnorm(G)(text, z, eps)
    for a, b in zip(images, folded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["nearest_glu", "bilinear_glu"])
def test_glu_up_block_keeps_the_channels_last_layout_in_its_backward(mode):
    """The gated up-block computes nn.GLU's values and hands BatchNorm a gradient in the features'
    own layout: a channels-last gradient (an NCHW one sends BatchNorm's backward down a path
    about ten times slower on the CPU)."""
    from helpers.network import UpBlock

    block = UpBlock(6, 4, mode).train().to(memory_format=torch.channels_last)
    bn = block[2]
    x = torch.randn(5, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    seen = {}

    def watch(module, inputs, out):  # BatchNorm's output: its value, and the gradient it receives
        seen["before"] = out.detach()
        out.register_hook(lambda g: seen.update(grad=g))

    bn.register_forward_hook(watch)
    y = block(x)
    assert torch.equal(y, F.glu(seen["before"], dim=1))
    upstream = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    y.backward(upstream)
    assert seen["grad"].is_contiguous(memory_format=torch.channels_last)
    ref = seen["before"].clone().requires_grad_()
    F.glu(ref, dim=1).backward(upstream)
    torch.testing.assert_close(seen["grad"], ref.grad)


def test_bilinear_upsampling_mirrors_little_of_the_spectrum():
    """x2 upsampling puts mirrored copies of the input's spectrum above the input's Nyquist frequency,
    the fine periodic pattern a 3x3 conv must then learn to cancel: nearest x2 (the [1, 1] kernel)
    keeps about 30% of white noise's power there, bilinear x2 ([1, 3, 3, 1] / 4, StyleGAN's
    low-pass up-filter) under 10%."""
    from helpers.network import UpBlock

    x = torch.randn(4, 3, 32, 32)
    freq = torch.fft.fftfreq(64).abs()
    mirrored = (freq[:, None] > 0.25) | (freq[None, :] > 0.25)  # beyond the 32 px input's Nyquist

    def mirrored_share(mode: str) -> float:
        up = UpBlock(3, 3, mode)[0]
        assert isinstance(up, nn.Upsample) and up.mode == mode.split("_")[0]
        y = up(x)
        power = torch.fft.fft2(y - y.mean(dim=(2, 3), keepdim=True)).abs().pow(2).mean((0, 1))  # [64, 64]
        return float(power[mirrored].sum() / power.sum())

    nearest, bilinear = mirrored_share("nearest_glu"), mirrored_share("bilinear_glu")
    assert nearest > 0.25 and bilinear < 0.1 and bilinear < nearest / 3, (nearest, bilinear)


def test_image_skip_draws_each_upper_stage_on_the_stage_below():
    """With ``image_skip`` an upper stage's image is tanh(up(the stage below's pre-tanh image) + its
    own head's output): a head that outputs zero repeats the stage below, colours and all."""
    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=3, upsample="bilinear_glu",
                      image_skip=True)
    G, _ = build_models(cfg, seed=0)
    for head in G.heads[1:]:
        nn.init.zeros_(head[0].weight)
        nn.init.zeros_(head[0].bias)
    text, z, eps = torch.nn.functional.normalize(torch.randn(3, 16), dim=1), torch.randn(3, 8), torch.randn(3, 8)
    images = G.eval()(text, z, eps).images
    assert [i.shape[-1] for i in images] == [64, 128, 256]
    for lower, upper in zip(images, images[1:]):
        expected = torch.tanh(F.interpolate(torch.atanh(lower), scale_factor=2, mode="bilinear", align_corners=False))
        torch.testing.assert_close(upper, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(upper.mean((2, 3)), lower.mean((2, 3)), atol=2e-2, rtol=0)


def test_the_upper_stages_can_upsample_their_own_way():
    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=3, upsample="nearest_glu",
                      upper_upsample="bilinear_glu")
    G, _ = build_models(cfg, seed=0)
    modes = [[m.mode for m in stage.modules() if isinstance(m, nn.Upsample)] for stage in G.stages]
    assert modes == [["nearest"] * 4, ["bilinear"], ["bilinear"]]
    plain = build_models(ModelConfig(**{**cfg.to_dict(), "upper_upsample": None}), seed=0)[0]
    assert [m.mode for m in plain.modules() if isinstance(m, nn.Upsample)] == ["nearest"] * 6
    with pytest.raises(ValueError, match="upper_upsample must be one of"):
        ModelConfig(upper_upsample="cubic")


def test_discriminator_switches_and_the_orthogonal_condition_init():
    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=2, d_norm="none",
                      d_spectral_norm=True, ca_init_gain=1.0)
    G, D = build_models(cfg, seed=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    w = G.ca.fc.weight  # [2 * cond_dim, text_dim] = [16, 16]: orthogonal
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)
    out = D[1](torch.rand(2, 3, 128, 128) * 2 - 1, torch.randn(2, 8), mismatched=torch.randn(2, 8))
    assert out.uncond.shape == out.cond.shape == out.mismatched.shape == (2,) and out.align.shape == (2, 16)
    with pytest.raises(ValueError, match="upsample must be one of"):
        ModelConfig(upsample="pixelshuffle")


def test_minibatch_std_shows_the_discriminator_how_alike_a_batch_is():
    from helpers.network import MinibatchStd

    layer = MinibatchStd(4)
    torch.manual_seed(0)
    alike = torch.randn(1, 5, 4, 4).expand(8, -1, -1, -1)
    varied = torch.randn(8, 5, 4, 4)
    out = layer(varied)
    assert out.shape == (8, 6, 4, 4) and torch.equal(out[:, :5], varied)
    assert layer(alike)[:, 5].max() <= 1e-4 + 1e-7  # a collapsed batch: no spread (but the sqrt epsilon)
    # each group of 4 gets its own value: the std over the group, averaged over channels and positions
    expected = varied.view(2, 4, 5, 4, 4).var(1, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))
    torch.testing.assert_close(out[:4, 5], expected[0].expand(4, 4, 4))
    torch.testing.assert_close(out[4:, 5], expected[1].expand(4, 4, 4))
    assert layer(varied[:6]).shape == (6, 6, 4, 4)  # 6 is no multiple of 4: the whole batch is one group
    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=2, d_minibatch_std=4)
    _, D = build_models(cfg, seed=0)
    out = D[1](torch.rand(4, 3, 128, 128) * 2 - 1, torch.randn(4, 8), mismatched=torch.randn(4, 8))
    assert out.uncond.shape == out.cond.shape == (4,) and out.align.shape == (4, 16)
    # the logits depend on the rest of the batch only through that channel, and only with the switch on
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    D.eval()
    first = D[0](images).uncond[0]
    assert D[0](torch.cat([images[:1], images[:1].expand(3, -1, -1, -1)])).uncond[0] != first
    plain = build_models(ModelConfig(**{**cfg.to_dict(), "d_minibatch_std": 0}), seed=0)[1].eval()
    torch.testing.assert_close(plain[0](torch.cat([images[:1], images[:1].expand(3, -1, -1, -1)])).uncond[0],
                               plain[0](images).uncond[0])
    with pytest.raises(ValueError, match="d_minibatch_std"):
        ModelConfig(d_minibatch_std=-1)


def test_blur_keeps_a_constant_and_removes_a_2px_pattern():
    from helpers.network import Blur

    blur = Blur()
    const = torch.full((2, 3, 8, 8), 0.7)
    torch.testing.assert_close(blur(const), const)  # edges replicated: no dark border
    i = torch.arange(16)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).expand(1, 2, 16, 16)
    stripes = ((-1.0) ** i).expand(1, 2, 16, 16)
    for pattern in (checker, stripes, stripes.transpose(-1, -2)):
        assert blur(pattern)[..., 1:-1, 1:-1].abs().max() < 1e-6
    slow = torch.cos(torch.pi * i / 4).expand(1, 1, 16, 16)  # an 8 px period: mostly kept
    assert 0.8 < float(blur(slow)[..., 4:-4, 4:-4].abs().max()) < 0.9


@pytest.mark.parametrize("mode", ["deconv", "nearest_glu"])
def test_up_blur_leaves_no_2px_pattern_in_an_up_block(mode):
    """Upsampling makes even and odd output pixels different functions of the input, so after the
    nonlinearity the block's output carries a 2 px pattern on average; ``blur`` removes it."""
    from helpers.network import UpBlock

    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, 16)

    @torch.no_grad()
    def nyquist_share(block: nn.Module) -> float:
        y = block.eval()(x)[..., 2:-2, 2:-2].mean(0)  # the pattern every sample shares, away from the edges
        power = torch.fft.fft2(y - y.mean(dim=(1, 2), keepdim=True)).abs().pow(2).mean(0)  # [28, 28]
        n = power.shape[-1] // 2
        return float((power[n, 0] + power[0, n] + power[n, n]) / power.sum())

    torch.manual_seed(1)
    plain = UpBlock(8, 8, mode)
    torch.manual_seed(1)
    blurred = UpBlock(8, 8, mode, blur=True)
    assert nyquist_share(plain) > 0.05 and nyquist_share(blurred) < 1e-3, (nyquist_share(plain), nyquist_share(blurred))


def test_up_blur_filters_every_up_block_and_folds_exactly():
    from helpers.network import Blur, UpBlock, fold_batchnorm

    cfg = ModelConfig(text_dim=16, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=3, upsample="nearest_glu",
                      upper_upsample="bilinear_glu", up_blur=True)
    G, _ = build_models(cfg, seed=0)
    blocks = [m for m in G.modules() if isinstance(m, UpBlock)]
    assert len(blocks) == 6 and all(isinstance(b[-1], Blur) for b in blocks)
    assert not any(k.endswith("kernel") for k in G.state_dict())  # a fixed filter, not saved with the weights
    text, z, eps = torch.nn.functional.normalize(torch.randn(3, 16), dim=1), torch.randn(3, 8), torch.randn(3, 8)
    images = G.eval()(text, z, eps).images
    assert [i.shape[-1] for i in images] == [64, 128, 256]
    for a, b in zip(images, fold_batchnorm(G)(text, z, eps).images):  # float rounding only, over three stages
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "up_blur"}).up_blur is False
