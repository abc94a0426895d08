"""Dataset sources: where images and their captions come from, behind one function.

``open_source(spec)`` turns what a user passes to ``extract --source`` into a
``Source``: a sorted list of ``Sample`` (id, a way to read the image bytes,
captions, optional CelebA-style attributes). Nothing here decodes images; that
is extraction's job. Accepted specs:

- a folder of images with captions: a same-stem ``.txt`` file per image (one
  caption per line, blank lines ignored), and/or ``captions.jsonl`` (lines of
  ``{"file": ..., "captions": [...]}``) or ``captions.csv`` (columns ``file`` and
  ``caption``, one row per caption) at its top; an optional ``attributes.csv``
  (``file,<names...>``, values 0/1 or -1/1) adds attributes. Images without a
  caption are kept (language-free training can use them);
- an MM-CelebA-HQ-style zip or folder: ``images/<id>.jpg`` and
  ``celeba-caption/<id>.txt`` (possibly under one top-level folder);
- a CelebAMask-HQ zip or folder: ``CelebA-HQ-img/<id>.jpg`` and
  ``CelebAMask-HQ-attribute-anno.txt``; captions come from the caption grammar
  (``helpers.captions``) applied to each image's 40 attributes;
- ``toyfaces`` or ``toyfaces:N``: N procedurally drawn faces (default 1000),
  generated once into ``data_dir``;
- ``mm-celeba-hq`` or ``celebamask-hq``: the named dataset, looked for as a local
  copy (``data_dir``, then the mounted Google Drive) before a gdown download.

Google Drive refuses large public files often (quota, permissions); a failed
download ends with a message saying where to put a hand-made copy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_DATA_DIR = Path("data")
DRIVE_DIRS = (Path("/content/drive/MyDrive"), Path("/content/drive/My Drive"))  # Colab's mounted Drive
DEFAULT_TOYFACES = 1000
ANNOTATION_FILE = "CelebAMask-HQ-attribute-anno.txt"

# Named datasets. sha256 is None where no published hash is known; the check runs where one is.
DATASETS: dict[str, dict] = {
    "celebamask-hq": dict(
        filename="CelebAMask-HQ.zip",
        drive_file_id="1badu11NqxGf6qM3PTTooQDJvQbejgbTv",
        drive_folder_id=None,
        sha256=None,
        note="CelebAMask-HQ, non-commercial research and education use only",
    ),
    "mm-celeba-hq": dict(
        filename="multimodal_celeba_hq.zip",
        drive_file_id=None,
        drive_folder_id="1HwCTiyUUiN71fATB56Ea8qfUEq-X8AG7",
        sha256=None,
        note="MM-CelebA-HQ with 10 captions per image, as shared by the bootcamp (best effort)",
    ),
}
ALIASES = {"celebamaskhq": "celebamask-hq", "mm-celebahq": "mm-celeba-hq", "mmcelebahq": "mm-celeba-hq",
           "mm-celeba": "mm-celeba-hq", "multimodal-celeba-hq": "mm-celeba-hq", "multimodal_celeba_hq": "mm-celeba-hq"}


class DownloadError(UserError):
    """A dataset could not be fetched; the message says how to place it by hand."""


@dataclass(frozen=True)
class Sample:
    """One image of a source.

    id: stable source id (``"0"`` for CelebA-HQ, the path without suffix for folders);
    name: where the image lives, for messages; read: returns the encoded image bytes;
    captions: non-blank caption lines; attributes: one bool per ``Source.attribute_names`` or None.
    """

    id: str
    name: str
    read: Callable[[], bytes] = field(repr=False, compare=False)
    captions: tuple[str, ...] = ()
    attributes: tuple[bool, ...] | None = None


@dataclass
class Source:
    """A resolved source: samples sorted by id, plus what extraction records about it.

    kind: ``"folder"``, ``"mm-celeba-hq"``, ``"celebamask-hq"`` or ``"toyfaces"``;
    location: the resolved path; notes: human-readable remarks (e.g. images without captions).
    """

    spec: str
    kind: str
    location: str
    samples: list[Sample]
    attribute_names: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- small readers


def caption_lines(text: str) -> list[str]:
    """Captions in a text file's contents: one per line, stripped, blank lines dropped."""
    return [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]


