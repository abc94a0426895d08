"""The quality harness: the artifact index on known spectra, one measurement, variants in segments."""

import json

import pytest
import torch

from helpers.tools import quality


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random colour fields, low-pass filtered: natural-looking spectra with no periodic spikes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def give_every_face_the_commonest_attributes(features) -> None:
    """Rewrite ``features`` so every face has the commonest attributes of measure_quality's real pool
    (seed 7777): every diversity prompt then finds real faces to compare with."""
    from collections import Counter

    from helpers.files import atomic_save
    from helpers.toyfaces import TOY_ATTRIBUTES, iter_toyfaces

    pool = Counter(tuple(a[n] for n in TOY_ATTRIBUTES) for _, a, _ in iter_toyfaces(100, seed=7777))
    data = torch.load(features, weights_only=False)
    data["attributes"]["values"][:] = torch.tensor(pool.most_common(1)[0][0])
    atomic_save(data, features)


def test_the_artifact_index_sees_a_period_of_n_over_8():
    real = smooth_images(16)
    grid = torch.zeros(64, 64)
    grid[::8, :] = grid[:, ::8] = 0.3  # a faint 8 px lattice, the trace of three stride-2 upsamplings
    index = quality.periodic_artifact_index((real + grid).clamp(-1, 1), real)
    assert index["ratio"] > 5 and index["contrast"]["ratio"] > 5
    assert index["contrast"]["generated"] > index["contrast"]["real"]
    same = quality.periodic_artifact_index(smooth_images(16, seed=1), real)
    assert same["contrast"]["ratio"] == pytest.approx(1.0, rel=0.5)


def test_the_artifact_index_says_which_period_the_spikes_have():
    """A 2 px pattern (the last x2 upsampling's trace) raises the 2 px group only; a 4 px one the 4 px
    group (and may raise the 2 px one: its harmonics include N / 2), never the 8 px one."""
    real = smooth_images(16)
    for period in (2, 4):
        grid = torch.zeros(64, 64)
        grid[::period, :] = grid[:, ::period] = 0.3
        index = quality.periodic_artifact_index((real + grid).clamp(-1, 1), real)
        by_period = index["contrast"]["by_period"]
        assert set(by_period) == set(index["by_period"]) == {"2", "4", "8"}
        longer = [v for k, v in by_period.items() if int(k) > period]
        assert by_period[str(period)] > 20 and max(longer) < 3, by_period
        assert index["by_period"][str(period)] > 20, index
    plain = quality.periodic_artifact_index(smooth_images(16, seed=1), real)["contrast"]["by_period"]
    assert all(v == pytest.approx(1.0, rel=0.5) for v in plain.values()), plain


def test_the_artifact_index_is_not_inflated_by_a_spectrum_that_falls_off_early():
    """The spike contrast divides each spike by its neighbourhood, so images much smoother than real
    faces near N / 2 (a generator's usual deficit) score high with a grid far fainter than real faces'
    own; the index compares the spikes' power above their neighbourhood, as a share of all the images'
    power, and keeps such a grid below real faces'."""
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(128.0)
    k = torch.randint(1, 7, (16, 3, 8, 2), generator=g).float()  # a few whole low frequencies: nothing near N / 2
    phase = 2 * torch.pi * (k[..., 0, None, None] * pos[:, None] + k[..., 1, None, None] * pos[None, :]) / 128
    smooth = (0.3 * torch.cos(phase + 6.3 * torch.rand(16, 3, 8, 1, 1, generator=g))).sum(2)  # [16, 3, 128, 128]
    pattern = ((-1.0) ** pos)[None, :].expand(128, 128)  # a 2 px grid (the last up-block's period)
    real_grid = smooth + 0.1 * torch.randn(16, 3, 128, 128, generator=g) + 1e-3 * pattern  # detail up to N / 2
    faint = smooth + 5e-4 * pattern  # no fine detail, and half real faces' grid
    index = quality.periodic_artifact_index(faint, real_grid)
    assert index["contrast"]["by_period"]["2"] > 5, index  # the contrast calls it a strong artifact
    assert index["by_period"]["2"] < 0.5 and index["ratio"] < 1, index
    strong = quality.periodic_artifact_index(smooth + 5e-3 * pattern, real_grid)
    assert strong["by_period"]["2"] > 5, strong  # a grid stronger than real faces' counts
    same = quality.periodic_artifact_index(real_grid, real_grid)
    assert same["ratio"] == pytest.approx(1.0) and same["by_period"]["2"] == pytest.approx(1.0)


