"""Dataset sources: folder layouts, MM-CelebA-HQ and CelebAMask-HQ layouts, toy faces, downloads (mocked)."""

import io
import json
import zipfile

import pytest
from PIL import Image

from helpers import sources
from helpers.sources import DownloadError, open_source, parse_attribute_annotation


def _png(size=(8, 8), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root, files: dict[str, bytes | str]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return root


def _zip(path, files: dict[str, bytes | str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_folder_with_same_stem_txt_files(tmp_path):
    _write(tmp_path, {
        "b.png": _png(), "b.txt": "\ufeffFirst caption.\n\n  \nSecond caption.  \n",
        "a.jpg": _png(), "sub/c.png": _png(),
        "sub/c.txt": "Ein Lächeln, 笑顔.",
        ".ipynb_checkpoints/x.png": _png(), "notes.md": "not an image",
    })
    with open_source(tmp_path) as src:
        assert src.kind == "folder" and [s.id for s in src.samples] == ["a", "b", "sub/c"]
        by_id = {s.id: s for s in src.samples}
        assert by_id["b"].captions == ("First caption.", "Second caption.")  # blank lines dropped, BOM stripped
        assert by_id["a"].captions == () and by_id["sub/c"].captions == ("Ein Lächeln, 笑顔.",)
        assert by_id["b"].read() == _png() and src.attribute_names is None
        assert any("1 of 3 images have no caption" in note for note in src.notes)


def test_folder_with_captions_jsonl_csv_and_attributes(tmp_path):
    _write(tmp_path, {
        "0.png": _png(), "1.png": _png(), "2.png": _png(),
        "captions.jsonl": "\n".join([
            json.dumps({"file": "0.png", "captions": ["zero a", "", "zero b"]}),
            "",
            json.dumps({"file": "1", "caption": "one"}),
        ]),
        "captions.csv": "file,caption\n2.png,two\n2.png,\"two, again\"\n",
        "attributes.csv": "file,Smiling,Male\n0.png,1,0\n1.png,0,1\n2.png,-1,1\n",
    })
    with open_source(tmp_path) as src:
        assert [s.captions for s in src.samples] == [("zero a", "zero b"), ("one",), ("two", "two, again")]
        assert src.attribute_names == ("Smiling", "Male")
        assert [s.attributes for s in src.samples] == [(True, False), (False, True), (False, True)]


def test_bad_caption_index_files_name_the_problem(tmp_path):
    _write(tmp_path, {"0.png": _png(), "captions.jsonl": '{"file": "0.png", "captions": ["ok"]}\n{broken\n'})
    with pytest.raises(ValueError, match="captions.jsonl, line 2"):
        open_source(tmp_path)
    (tmp_path / "captions.jsonl").unlink()
    _write(tmp_path, {"captions.csv": "name,text\n0.png,hello\n"})
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        open_source(tmp_path)


def test_images_missing_from_attributes_csv_drop_the_attributes(tmp_path):
    _write(tmp_path, {"0.png": _png(), "1.png": _png(), "attributes.csv": "file,Smiling\n0.png,1\n"})
    with open_source(tmp_path) as src:
        assert src.attribute_names is None and all(s.attributes is None for s in src.samples)
        assert any("missing from attributes.csv" in note for note in src.notes)


MM_FILES = {
    "multimodal_celeba_hq/images/10.jpg": _png(),
    "multimodal_celeba_hq/images/2.jpg": _png(),
    "multimodal_celeba_hq/images/1.jpg": _png(),
    "multimodal_celeba_hq/celeba-caption/10.txt": "She is smiling.\n\nShe has blond hair.\n",
    "multimodal_celeba_hq/celeba-caption/2.txt": "He has a beard.",
    "multimodal_celeba_hq/celeba-caption/1.txt": "The woman wears lipstick.",
    "__MACOSX/multimodal_celeba_hq/images/._1.jpg": b"junk",
}


@pytest.mark.parametrize("as_zip", [True, False])
def test_mm_celeba_hq_layout(tmp_path, as_zip):
    path = _zip(tmp_path / "mm.zip", MM_FILES) if as_zip else _write(tmp_path / "mm", MM_FILES)
    with open_source(path) as src:
        assert src.kind == "mm-celeba-hq"
        assert [s.id for s in src.samples] == ["1", "2", "10"]  # numeric order
        assert src.samples[2].captions == ("She is smiling.", "She has blond hair.")
        assert src.samples[0].read() == _png()


def _annotation(ids, names=("Smiling", "Male", "Blond_Hair")) -> str:
    rows = [f"{i}.jpg " + " ".join("1" if (int(i) + k) % 2 else "-1" for k in range(len(names))) for i in ids]
    return "\n".join([str(len(ids)), " ".join(names), *rows]) + "\n"


@pytest.mark.parametrize("as_zip", [True, False])
def test_celebamask_hq_is_captioned_by_the_grammar(tmp_path, as_zip):
    pytest.importorskip("helpers.captions")
    files = {f"CelebAMask-HQ/CelebA-HQ-img/{i}.jpg": _png() for i in range(3)}
    files["CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt"] = _annotation(["0", "1", "2"])
    path = _zip(tmp_path / "CelebAMask-HQ.zip", files) if as_zip else _write(tmp_path / "hq", files)
    with open_source(path, captions_per_image=4, seed=1) as src:
        assert src.kind == "celebamask-hq" and src.attribute_names == ("Smiling", "Male", "Blond_Hair")
        assert [s.attributes for s in src.samples] == [(False, True, False), (True, False, True), (False, True, False)]
        assert all(len(s.captions) == 4 and all(c.strip() for c in s.captions) for s in src.samples)
        first = [s.captions for s in src.samples]
    with open_source(path, captions_per_image=4, seed=1) as again:
        assert [s.captions for s in again.samples] == first  # seeded


def test_attribute_annotation_errors():
    names, table = parse_attribute_annotation(_annotation(["0", "7"]))
    assert names == ("Smiling", "Male", "Blond_Hair") and table["7"] == (True, False, True)
    with pytest.raises(ValueError, match="line 4"):
        parse_attribute_annotation("2\nSmiling Male\n0.jpg 1 -1\n1.jpg 1\n")
    with pytest.raises(ValueError, match="not 0/1 or -1/1"):
        parse_attribute_annotation("1\nSmiling\n0.jpg 5\n")


def test_missing_and_unrecognised_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found"):
        open_source(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Google Drive mounted"):
        open_source("/content/drive/MyDrive/nothing-here.zip")
    with pytest.raises(ValueError, match="a zip source must hold"):
        open_source(_zip(tmp_path / "other.zip", {"pics/a.png": _png()}))
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match="not a folder or a readable zip"):
        open_source(tmp_path / "broken.zip")
    with pytest.raises(ValueError, match="source is empty"):
        open_source("  ")


def test_toyfaces_source_generates_once(tmp_path):
    pytest.importorskip("helpers.toyfaces")
    with open_source("toyfaces:3", data_dir=tmp_path) as src:
        assert src.kind == "toyfaces" and len(src) == 3 and src.attribute_names
        assert all(s.captions and s.attributes is not None for s in src.samples)
        folder = src.location
    stamp = (tmp_path / "toyfaces-3-seed0" / "attributes.csv").stat().st_mtime_ns
    with open_source("toyfaces:3", data_dir=tmp_path) as again:
        assert again.location == folder
    assert (tmp_path / "toyfaces-3-seed0" / "attributes.csv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="whole number"):
        open_source("toyfaces:many", data_dir=tmp_path)


# ----------------------------------------------------------------------------- named datasets (gdown mocked)


@pytest.fixture
def no_network(monkeypatch):
    """gdown calls fail the test unless a test replaces them; Drive is not mounted."""
    import gdown

    def refuse(*args, **kwargs):
        raise AssertionError("gdown must not be called here")

    monkeypatch.setattr(gdown, "download", refuse)
    monkeypatch.setattr(gdown, "download_folder", refuse)
    monkeypatch.setattr(sources, "DRIVE_DIRS", ())
    return gdown


def test_a_local_copy_is_used_before_any_download(tmp_path, no_network, monkeypatch):
    _zip(tmp_path / "multimodal_celeba_hq.zip", MM_FILES)
    with open_source("mm-celeba-hq", data_dir=tmp_path) as src:
        assert src.kind == "mm-celeba-hq" and len(src) == 3
    drive = tmp_path / "drive"
    _zip(drive.mkdir() or drive / "multimodal_celeba_hq.zip", MM_FILES)
    monkeypatch.setattr(sources, "DRIVE_DIRS", (drive,))
    with open_source("MM-CelebA-HQ", data_dir=tmp_path / "empty") as src:
        assert src.location == str(drive / "multimodal_celeba_hq.zip")


def test_download_uses_gdown_calls_of_5x_and_6x_and_checks_sha256(tmp_path, no_network, monkeypatch):
    payload = io.BytesIO()
    files = {f"CelebAMask-HQ/CelebA-HQ-img/{i}.jpg": _png() for i in range(2)}
    files["CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt"] = _annotation(["0", "1"])
    _zip(payload, files)
    calls = []

    def fake_download(*, id, output, quiet):  # keyword-only: exactly the arguments both versions accept
        calls.append(id)
        with open(output, "wb") as f:
            f.write(payload.getvalue())
        return output

    monkeypatch.setattr(no_network, "download", fake_download)
    info = dict(sources.DATASETS["celebamask-hq"], sha256=sources.hashlib.sha256(payload.getvalue()).hexdigest())
    monkeypatch.setitem(sources.DATASETS, "celebamask-hq", info)
    with open_source("celebamask-hq", data_dir=tmp_path / "data") as src:
        assert len(src) == 2 and calls == ["1badu11NqxGf6qM3PTTooQDJvQbejgbTv"]
    assert (tmp_path / "data" / "CelebAMask-HQ.zip").is_file()

    monkeypatch.setitem(sources.DATASETS, "celebamask-hq", dict(info, sha256="0" * 64))
    with pytest.raises(DownloadError, match="sha256"):
        open_source("celebamask-hq", data_dir=tmp_path / "data")  # the local copy is checked too
    with pytest.raises(DownloadError, match="sha256"):
        open_source("celebamask-hq", data_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "CelebAMask-HQ.zip").exists()


def test_quota_and_permission_errors_say_how_to_place_the_file(tmp_path, no_network, monkeypatch):
    def quota(**kwargs):
        raise RuntimeError("Too many users have viewed or downloaded this file recently")

    monkeypatch.setattr(no_network, "download", quota)
    monkeypatch.setattr(no_network, "download_folder", quota)
    with pytest.raises(DownloadError, match="quota") as err:
        open_source("celebamask-hq", data_dir=tmp_path)
    message = str(err.value)
    assert "Too many users" in message and "/content/drive/MyDrive/CelebAMask-HQ.zip" in message
    assert str(tmp_path / "CelebAMask-HQ.zip") in message
    with pytest.raises(DownloadError, match="drive/folders/1HwCTiyUUiN71fATB56Ea8qfUEq-X8AG7"):
        open_source("mm-celeba-hq", data_dir=tmp_path)
    monkeypatch.setattr(no_network, "download", lambda **kwargs: None)  # gdown 4.x-style silent failure
    with pytest.raises(DownloadError, match="returned no file"):
        open_source("celebamask-hq", data_dir=tmp_path)


def test_shared_folder_download_for_mm_celeba_hq(tmp_path, no_network, monkeypatch):
    def fake_folder(*, id, output, quiet):
        from pathlib import Path

        Path(output).mkdir(parents=True)
        target = Path(output) / "multimodal_celeba_hq.zip"
        _zip(target, MM_FILES)
        return [str(target)]

    monkeypatch.setattr(no_network, "download_folder", fake_folder)
    with open_source("mm-celeba-hq", data_dir=tmp_path) as src:
        assert src.kind == "mm-celeba-hq" and len(src) == 3
    assert (tmp_path / "multimodal_celeba_hq.zip").is_file()