def _decode(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="replace")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _flag(value: str, *, where: str) -> bool:
    value = value.strip()
    if value in ("1", "true", "True"):
        return True
    if value in ("0", "-1", "false", "False"):
        return False
    raise ValueError(f"{where}: attribute value {value!r} is not 0/1 or -1/1")


def _id_sort_key(sample_id: str) -> tuple:
    # Numeric ids sort as numbers (CelebA-HQ's 0..29999), others as text.
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: _id_sort_key(s.id))


# ----------------------------------------------------------------------------- folder of images


def _read_jsonl(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(_decode(path.read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry["file"])
            caps = entry.get("captions", entry.get("caption", []))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {lineno}: expected {{\"file\": ..., \"captions\": [...]}} ({err})") from err
        caps = [caps] if isinstance(caps, str) else list(caps)
        out.setdefault(key, []).extend(c for text in caps for c in caption_lines(str(text)))
    return out


def _read_csv(path: Path) -> dict[str, list[str]]:
    rows = csv.DictReader(io.StringIO(_decode(path.read_bytes())))
    fields = rows.fieldnames or []
    column = "caption" if "caption" in fields else "captions" if "captions" in fields else None
    if "file" not in fields or column is None:
        raise ValueError(f"{path} needs a header with the columns 'file' and 'caption', got {fields}")
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(str(row["file"]), []).extend(caption_lines(row[column] or ""))
    return out


def _read_attributes_csv(path: Path) -> tuple[tuple[str, ...], dict[str, tuple[bool, ...]]]:
    rows = list(csv.reader(io.StringIO(_decode(path.read_bytes()))))
    if not rows or not rows[0] or rows[0][0] != "file":
        raise ValueError(f"{path} must start with the header 'file,<attribute names>'")
    names = tuple(rows[0][1:])
    values = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}, line {lineno}: expected {len(names) + 1} columns, got {len(row)}")
        values[row[0]] = tuple(_flag(v, where=f"{path}, line {lineno}") for v in row[1:])
    return names, values


def _lookup(table: dict, rel: PurePosixPath):
    """An entry keyed by the image's relative path, path without suffix, file name or stem."""
    for key in (rel.as_posix(), rel.with_suffix("").as_posix(), rel.name, rel.stem):
        if key in table:
            return table[key]
    return None


def folder_source(root: str | os.PathLike, *, spec: str | None = None, kind: str = "folder") -> Source:
    """A folder of images with same-stem .txt captions and/or captions.jsonl / captions.csv."""
    root = Path(root)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not _hidden(p.relative_to(root).parts)]
    images = [p for p in files if _is_image(p.name)]
    index: dict[str, list[str]] = {}
    for name, reader in (("captions.jsonl", _read_jsonl), ("captions.csv", _read_csv)):
        if (root / name).is_file():
            for key, caps in reader(root / name).items():
                index.setdefault(key, []).extend(caps)
    attribute_names, attribute_table = None, {}
    if (root / "attributes.csv").is_file():
        attribute_names, attribute_table = _read_attributes_csv(root / "attributes.csv")

    stems = [p.relative_to(root).with_suffix("").as_posix() for p in images]
    duplicated = {stem for stem, count in Counter(stems).items() if count > 1}  # a.png + a.jpg keep suffixes
    samples, no_caption, no_attributes = [], 0, 0
    for path, stem in zip(images, stems):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        captions = list(_lookup(index, rel) or [])
        txt = path.with_suffix(".txt")
        if txt.is_file():
            captions += [c for c in caption_lines(_decode(txt.read_bytes())) if c not in captions]
        attributes = _lookup(attribute_table, rel) if attribute_names else None
        no_caption += not captions
        no_attributes += attribute_names is not None and attributes is None
        samples.append(
            Sample(
                id=rel.as_posix() if stem in duplicated else stem,
                name=str(path),
                read=path.read_bytes,
                captions=tuple(captions),
                attributes=attributes,
            )
        )
    source = Source(spec or str(root), kind, str(root), _sorted(samples), attribute_names)
    if no_caption:
        source.notes.append(f"{no_caption} of {len(samples)} images have no caption (kept for language-free training)")
    if no_attributes:
        source.notes.append(f"{no_attributes} images are missing from attributes.csv; attributes are not stored")
        source.attribute_names = None
        source.samples = [Sample(s.id, s.name, s.read, s.captions, None) for s in source.samples]
    return source


# ----------------------------------------------------------------------------- zips and CelebA layouts


class _Tree:
    """A folder or an opened zip behind one small interface (relative posix names)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile as err:
                raise ValueError(f"{path} is not a folder or a readable zip file ({err})") from err
            self.names = [n for n in self.zip.namelist() if not n.endswith("/") and not _hidden(n.split("/"))]
        else:
            self.names = [
                p.relative_to(path).as_posix()
                for p in sorted(path.rglob("*"))
                if p.is_file() and not _hidden(p.relative_to(path).parts)
            ]
        self.name_set = set(self.names)

    def reader(self, name: str) -> Callable[[], bytes]:
        if self.zip is not None:
            zf = self.zip
            return lambda: zf.read(name)
        return (self.path / name).read_bytes

    def read_text(self, name: str) -> str:
        return _decode(self.reader(name)())

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.zip is not None else str(self.path / name)

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


_MM_IMAGE = re.compile(r"^(?P<prefix>(?:.*/)?)images/(?P<id>[^/]+)\.(?:jpe?g|png)$", re.IGNORECASE)
_HQ_IMAGE = re.compile(r"^(?P<prefix>(?:.*/)?)CelebA-HQ-img/(?P<id>[^/]+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _find(tree: _Tree, pattern: re.Pattern) -> dict[str, tuple[str, str]]:
    """id -> (member name, prefix) for the members matching ``pattern`` under the shallowest prefix."""
    found: dict[str, dict[str, str]] = {}
    for name in tree.names:
        if m := pattern.match(name):
            found.setdefault(m["prefix"], {})[m["id"]] = name
    if not found:
        return {}
    prefix = min(found, key=lambda p: (p.count("/"), p))
    return {i: (n, prefix) for i, n in found[prefix].items()}


def parse_attribute_annotation(text: str, *, where: str = ANNOTATION_FILE) -> tuple[tuple[str, ...], dict[str, tuple[bool, ...]]]:
    """CelebA's attribute file: a count line, a line of names, then ``FILE v1 v2 ...`` with -1/1 values.

    Returns (names, {image id (file name without suffix): bools}).
    """
    lines = [(lineno, line.split()) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{where} is too short to be a CelebA attribute file")
    start = 1 if len(lines[0][1]) == 1 and lines[0][1][0].isdigit() else 0
    names = tuple(lines[start][1])
    table = {}
    for lineno, parts in lines[start + 1 :]:
        if len(parts) != len(names) + 1:
            raise ValueError(f"{where}, line {lineno}: expected a file name and {len(names)} values, got {len(parts)} fields")
        table[PurePosixPath(parts[0]).stem] = tuple(_flag(v, where=f"{where}, line {lineno}") for v in parts[1:])
    return names, table


def _annotation(tree: _Tree, prefix: str) -> tuple[tuple[str, ...], dict[str, tuple[bool, ...]]] | None:
    candidates = [n for n in tree.names if PurePosixPath(n).name == ANNOTATION_FILE]
    if not candidates:
        return None
    best = min(candidates, key=lambda n: (not n.startswith(prefix), n.count("/")))
    return parse_attribute_annotation(tree.read_text(best), where=tree.where(best))


def grammar_captions(names: tuple[str, ...], values: tuple[bool, ...], *, sample_id: str, n: int, seed: int) -> list[str]:
    """Captions for one image's attributes from the caption grammar, seeded by the image id."""
    from .captions import captions_for_attributes

    image_seed = (zlib.crc32(sample_id.encode()) + 1_000_003 * seed) % 2**31
    return captions_for_attributes(dict(zip(names, values)), n=n, seed=image_seed)


def mm_celeba_source(tree: _Tree, *, spec: str) -> Source:
    """MM-CelebA-HQ layout: images/<id>.jpg with celeba-caption/<id>.txt beside images/."""
    found = _find(tree, _MM_IMAGE)
    annotation = _annotation(tree, next(iter(found.values()))[1]) if found else None
    samples, no_caption = [], 0
    for sample_id, (name, prefix) in found.items():
        caption_file = f"{prefix}celeba-caption/{sample_id}.txt"
        captions = caption_lines(tree.read_text(caption_file)) if caption_file in tree.name_set else []
        no_caption += not captions
        attributes = annotation[1].get(sample_id) if annotation else None
        samples.append(Sample(sample_id, tree.where(name), tree.reader(name), tuple(captions), attributes))
    source = Source(spec, "mm-celeba-hq", str(tree.path), _sorted(samples), _closers=[tree.close])
    if annotation and all(s.attributes is not None for s in samples):
        source.attribute_names = annotation[0]
    else:
        source.samples = [Sample(s.id, s.name, s.read, s.captions, None) for s in source.samples]
    if no_caption:
        source.notes.append(f"{no_caption} of {len(samples)} images have no caption file in celeba-caption/")
    return source


def celebamask_source(tree: _Tree, *, spec: str, captions_per_image: int = 10, seed: int = 0) -> Source:
    """CelebAMask-HQ layout: CelebA-HQ-img/<id>.jpg captioned by the grammar from the attribute file."""
    found = _find(tree, _HQ_IMAGE)
    annotation = _annotation(tree, next(iter(found.values()))[1]) if found else None
    if annotation is None:
        raise ValueError(f"{tree.path} has CelebA-HQ-img/ but no {ANNOTATION_FILE}: the captions are made from it")
    names, table = annotation
    samples, missing = [], 0
    for sample_id, (name, _) in found.items():
        values = table.get(sample_id)
        missing += values is None
        captions = grammar_captions(names, values, sample_id=sample_id, n=captions_per_image, seed=seed) if values else []
        samples.append(Sample(sample_id, tree.where(name), tree.reader(name), tuple(captions), values))
    source = Source(spec, "celebamask-hq", str(tree.path), _sorted(samples), names, _closers=[tree.close])
    if missing:
        source.notes.append(f"{missing} images have no line in {ANNOTATION_FILE}: no captions, attributes not stored")
        source.attribute_names = None
        source.samples = [Sample(s.id, s.name, s.read, s.captions, None) for s in source.samples]
    return source


def path_source(path: str | os.PathLike, *, spec: str | None = None, captions_per_image: int = 10, seed: int = 0) -> Source:
    """The source at a local path: detects the MM-CelebA-HQ and CelebAMask-HQ layouts, else a plain folder."""
    path = Path(path).expanduser()
    spec = spec or str(path)
    if not path.exists():
        hint = ""
        if str(path).startswith("/content/drive"):
            hint = " (is Google Drive mounted? run `from google.colab import drive; drive.mount('/content/drive')`)"
        raise FileNotFoundError(
            f"source not found: {path}{hint}. Pass a folder of captioned images, an MM-CelebA-HQ or "
            f"CelebAMask-HQ zip or folder, 'toyfaces', 'mm-celeba-hq' or 'celebamask-hq'"
        )
    tree = _Tree(path)
    try:
        if any(_MM_IMAGE.match(n) for n in tree.names) and any("celeba-caption/" in n for n in tree.names):
            return mm_celeba_source(tree, spec=spec)
        if any(_HQ_IMAGE.match(n) for n in tree.names):
            return celebamask_source(tree, spec=spec, captions_per_image=captions_per_image, seed=seed)
    except BaseException:
        tree.close()
        raise
    tree.close()
    if path.is_file():
        raise ValueError(
            f"{path}: a zip source must hold images/ + celeba-caption/ (MM-CelebA-HQ) or CelebA-HQ-img/ + "
            f"{ANNOTATION_FILE} (CelebAMask-HQ); unzip other image sets into a folder"
        )
    return folder_source(path, spec=spec)


# ----------------------------------------------------------------------------- named datasets, downloads


def sha256_of(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _by_hand(name: str, info: dict, data_dir: Path) -> str:
    where = (
        f"https://drive.google.com/file/d/{info['drive_file_id']}"
        if info.get("drive_file_id")
        else f"https://drive.google.com/drive/folders/{info['drive_folder_id']}"
    )
    return (
        f"Google Drive often refuses large shared files (download quota exceeded, or permission denied). "
        f"Open {where} in a browser, add {info['filename']} to your own Google Drive (or download it), then "
        f"either pass its path, e.g. --source /content/drive/MyDrive/{info['filename']} after mounting Drive, "
        f"or put it at {data_dir / info['filename']} and run again with --source {name}."
    )


def _verify(path: Path, info: dict) -> None:
    expected = info.get("sha256")
    if expected and (actual := sha256_of(path)) != expected:
        raise DownloadError(
            f"{path} has sha256 {actual}, expected {expected}: the file is damaged or a different version; "
            f"delete it and download it again"
        )


def local_copy(name: str, *, data_dir: Path, drive_dirs: Iterable[Path] | None = None) -> Path | None:
    """A user's copy of a named dataset: in ``data_dir``, then in the mounted Google Drive (zip or folder)."""
    info = DATASETS[name]
    stem = Path(info["filename"]).stem
    for folder in (data_dir, *(DRIVE_DIRS if drive_dirs is None else drive_dirs)):
        for candidate in (folder / info["filename"], folder / stem):
            if candidate.exists():
                return candidate
    return None


def download_dataset(name: str, *, data_dir: Path) -> Path:
    """Fetch a named dataset with gdown into ``data_dir``; DownloadError tells the user what to do instead.

    Uses only gdown calls present in both 5.x and 6.x: ``download(id=, output=, quiet=)`` and
    ``download_folder(id=, output=, quiet=)``.
    """
    import gdown

    info = DATASETS[name]
    target = data_dir / info["filename"]
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if info.get("drive_file_id"):
            partial = target.with_name(target.name + ".part")
            result = gdown.download(id=info["drive_file_id"], output=str(partial), quiet=False)
            if not result or not partial.is_file() or partial.stat().st_size == 0:
                raise RuntimeError("gdown returned no file")
            _verify(partial, info)
            os.replace(partial, target)
        else:
            folder = data_dir / f"{Path(info['filename']).stem}-drive-folder"
            files = gdown.download_folder(id=info["drive_folder_id"], output=str(folder), quiet=False) or []
            matches = [Path(f) for f in files if Path(f).name == info["filename"]]
            if not matches:
                raise RuntimeError(f"the shared folder did not contain {info['filename']}")
            _verify(matches[0], info)
            os.replace(matches[0], target)
    except DownloadError:
        raise
    except Exception as err:  # gdown raises several types across versions (FileURLRetrievalError, ...)
        raise DownloadError(f"could not download {info['filename']} ({type(err).__name__}: {err}). "
                            + _by_hand(name, info, data_dir)) from err
    return target


def named_dataset(name: str, *, data_dir: Path, download: bool = True) -> Path:
    """The local path of a named dataset: a user's copy first, then a download (sha256-checked when known)."""
    found = local_copy(name, data_dir=data_dir)
    if found is not None:
        if found.is_file():
            _verify(found, DATASETS[name])
        return found
    if not download:
        raise DownloadError(f"{DATASETS[name]['filename']} is not in {data_dir} or Google Drive. "
                            + _by_hand(name, DATASETS[name], data_dir))
    return download_dataset(name, data_dir=data_dir)


def toyfaces_source(n: int, *, data_dir: Path, seed: int = 0, spec: str | None = None) -> Source:
    """``n`` toy faces, drawn once into ``data_dir/toyfaces-N-seedS`` and then read as a folder."""
    from .toyfaces import write_toyfaces

    if n < 1:
        raise ValueError(f"toyfaces needs at least one image, got {n}")
    folder = data_dir / f"toyfaces-{n}-seed{seed}"
    if not (folder / "attributes.csv").is_file():
        folder = Path(write_toyfaces(folder, n=n, seed=seed))
    source = folder_source(folder, spec=spec or f"toyfaces:{n}", kind="toyfaces")
    return source


def open_source(
    spec: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    captions_per_image: int = 10,
    seed: int = 0,
    download: bool = True,
) -> Source:
    """Resolve a source spec (see the module docstring) into a ``Source``; close it when done.

    data_dir: where named datasets and generated toy faces are kept (default ``./data``);
    captions_per_image: captions the grammar writes per image (CelebAMask-HQ);
    seed: seeds generated captions and toy faces.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    text = str(spec).strip()
    if not text:
        raise ValueError("the source is empty: pass a folder, a zip, 'toyfaces', 'mm-celeba-hq' or 'celebamask-hq'")
    key = ALIASES.get(text.lower(), text.lower())
    if key == "toyfaces" or key.startswith("toyfaces:"):
        count = key.partition(":")[2]
        if count and not count.isdigit():
            raise ValueError(f"write toyfaces:N with a whole number N, got {text!r}")
        return toyfaces_source(int(count or DEFAULT_TOYFACES), data_dir=data_dir, seed=seed, spec=text)
    if key in DATASETS and not Path(text).exists():
        path = named_dataset(key, data_dir=data_dir, download=download)
        return path_source(path, spec=key, captions_per_image=captions_per_image, seed=seed)
    return path_source(text, captions_per_image=captions_per_image, seed=seed)
