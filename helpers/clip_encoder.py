"""CLIP encoders behind one small interface, built on open_clip.

``load_clip(spec)`` returns a ``ClipEncoder`` whose features are fp32 and
L2-normalised, the form the generator is conditioned on:

- ``"ViT-B-32"`` (default): OpenAI's original weights through open_clip
  (``pretrained="openai"``, downloaded once by open_clip on first use);
- ``"MODEL/PRETRAINED"``: any open_clip pair, e.g. ``"ViT-B-16/openai"``;
  PRETRAINED may also be a local checkpoint file, e.g. ``"ViT-B-32//content/drive/MyDrive/vit.pt"``;
- a path to a local weights file: either a file written by ``save_clip`` (an
  open_clip CLIP with its configuration) or an OpenAI CLIP checkpoint (the
  TorchScript ``ViT-B-32.pt`` of OpenAI's ``clip`` package, or its state dict);
- ``"demo"``: the small CLIP trained on toy faces, ``assets/demo_clip.pt``
  (rebuilt by ``python -m helpers build-demo``);
- ``"tiny-random"``: a small random CLIP built from open_clip classes, seeded,
  offline; for tests;
- ``"openai-clip:NAME"`` (e.g. ``"openai-clip:ViT-B/32"``): OpenAI's own git
  ``clip`` package, only when it is importable (open_clip gives the same weights).

Long prompts: CLIP reads at most 77 tokens (start and end tokens included).
A longer prompt is truncated to its first 75 tokens and a ``LongPromptWarning``
names it; nothing is split or averaged, so a feature always comes from one
CLIP pass over the beginning of the text.

OpenAI's weights run with the activation they were trained with, QuickGELU: open_clip
2.29 and later no longer switch to it for ``pretrained="openai"`` on their own, so
every model built from a pretrained tag takes the activation the tag asks for.
``ClipEncoder.identity`` (spec, activation, open_clip version) is recorded with the
features file and the checkpoints; ``check_same_clip`` refuses a CLIP that differs.

The weights are frozen and the model stays in eval mode; ``embed_generated``
is differentiable with respect to its input images (for the CLIP loss).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assets import DEMO_CLIP
from .devices import resolve_device
from .errors import UserError

CONTEXT_LENGTH = 77  # CLIP's text window in tokens, start and end tokens included
CLIP_FORMAT = "helpers-clip/1"  # the self-describing weights file written by save_clip
DEMO_CLIP_PATH = DEMO_CLIP  # the shipped demo CLIP (assets/demo_clip.pt)
OPENAI_CLIP_PREFIX = "openai-clip:"


class LongPromptWarning(UserWarning):
    """A prompt was longer than CLIP's 77-token window and was truncated."""

# OpenAI CLIP's pixel normalisation (open_clip.constants.OPENAI_DATASET_MEAN / STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_RANDOM = dict(
    embed_dim=32,
    vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
    text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2),
)


