"""Feature extraction end to end on a generated folder of odd images, with the tiny random CLIP."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.errors import UserError
from helpers.extract import (
    SkippedImageWarning,
    assign_split,
    extract_features,
    load_image,
    partial_dir,
)
from helpers.features import FeaturesDataset, images_path, read_features

LONG_CAPTION = "The woman has " + ", ".join(["blond hair and arched eyebrows"] * 20) + "."


def _rgb(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def odd_images() -> dict[str, Image.Image | bytes]:
    """File name -> image (or raw bytes): every odd kind the issue lists, plus unreadable files."""
    palette = _rgb(40, 30, 3).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    jpeg = io.BytesIO()
    _rgb(64, 64, 5).save(jpeg, "JPEG")
    return {
        "grey.png": _rgb(40, 32, 1).convert("L"),
        "rgba.png": _rgb(32, 40, 2).convert("RGBA"),
        "palette.png": palette,
        "cmyk.jpg": _rgb(48, 36, 4).convert("CMYK"),
        "sixteen.png": Image.fromarray(np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)),
        "tiny.png": _rgb(10, 10, 6),
        "wide.png": _rgb(300, 20, 7),
        "tall.jpg": _rgb(12, 200, 8),
        "onebit.png": _rgb(30, 30, 9).convert("1"),
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "garbage.png": b"this is not an image",
        "empty.jpg": b"",
    }


UNREADABLE = {"truncated", "garbage", "empty"}


def make_odd_folder(root, n: int = 50):
    """n files: the odd ones above and plain RGB images; captions as .txt (some blank lines, one missing)."""
    root.mkdir(parents=True, exist_ok=True)
    files = odd_images()
    for i in range(n - len(files)):
        files[f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"] = _rgb(24 + i % 7, 20 + i % 5, 100 + i)
    for name, image in files.items():
        path = root / name
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path)
        stem = path.stem
        if stem == "img001":
            continue  # an image with no caption
        lines = [f"A face number {stem}.", "", "   ", f"The person in {stem} smiles.", ""]
        if stem == "img002":
            lines.append(LONG_CAPTION)
        path.with_suffix(".txt").write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    return make_odd_folder(tmp_path_factory.mktemp("odd") / "faces")


@pytest.fixture(scope="module")
def extracted(odd_folder, tmp_path_factory):
    """The issue's acceptance run, through the command line (offline, tiny-random CLIP).

    Returns (features path, what was printed to stdout, what was printed to stderr).
    """
    from helpers.__main__ import main

    out = tmp_path_factory.mktemp("features") / "faces.pt"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["extract", "--source", str(odd_folder), "--out", str(out), "--clip", "tiny-random",
                     "--captions-per-image", "3", "--batch-size", "16", "--device", "cpu", "--quiet"])
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def test_extraction_of_odd_folder_skips_unreadable_files_and_keeps_the_rest(extracted):
    out, _, stderr = extracted
    data = read_features(out)
    assert len(data["ids"]) == 47 and data["meta"]["num_listed"] == 50
    assert {name.split("/")[-1].split(".")[0] for name, _ in data["meta"]["skipped"]} == UNREADABLE
    for stem in UNREADABLE:  # each warning names its file
        assert any(line.startswith("warning: skipped") and f"{stem}." in line for line in stderr.splitlines())
    assert not any(i in UNREADABLE for i in data["ids"])
    assert data["meta"]["clip_spec"] == "tiny-random" and data["meta"]["dim"] == 32
    assert data["meta"]["truncated_captions"] == 1


def test_summary_is_printed_at_the_end(extracted):
    printed = extracted[1]
    assert "47 images" in printed and "skipped 3 unreadable image(s)" in printed
    assert "truncated.jpg: OSError: image file is truncated" in printed
    assert "1 image(s) without a caption" in printed
    assert "1 caption(s) longer than CLIP's 77 tokens were truncated" in printed
    assert "47 image(s) smaller than 256 px were enlarged" in printed


def test_library_warns_for_each_skipped_image(tmp_path, tiny_clip):
    folder = tmp_path / "few"
    folder.mkdir()
    _rgb(30, 30, 0).save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(SkippedImageWarning, match="bad.jpg"):
        summary = extract_features(folder, tmp_path / "f.pt", clip=tiny_clip, progress=False)
    assert summary.num_images == 1 and [w for w, _ in summary.skipped] == [str(folder / "bad.jpg")]


def test_captions_blank_lines_and_missing_captions(extracted):
    data = read_features(extracted[0])
    by_id = dict(zip(data["ids"], data["captions"]))
    assert by_id["img001"] == []  # no caption file: kept, language-free
    assert by_id["grey"] == ["A face number grey.", "The person in grey smiles."]  # blank lines dropped
    counts = dict(zip(data["ids"], data["caption_counts"].tolist()))
    assert counts["img001"] == 0 and counts["img002"] == 3 and data["text_features"].shape[1] == 3


def test_dataset_over_extracted_file_has_documented_shapes_and_true_downsamples(extracted):
    out = extracted[0]
    stored = np.load(images_path(out))
    assert stored.dtype == np.uint8 and stored.shape == (47, 256, 256, 3)
    for split in ("train", "test"):
        ds = FeaturesDataset(out, split=split)
        item = ds[0]
        assert [tuple(x.shape) for x in item["images"]] == [(3, 64, 64), (3, 128, 128), (3, 256, 256)]
        assert all(x.min() >= -1 and x.max() <= 1 for x in item["images"])
        for key in ("image_feature", "text_feature", "mismatched_text_feature"):
            assert item[key].shape == (32,)
            torch.testing.assert_close(item[key].norm(), torch.tensor(1.0), atol=3e-3, rtol=0)
        full = torch.from_numpy(stored[int(ds.rows[0])]).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(item["images"][2], full)
        torch.testing.assert_close(item["images"][1], full.reshape(3, 128, 2, 128, 2).mean((2, 4)))
        torch.testing.assert_close(item["images"][0], full.reshape(3, 64, 4, 64, 4).mean((2, 4)))


def test_split_is_deterministic(extracted):
    data = read_features(extracted[0])
    assert data["split"].count("test") == 5 and data["split"].count("train") == 42
    # the run in test_interrupted_run_resumes... checks that a second extraction gives the same split
    ids = [f"{i}" for i in range(40)]
    first, _ = assign_split(ids, "0.25", seed=3)
    shuffled = ids[::-1]
    second, _ = assign_split(shuffled, "0.25", seed=3)
    assert dict(zip(ids, first)) == dict(zip(shuffled, second)) and first.count("test") == 10


def test_reference_split_matches_the_bootcamp_lists():
    ids = [str(i) for i in range(30000)]
    split, rule = assign_split(ids, "auto", kind="mm-celeba-hq")
    assert split.count("train") == 24000 and "reference" in rule
    # sorted lexicographically: "9999" is in the last 6,000, "10000" in the first 24,000
    assert split[9999] == "test" and split[10000] == "train" and split[0] == "train"
    with pytest.raises(ValueError, match="reference split needs CelebA-HQ ids"):
        assign_split(["a", "b"], "reference")
    with pytest.raises(ValueError, match="--split must be"):
        assign_split(["a"], "half")


def test_interrupted_run_resumes_and_matches_a_clean_run(extracted, odd_folder, tmp_path, tiny_clip):
    clean = read_features(extracted[0])
    out = tmp_path / "resumed.pt"

    class Stop(Exception):
        pass

    def stop_after_two(done, total):
        if done >= 16:
            raise Stop

    with pytest.warns(SkippedImageWarning), pytest.raises(Stop):
        extract_features(odd_folder, out, clip=tiny_clip, captions_per_image=3, batch_size=8,
                         save_every=100, device="cpu", progress=False, on_batch=stop_after_two)
    assert not out.exists() and (partial_dir(out) / "state.pt").is_file()
    seen = []
    with pytest.warns(SkippedImageWarning):
        summary = extract_features(odd_folder, out, clip=tiny_clip, captions_per_image=3, batch_size=8,
                                   device="cpu", progress=False, on_batch=lambda done, total: seen.append(done))
    assert summary.resumed_at == 16 and seen[0] == 24  # continued where it stopped
    assert not partial_dir(out).exists()
    resumed = read_features(out)
    assert resumed["ids"] == clean["ids"] and resumed["split"] == clean["split"]
    assert resumed["captions"] == clean["captions"]
    assert np.array_equal(np.load(images_path(out)), np.load(images_path(extracted[0])))
    torch.testing.assert_close(resumed["image_features"], clean["image_features"], atol=2e-3, rtol=0)
    torch.testing.assert_close(resumed["text_features"], clean["text_features"], atol=2e-3, rtol=0)
    assert len(summary.skipped) == 3  # skips from before the interruption are remembered


def test_changed_inputs_do_not_resume_stale_work(tmp_path, tiny_clip):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(6):
        _rgb(16, 16, i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"face {i}\nanother caption")
    out = tmp_path / "f.pt"

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, out, clip=tiny_clip, captions_per_image=2, batch_size=2, progress=False, on_batch=stop)
    with pytest.warns(UserWarning, match="starting over"):
        summary = extract_features(folder, out, clip=tiny_clip, captions_per_image=1, batch_size=2, progress=False)
    assert summary.resumed_at == 0 and summary.num_images == 6 and read_features(out)["text_features"].shape[1] == 1


@pytest.mark.parametrize("name", sorted(set(odd_images()) - {f"{s}.jpg" for s in UNREADABLE} - {"garbage.png"}))
def test_every_odd_image_becomes_256_px_rgb(name):
    image = odd_images()[name]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
    pixels, enlarged = load_image(buffer.getvalue())
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8 and enlarged


def test_modes_are_converted_faithfully():
    def roundtrip(image, fmt="PNG"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return load_image(buffer.getvalue())[0]

    clear = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    assert (roundtrip(clear) == 255).all()  # fully transparent -> white, not the hidden red
    white16 = Image.fromarray(np.full((300, 300), 65535, dtype=np.uint16))
    assert (roundtrip(white16) == 255).all()  # 16-bit white stays white (not clipped garbage)
    mid16 = Image.fromarray(np.full((300, 300), 32896, dtype=np.uint16))
    assert abs(int(roundtrip(mid16)[0, 0, 0]) - 128) <= 1
    black = Image.new("CMYK", (300, 300), (0, 0, 0, 255))
    assert roundtrip(black, "JPEG").max() < 30
    grey = Image.new("L", (300, 300), 77)
    assert (roundtrip(grey) == 77).all()


def test_center_crop_of_non_square_images():
    left_right = np.zeros((100, 300, 3), dtype=np.uint8)
    left_right[:, 100:200] = 255  # only the middle third is white
    buffer = io.BytesIO()
    Image.fromarray(left_right).save(buffer, format="PNG")
    pixels, enlarged = load_image(buffer.getvalue())
    assert enlarged and pixels[:, 8:-8].min() > 240  # the crop is the white middle square


def test_missing_source_path_is_a_clear_error(tmp_path, capsys):
    from helpers.__main__ import main

    assert main(["extract", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.pt"),
                 "--clip", "tiny-random", "--quiet"]) == 2
    assert "source not found" in capsys.readouterr().err
    assert not (tmp_path / "f.pt").exists()


def test_source_with_zero_usable_images_writes_nothing(tmp_path, tiny_clip):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"nope")
    (folder / "b.png").write_bytes(b"")
    (folder / "a.txt").write_text("A face.")
    out = tmp_path / "out" / "f.pt"
    with pytest.warns(SkippedImageWarning), pytest.raises(UserError, match="no usable images.*nothing was written"):
        extract_features(folder, out, clip=tiny_clip, progress=False)
    assert not out.exists() and not images_path(out).exists() and not partial_dir(out).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found"):
        extract_features(empty, out, clip=tiny_clip, progress=False)
    assert not out.exists()


def test_attributes_are_stored_when_the_source_has_them(tmp_path, tiny_clip):
    folder = tmp_path / "attr"
    folder.mkdir()
    for i in range(4):
        _rgb(20, 20, i).save(folder / f"{i:06d}.png")
    (folder / "captions.jsonl").write_text(
        "\n".join(json.dumps({"file": f"{i:06d}.png", "captions": [f"face {i}"]}) for i in range(4)))
    (folder / "attributes.csv").write_text("file,Smiling,Eyeglasses\n" + "".join(
        f"{i:06d}.png,{i % 2},{int(i > 1)}\n" for i in range(4)))
    summary = extract_features(folder, tmp_path / "f.pt", clip=tiny_clip, split="none", progress=False)
    data = read_features(summary.out)
    assert data["attributes"]["names"] == ["Smiling", "Eyeglasses"]
    assert data["attributes"]["values"].tolist() == [[False, False], [True, False], [False, True], [True, True]]
    assert data["split"] == ["train"] * 4 and data["captions"][2] == ["face 2"]