def test_the_artifact_index_reads_a_grid_and_not_softness():
    """Toy faces softened by a 3-tap blur, or drawn at half resolution and upsampled, hold no grid and
    read as real faces on the index (while their spike contrast reads about 10x: it takes the missing
    fine detail for a grid); a 4 px checkerboard of a single grey level reads about 4x, softened or not."""
    controls = quality.artifact_controls(32)
    for name in ("real faces", "softened", "half resolution"):
        assert 0.67 < controls[name]["index"] < 1.5, controls
    for name in ("grid of 1 grey level", "softened, with that grid"):
        assert controls[name]["index"] > 2.5, controls
    assert controls["softened"]["contrast"] > 5 and controls["softened"]["fine_detail"] < 0.3, controls


def test_fine_detail_reads_how_much_power_lies_beyond_a_quarter_of_the_sampling_rate():
    """What the artifact index's neighbourhood lacks (README, "A grid, or missing detail?"): the share of
    the power spectrum at radial frequencies above N / 4, generated over real. Smooth images hold
    almost none, a blur removes most of it, a 2 px grid is all of it, and the same images read 1."""
    g = torch.Generator().manual_seed(0)
    detailed = (smooth_images(16, size=128) + 0.2 * torch.randn(16, 3, 128, 128, generator=g)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(detailed, 3, stride=1, padding=1, count_include_pad=False)
    assert quality.fine_detail_share(smooth_images(16, size=128)) < 0.01
    share = quality.fine_detail_share(detailed)
    # white noise puts 1 - pi / 16 (0.80) of its power beyond N / 4; the smooth fields' power dilutes it
    assert 0.05 < share < 0.8, share
    pos = torch.arange(128.0)
    grid = ((-1.0) ** pos)[None, :].expand(128, 128).repeat(4, 3, 1, 1)
    assert quality.fine_detail_share(grid) == pytest.approx(1.0)
    detail = quality.fine_detail(blurred, detailed)
    assert detail["ratio"] < 0.5 and detail["ratio"] == pytest.approx(detail["generated"] / detail["real"])
    assert quality.fine_detail(detailed, detailed)["ratio"] == pytest.approx(1.0)
    assert quality.fine_detail_share(detailed[:, :, :, :96]) == pytest.approx(share, rel=0.1)  # not square: fine


def toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n toy faces of toy seed ``seed``: images [n, 3, 256, 256] in [-1, 1] and whether each wears glasses [n]."""
    from helpers.attributes import to_tensor
    from helpers.tools.train_classifier import toyface_arrays
    from helpers.toyfaces import TOY_ATTRIBUTES

    images, labels = toyface_arrays(n, seed=seed, size=256)
    return to_tensor(images), torch.from_numpy(labels[:, TOY_ATTRIBUTES.index("Eyeglasses")])


def test_eye_counts_find_two_eyes_a_bar_over_them_and_a_row_of_repeated_eyes():
    """Real toy faces read two eyes (most of them); glasses drawn as a bar over the eyes read none and a
    row of repeated eyes reads more than two, so both lie far from real faces in ``eye_count_distance``,
    while unseen real faces lie close."""
    real, glasses = toy_images(200, seed=0)
    plain = ~glasses
    counts = quality.eye_counts(real)
    assert (counts[plain] == 2).float().mean() > 0.8
    faces, _ = toy_images(100, seed=1)
    faces = faces[quality.eye_counts(faces) == 2][:24]
    barred, repeated = faces.clone(), faces.clone()
    barred[:, :, 104:150, 60:196] = -0.9  # a dark bar across the eye band: no eyes show
    for face, eyes in zip(repeated, quality.eye_map(faces)):  # a row of copies of the left eye, 24 px apart
        y, x = (int(v) * 2 for v in eyes.nonzero()[0])  # the left eye's centre at 256 px
        eye = face[:, y - 10:y + 10, x - 12:x + 12].clone()
        end = min(x + 156, face.shape[-1])
        face[:, y - 10:y + 10, x - 12:end] = eye.repeat(1, 1, 7)[:, :, :end - x + 12]
    others, _ = toy_images(200, seed=2)
    same = quality.eye_count_distance(others, real)
    assert same["distance"] < 0.15, same
    assert quality.eye_count_distance(barred, real)["distance"] > 0.6
    assert (quality.eye_counts(barred) == 0).all()
    tiled = quality.eye_count_distance(repeated, real)
    assert tiled["distance"] > 0.5, tiled
    assert sum(tiled["generated"][3:]) > 0.6
    groups = {"plain": (torch.ones(len(faces), dtype=torch.bool), plain)}
    grouped = quality.eye_count_distance(faces, real, groups=groups)
    assert grouped["groups"]["plain"]["real"] == pytest.approx(
        (torch.bincount(counts[plain].clamp_max(4), minlength=5).double() / int(plain.sum())).tolist())
    assert grouped["groups"]["plain"]["images"] == (len(faces), int(plain.sum()))


def test_measure_quality_reports_every_number(toy_features, tiny_clip, tmp_path):
    from helpers.checkpoint import save_generator
    from helpers.config import ModelConfig
    from helpers.network import build_models

    G, _ = build_models(ModelConfig(text_dim=32, z_dim=8, cond_dim=8, ng=64, nd=4, num_stages=1), seed=0)
    path = save_generator(tmp_path / "g.pt", G, clip_spec="tiny-random")
    q = quality.measure_quality(path, toy_features, num_captions=3, seeds=2, diversity_prompts=2, diversity_seeds=2,
                                real_pool_faces=20, clip=tiny_clip)
    assert 0 <= q["attribute_accuracy"] <= 1 and set(q["recall"]) == set(q["per_attribute"])
    assert q["resolution"] == 64 and q["artifact_index"]["ratio"] > 0
    assert set(q["artifact_index"]["by_period"]) == {"2", "4", "8"}
    assert q["fine_detail"]["real"] > 0 and q["fine_detail"]["ratio"] > 0
    assert q["eyes"] is None  # 64 px: an eye is a few pixels (a 128 px stage: test_eye_counts_of_a_measurement)
    assert len(q["distances"]) == 2 and all("fid" in d for d in q["distances"].values())  # both extractors named
    assert set(q["diversity"]["per_stage"]) == {"64"}  # one stage; its value is the ratio (see test_demo)
    assert set(q["diversity"]["mean_colour_per_stage"]) == {"64"}
    probe = q["condition_probe"]
    assert set(probe["mean"]) == set(probe["sampled"]) and 0 <= probe["min_sampled"] <= 1
    # with real faces for every diversity prompt, every ratio is a number
    give_every_face_the_commonest_attributes(toy_features)
    q = quality.measure_quality(path, toy_features, num_captions=3, seeds=2, diversity_prompts=2, diversity_seeds=2,
                                real_pool_faces=100, clip=tiny_clip)
    colour = q["diversity"]["mean_colour_per_stage"]["64"]
    assert q["diversity"]["prompts"] > 0 and colour is not None and colour > 0 and colour != q["diversity"]["ratio"]
    regions = q["diversity"]["regions"]
    assert set(regions) == {"face", "border"} and all(v > 0 for v in regions.values())
    assert regions["face"] != regions["border"] != q["diversity"]["ratio"]
    assert q["diversity"]["regions_per_stage"] == {"64": regions}  # every stage's; the last one's is ``regions``
    # the artifact index's real side is every held-out face at the last stage's size, diversity prompts or not
    from helpers.features import FeaturesDataset, downsample

    test = FeaturesDataset(toy_features, split="test", num_stages=1)
    real = downsample(torch.stack([test.image(i) for i in range(len(test))]), 64)
    assert q["artifact_index"]["contrast"]["real"] == pytest.approx(quality.spectral_spikes(real), rel=1e-9)
    assert q["fine_detail"]["real"] == pytest.approx(quality.fine_detail_share(real), rel=1e-9)


def test_region_masks_split_a_toy_face_into_its_box_and_the_border():
    masks = quality.region_masks(64)
    face, border = masks["face"], masks["border"]
    assert face.sum() == 40 * 32 and border.sum() == 64 * 64 - 44 * 44 and not (face & border).any()
    assert face[33, 32] and border[0, 0] and border[63, 32] and not border[32, 32]
    wide = quality.region_masks(256)  # the same regions at another size
    assert wide["face"].sum() == 16 * face.sum() and wide["border"].sum() == 16 * border.sum()
    # real toy faces: the face's box holds the face (far from the image's mean there), the border barely
    from helpers.attributes import to_tensor
    from helpers.tools.train_classifier import toyface_arrays

    images = to_tensor(toyface_arrays(16, seed=3, size=64)[0])
    skin = (images - images.mean((2, 3), keepdim=True)).abs().mean(1)
    assert skin[:, face].mean() > 1.2 * skin[:, border].mean()


def test_eye_counts_of_a_measurement_compare_the_images_asked_for_eyeglasses_with_real_faces_wearing_them(
        toy_features, tmp_path):
    from helpers.checkpoint import save_generator
    from helpers.config import ModelConfig
    from helpers.features import FeaturesDataset
    from helpers.network import build_models

    G, _ = build_models(ModelConfig(text_dim=32, z_dim=8, cond_dim=8, ng=64, nd=4, num_stages=2), seed=0)
    path = save_generator(tmp_path / "g.pt", G, clip_spec="tiny-random")
    q = quality.measure_quality(path, toy_features, num_captions=4, seeds=2, diversity_prompts=1, diversity_seeds=2,
                                real_pool_faces=10)
    eyes = q["eyes"]
    assert q["resolution"] == 128 and 0 <= eyes["distance"] <= 1
    per_stage = q["diversity"]["regions_per_stage"]  # two stages: each one's regions, the last one's ``regions``
    assert set(per_stage) == {"64", "128"} and per_stage["128"] == q["diversity"]["regions"]
    assert set(eyes["groups"]) == {"Eyeglasses", "no Eyeglasses"}
    test = FeaturesDataset(toy_features, split="test", num_stages=1)
    asked = sum(g["images"][0] for g in eyes["groups"].values())
    worn = sum(g["images"][1] for g in eyes["groups"].values())
    assert (asked, worn) == (eyes["images"][0], eyes["images"][1]) == (q["captions"] * q["seeds"], len(test))
    with pytest.raises(ValueError, match="128 px or a multiple"):
        quality.eye_counts(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("ca_noise", [1.0, 0.0])
def test_the_condition_probe_sees_what_the_noise_hides(ca_noise):
    from helpers.config import ModelConfig
    from helpers.network import build_models

    G, _ = build_models(ModelConfig(text_dim=8, z_dim=8, cond_dim=8, ng=32, nd=4, num_stages=1, ca_noise=ca_noise),
                        seed=0)
    with torch.no_grad():  # mu = 0.1 * text (a faint signal), log-variance 0: noise of std 1
        G.ca.fc.weight.zero_()
        G.ca.fc.bias.zero_()
        G.ca.fc.weight[:8].copy_(0.1 * torch.eye(8))
    g = torch.Generator().manual_seed(1)  # not the probe's seed: its noise would equal the text
    text = torch.randn(2000, 8, generator=g)
    values = torch.stack([text[:, 0] > 0, text[:, 1] > 0.5], dim=1)
    probe = quality.condition_probe(G, text, values, ["a", "b"], torch.arange(2000) // 4)
    assert probe["min_mean"] > 0.95  # the mean carries both attributes
    if ca_noise:
        assert probe["sampled"]["a"] < 0.7 and probe["min_sampled"] < 0.7  # one draw of noise drowns them
    else:
        assert probe["sampled"] == probe["mean"]


def test_the_base_is_the_reference_recipe_with_the_schedule_the_tables_were_measured_with():
    # The README's harness tables compare every variant with one base; the demo build's own schedule
    # (no translation, the mode-seeking term x3 on the 64 px stage) must not move it.
    base = quality.variant_config([], steps=10)
    assert (base.diffaugment, base.mode_seeking_weight, base.mode_seeking_stages) == ("translation", 1.0, None)
    assert (base.balance_attributes, base.model.z_every_stage, base.model.upsample, base.r1_weight) == (
        0.0, False, "deconv", 0.0)
    variant = quality.variant_config(["diffaugment=", "mode_seeking_stages=[0]"], steps=10)
    assert (variant.diffaugment, variant.mode_seeking_stages) == ("", [0])


def test_variants_train_in_segments_and_a_rerun_skips_what_is_measured(toy_features, tiny_clip, tmp_path,
                                                                         monkeypatch):
    measured = []

    def stub(checkpoint, features, **kwargs):
        from helpers.checkpoint import read_generator

        measured.append(read_generator(checkpoint).step)
        return dict(attribute_accuracy=0.5, min_recall=0.25, artifact_index=dict(ratio=2.0, contrast=dict(ratio=3.0)),
                    diversity=dict(ratio=0.5),
                    distances={"random-conv (stand-in)": dict(fid=1.0)})

    monkeypatch.setattr(quality, "measure_quality", stub)
    tiny = ["ng=64", "nd=4", "z_dim=8", "cond_dim=8", "batch_size=4", "mode_seeking_weight=0"]
    report = quality.run_variant("small", tiny, toy_features, tmp_path, points=(2, 3), stages=1, clip=tiny_clip)
    assert measured == [2, 3] and [p["step"] for p in report["points"]] == [2, 3]
    assert json.loads((tmp_path / "small.json").read_text())["points"][-1]["step"] == 3
    quality.run_variant("small", tiny, toy_features, tmp_path, points=(2, 3), stages=1, clip=tiny_clip)
    assert measured == [2, 3]  # nothing measured twice
    table = quality.write_table(tmp_path).read_text()
    assert "| small | ng=64" in table and "| 3 | 0.500 | 0.25 | 2.00 | 3.00 | - | - | 1 | 0.50 | - |" in table


def test_the_table_shows_the_spike_contrast_the_fine_detail_and_the_eyes_beside_the_artifact_index():
    def point(step, index, **extra):
        return dict(step=step, attribute_accuracy=0.9, min_recall=0.5, artifact_index=index,
                    distances={"random-conv (seeded)": dict(fid=0.1)}, diversity=dict(ratio=0.8), **extra)

    reports = [dict(name="new", overrides=["model.up_blur=true"], timed_seconds_per_step=1.0,
                    points=[point(500, dict(ratio=1.02, contrast=dict(ratio=4.26)), fine_detail=dict(ratio=0.146),
                                  eyes=dict(distance=0.123, groups={"Eyeglasses": dict(distance=0.456)}))]),
               # written when ``ratio`` was the spike contrast and ``power_ratio`` the grid's power
               dict(name="earlier", overrides=[], points=[point(500, dict(ratio=4.26, power_ratio=1.02))]),
               dict(name="old", overrides=[], points=[point(500, dict(ratio=2.19))])]  # before the grid's power
    head, rule, new, earlier, old = quality.format_table(reports).splitlines()
    cells = [c.strip() for c in head.strip("|").split("|")]
    at = cells.index("artifacts / real")
    assert cells[at:at + 4] == ["artifacts / real", "spike contrast / real", "fine detail / real",
                                "eyes vs real (glasses)"]
    assert len(rule.strip("|").split("|")) == len(cells)
    assert [c.strip() for c in new.strip("|").split("|")][at:at + 4] == ["1.02", "4.26", "0.15", "0.12 (glasses 0.46)"]
    assert [c.strip() for c in earlier.strip("|").split("|")][at:at + 4] == ["1.02", "4.26", "-", "-"]
    assert [c.strip() for c in old.strip("|").split("|")][at:at + 4] == ["-", "2.19", "-", "-"]
    line = quality.summary_line(reports[0]["points"][0])
    assert "artifacts 1.02x real (spike contrast 4.26x)" in line and "eyes 0.12 (glasses 0.46) from real" in line
    assert "fine detail 0.15x real" in line
    assert "fine detail -x real" in quality.summary_line(reports[2]["points"][0])


def test_every_measured_image_gets_its_own_noise(toy_features, seed_recorder):
    """Accuracy and diversity average over noise: a few noise vectors shared by every caption would make
    the whole measurement hinge on those few draws (the diversity ratio of one generator spread 0.74-0.82
    over evaluation seeds with 8 shared vectors, 0.74-0.77 with noise of its own per image)."""
    give_every_face_the_commonest_attributes(toy_features)
    path, calls = seed_recorder
    q = quality.measure_quality(path, toy_features, num_captions=3, seeds=2, diversity_prompts=3, diversity_seeds=2,
                                real_pool_faces=100, seed=5)
    assert q["diversity"]["prompts"] == 3 and len(calls) == 1 + 3  # the accuracy images, then one call per prompt
    seeds = [s for call in calls for s in call]
    assert len(seeds) == 3 * 2 + 3 * 2 and len(set(seeds)) == len(seeds), calls