class ClipEncoder(nn.Module):
    """A frozen open_clip model with the three entry points this project uses.

    encode_text(list[str]) -> [N, dim] fp32, L2-normalised
    encode_images(images [B, 3, H, W] in [0, 1]) -> [B, dim] fp32, L2-normalised
    embed_generated(images [B, 3, H, W] in [-1, 1]) -> [B, dim], differentiable
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        spec: str,
        *,
        image_size: int,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_size = image_size
        # Tokens of a text, start and end included; None when the tokenizer cannot tell.
        self._count_tokens = count_tokens or _token_counter(tokenizer)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"])).shape[-1])
        self.activation = activation_of(self.model)

    @property
    def identity(self) -> dict[str, str]:
        """What identifies the network: ``dict(spec=, activation="quick_gelu" | "gelu" | ..., open_clip=version,
        weights=a fingerprint of the weights)``: the same spec may name other weights (a rebuilt demo CLIP)."""
        return dict(spec=self.spec, activation=self.activation, open_clip=_open_clip_version(),
                    weights=weights_fingerprint(self.model))

    def train(self, mode: bool = True) -> "ClipEncoder":
        # CLIP stays in eval mode whatever the caller does: it is a frozen feature extractor.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def token_count(self, text: str) -> int:
        """How many tokens CLIP would read for ``text``, start and end tokens included."""
        return self._count_tokens(text)

    def too_long(self, texts: list[str]) -> list[int]:
        """Indices of the texts longer than CLIP's 77-token window (they will be truncated)."""
        return [i for i, text in enumerate(texts) if self.token_count(text) > CONTEXT_LENGTH]

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [N, 77]; empty prompts are an error, long ones are truncated with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt {i} is empty: write a sentence describing the face")
        for i in self.too_long(texts):
            preview = texts[i] if len(texts[i]) <= 60 else texts[i][:57] + "..."
            warnings.warn(
                f"prompt {i} ({preview!r}) has {self.token_count(texts[i])} tokens; CLIP reads "
                f"{CONTEXT_LENGTH}, so it was truncated to its beginning",
                LongPromptWarning,
                stacklevel=2,
            )
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """list of N prompts -> [N, dim] fp32, L2-normalised."""
        tokens = self.tokenize(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _pixels(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP input [B, 3, S, S], normalised."""
        images = images.to(self.device, torch.float32)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            )
        return (images - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] (or uint8 0..255) -> [B, dim] fp32, L2-normalised."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return F.normalize(self.model.encode_image(self._pixels(images)).float(), dim=-1)

    def embed_generated(self, images: Tensor) -> Tensor:
        """Generated images [B, 3, H, W] in [-1, 1] -> [B, dim] fp32, L2-normalised.

        Differentiable with respect to ``images`` (CLIP's own weights stay frozen).
        """
        features = self.model.encode_image(self._pixels((images + 1) / 2))
        return F.normalize(features.float(), dim=-1)


def activation_of(model: nn.Module) -> str:
    """The MLP activation of a CLIP: ``"quick_gelu"`` (OpenAI's), ``"gelu"``, or another class name, lowercased."""
    names = {type(m).__name__ for m in model.modules()}
    if "QuickGELU" in names:
        return "quick_gelu"
    if "GELU" in names:
        return "gelu"
    for name in ("SiLU", "ReLU"):
        if name in names:
            return name.lower()
    return "unknown"


def _open_clip_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("open_clip_torch")  # open_clip < 2.26 has no __version__
    except metadata.PackageNotFoundError:
        return "not installed"


def weights_fingerprint(model: nn.Module, *, sample: int = 4096) -> str:
    """A short hash of a model's weights: the first ``sample`` values of every parameter (fp32, CPU).

    Cheap for ViT-B/32 (a few hundred small slices) and different for any two trainings."""
    import hashlib

    digest = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:sample].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_clip(recorded: dict[str, Any] | None, clip: "ClipEncoder", *, what: str) -> None:
    """Refuse ``clip`` when its network differs from the one ``what`` (a file) was made with.

    ``recorded`` is the ``identity`` stored with the file (None: an older file that
    did not record it, accepted; with a QuickGELU CLIP, with a warning). The spec and the activation must match,
    and the weights' fingerprint where the file recorded one; the open_clip version is named in the message but
    may differ (Colab upgrades it).
    """
    mine = clip.identity
    if not recorded:
        if mine["activation"] == "quick_gelu":
            warnings.warn(
                f"{what} does not record which activation its CLIP ran with; one made with open_clip 2.29 or "
                "later before this check may have run OpenAI's weights with GELU: if results look wrong, extract again",
                stacklevel=2,
            )
        return
    differs = [k for k in ("spec", "activation") if recorded.get(k) and recorded.get(k) != mine[k]]
    if not differs and recorded.get("weights") and recorded["weights"] != mine["weights"]:
        raise UserError(
            f"{what} was made with CLIP {recorded.get('spec')!r} with other weights than the one loaded now "
            f"(fingerprint {recorded['weights']} against {mine['weights']}; the demo CLIP is rebuilt with the demo): "
            "its features do not fit this CLIP; extract them again with it"
        )
    if differs:
        def show(d: dict[str, Any]) -> str:
            return f"{d.get('spec')!r} with {d.get('activation')} (open_clip {d.get('open_clip')})"

        raise UserError(
            f"{what} was made with CLIP {show(recorded)}, but the CLIP loaded now is {show(mine)}: "
            "they differ in " + " and ".join(differs) + ", so its features do not fit; use the same CLIP or extract again"
        )


def _token_counter(tokenizer) -> Callable[[str], int]:
    """Token count of a text for open_clip's BPE tokenizer (start and end included)."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        return lambda text: len(encode(text)) + 2
    # Other tokenizers: a text that fills the whole window may have been cut.
    return lambda text: CONTEXT_LENGTH + 1 if int(tokenizer([text])[0, -1]) != 0 else CONTEXT_LENGTH


def build_clip_model(model_cfg: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """An open_clip ``CLIP`` from ``dict(embed_dim=, vision_cfg=dict(...), text_cfg=dict(...))``.

    With ``seed`` the random initialisation is reproducible and the global RNG is left untouched.
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    def build() -> nn.Module:
        return open_clip.CLIP(
            embed_dim=int(model_cfg["embed_dim"]),
            vision_cfg=CLIPVisionCfg(**model_cfg["vision_cfg"]),
            text_cfg=CLIPTextCfg(**model_cfg["text_cfg"]),
        )

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _tiny_random(seed: int = 0) -> tuple[nn.Module, int]:
    return build_clip_model(TINY_RANDOM, seed=seed), TINY_RANDOM["vision_cfg"]["image_size"]


def save_clip(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_cfg: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write an open_clip CLIP and its configuration so that ``load_clip(path)`` rebuilds it.

    ``model_cfg`` is what ``build_clip_model`` takes; the tokenizer is always ViT-B/32's BPE.
    The file is written atomically (``assets/demo_clip.pt`` is one such file).
    """
    from .files import atomic_save

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save(dict(format=CLIP_FORMAT, model_cfg=model_cfg, state_dict=state, meta=dict(meta or {})), path)


def _image_size(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", None) or getattr(model.visual, "input_resolution", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _load_weights_file(path: Path) -> nn.Module:
    """A CLIP from a ``save_clip`` file or an OpenAI checkpoint (TorchScript or state dict)."""
    import open_clip

    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except RuntimeError:
        data = None  # a TorchScript archive: OpenAI's own ViT-B-32.pt
    except Exception as err:
        raise ValueError(f"cannot read CLIP weights file {path}: {err}") from err
    if isinstance(data, dict) and data.get("format") == CLIP_FORMAT:
        model = build_clip_model(data["model_cfg"])
        model.load_state_dict(data["state_dict"])
        return model
    try:
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    except Exception as err:
        raise ValueError(
            f"{path} is neither a CLIP file written by helpers.clip_encoder.save_clip nor an OpenAI CLIP "
            f"checkpoint ({err}); for other open_clip weights use the spec 'MODEL/{path}'"
        ) from err


def _load_openai_clip(name: str) -> ClipEncoder:
    """OpenAI's git ``clip`` package as a backend (optional; never required)."""
    try:
        import clip  # OpenAI's package: pip install git+https://github.com/openai/CLIP.git
    except ImportError as err:
        raise ValueError(
            f"spec {OPENAI_CLIP_PREFIX}{name} needs OpenAI's git `clip` package, which is not installed; "
            f"use the spec 'ViT-B-32' (the same weights through open_clip) instead"
        ) from err
    model, _ = clip.load(name, device="cpu", jit=False)
    model = model.float()

    def tokenizer(texts: list[str]) -> Tensor:
        return clip.tokenize(texts, truncate=True)

    inner = getattr(clip, "_tokenizer", None)
    counter = (lambda text: len(inner.encode(text)) + 2) if inner is not None else None
    return ClipEncoder(model, tokenizer, OPENAI_CLIP_PREFIX + name, image_size=_image_size(model), count_tokens=counter)


SPECIAL_SPECS = ("demo", "tiny-random")


def needs_quick_gelu(name: str, pretrained: str) -> bool:
    """Whether open_clip model ``name`` with weights ``pretrained`` must be built with QuickGELU.

    OpenAI's weights (tag ``openai``) and every tag whose pretrained config says
    ``quick_gelu`` were trained with it. open_clip < 2.29 switched to it by itself
    for ``openai``; later versions build ``nn.GELU`` and only warn, so it is forced here.
    A local file takes the activation of the model name (``ViT-B-32-quickgelu``, say),
    except OpenAI's own TorchScript file, which always runs with QuickGELU.
    """
    import open_clip

    if os.path.isfile(os.path.expanduser(pretrained)):
        return _is_torchscript(Path(pretrained).expanduser())  # OpenAI's own ViT-B-32.pt is TorchScript
    if pretrained.lower() == "openai":
        return True
    return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's released CLIP files are), told from its zip listing without loading it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _check_model_name(name: str, spec: str) -> None:
    """A clear error for a model name or pretrained tag open_clip does not know, with close names."""
    import difflib

    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(SPECIAL_SPECS), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown CLIP {spec!r}: {hint}Use ViT-B-32 (OpenAI's weights), demo, tiny-random, MODEL/PRETRAINED "
            "or a weights file; `python -c \"import open_clip; print(open_clip.list_models())\"` lists the models"
        )
    pretrained = spec.partition("/")[2] or "openai"
    if not os.path.isfile(os.path.expanduser(pretrained)) and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(
            f"unknown pretrained weights {pretrained!r} for CLIP {name}: "
            + (f"known: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it")
            + " (or give a local weights file, MODEL//path/to/file.pt)"
        )


def _cached_weights(cfg: dict[str, Any]) -> bool:
    """Whether open_clip's download for pretrained config ``cfg`` is already in the local cache."""
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            hub = ""
        else:
            repo, filename = os.path.split(hub)  # "org/model/" -> open_clip's default file names
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
                return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _online(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host``:443 answers within ``timeout`` seconds (False when HF_HUB_OFFLINE is set)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing: let the download try
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _require_weights_or_network(name: str, pretrained: str) -> None:
    """Fail at once, saying what to do, when the weights are neither cached nor downloadable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if not cfg or _cached_weights(cfg):
        return
    hosts = (["huggingface.co"] if cfg.get("hf_hub") else []) + (
        [cfg["url"].split("/")[2]] if cfg.get("url", "").startswith("http") else [])
    if any(_online(host) for host in hosts):
        return
    raise UserError(
        f"CLIP {name}/{pretrained} is not downloaded yet and {' / '.join(hosts) or 'its download'} cannot be "
        "reached: run once with network (the weights are cached for later), or pass a local weights file "
        "(--clip /path/to/ViT-B-32.pt, OpenAI's file)"
    )


def _is_weights_file(spec: str) -> bool:
    """A path to a weights file rather than an open_clip ``MODEL/PRETRAINED`` pair."""
    import open_clip

    if os.path.isfile(os.path.expanduser(spec)):
        return True
    if spec.partition("/")[0] in open_clip.list_models():
        return False
    return spec.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_clip(spec: str = "ViT-B-32", device: str | torch.device | None = None) -> ClipEncoder:
    """Load a CLIP encoder by spec (see the module docstring) onto ``device`` (default: CUDA if present)."""
    import open_clip

    device = resolve_device(device)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("CLIP spec is empty: use 'ViT-B-32', 'demo', 'tiny-random', MODEL/PRETRAINED or a weights file")
    if spec.startswith(OPENAI_CLIP_PREFIX):
        return _load_openai_clip(spec[len(OPENAI_CLIP_PREFIX):]).to(device)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the same BPE vocabulary for every spec here
    mean, std = CLIP_MEAN, CLIP_STD
    if spec == "tiny-random":
        model, image_size = _tiny_random()
    elif spec == "demo":
        if not DEMO_CLIP_PATH.is_file():
            raise FileNotFoundError(
                f"the demo CLIP is not built yet: {DEMO_CLIP_PATH} is missing. Build it with "
                f"`python -m helpers build-demo`, or use --clip ViT-B-32 (downloads OpenAI's weights) "
                f"or --clip tiny-random (offline, random, for tests)"
            )
        model = _load_weights_file(DEMO_CLIP_PATH)
        image_size = _image_size(model)
    elif _is_weights_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights file not found: {path}")
        model = _load_weights_file(path)
        image_size = _image_size(model)
    else:
        name, _, pretrained = spec.partition("/")
        pretrained = pretrained or "openai"
        if pretrained.startswith("/") and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"CLIP weights file not found: {pretrained}")
        _check_model_name(name, spec)
        if os.path.isfile(pretrained) and _is_torchscript(Path(pretrained)):
            # OpenAI's released file (TorchScript): open_clip's weights-only loader refuses it, and
            # load_openai_model builds its network as trained, QuickGELU included
            model = _load_weights_file(Path(pretrained))
            return ClipEncoder(model, tokenizer, spec, image_size=_image_size(model)).to(device)
        quick_gelu = needs_quick_gelu(name, pretrained)
        if not os.path.isfile(pretrained):
            _require_weights_or_network(name, pretrained)
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        tokenizer = open_clip.get_tokenizer(name)
        image_size = _image_size(model)
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    return ClipEncoder(model, tokenizer, spec, image_size=image_size, mean=mean, std=std).to(device)
