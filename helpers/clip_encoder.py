"""CLIP encoders behind one small interface, built on open_clip.

``load_clip(spec)`` returns a ``ClipEncoder`` whose features are fp32 and
L2-normalised, the form the generator is conditioned on:

- ``"ViT-B-32"`` (default): OpenAI's original weights through open_clip
  (``pretrained="openai"``, downloaded once by open_clip on first use);
- ``"MODEL/PRETRAINED"``: any open_clip pair, e.g. ``"ViT-B-16/openai"``;
- ``"tiny-random"``: a small random CLIP built from open_clip classes, seeded,
  offline; for tests.

The weights are frozen and the model stays in eval mode; ``embed_generated``
is differentiable with respect to its input images (for the CLIP loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTEXT_LENGTH = 77  # CLIP's text window in tokens, start and end tokens included

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

    def __init__(self, model: nn.Module, tokenizer, spec: str, *, image_size: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"])).shape[-1])

    def train(self, mode: bool = True) -> "ClipEncoder":
        # CLIP stays in eval mode whatever the caller does: it is a frozen feature extractor.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [N, 77]; empty prompts are an error."""
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt {i} is empty: write a sentence describing the face")
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


def _tiny_random(seed: int = 0) -> tuple[nn.Module, int]:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=TINY_RANDOM["embed_dim"],
            vision_cfg=CLIPVisionCfg(**TINY_RANDOM["vision_cfg"]),
            text_cfg=CLIPTextCfg(**TINY_RANDOM["text_cfg"]),
        )
    return model, TINY_RANDOM["vision_cfg"]["image_size"]


def load_clip(spec: str = "ViT-B-32", device: str | torch.device | None = None) -> ClipEncoder:
    """Load a CLIP encoder by spec (see the module docstring) onto ``device`` (default: CUDA if present)."""
    import open_clip

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the same BPE vocabulary for every spec here
    if spec == "tiny-random":
        model, image_size = _tiny_random()
    else:
        name, _, pretrained = spec.partition("/")
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained or "openai")
        tokenizer = open_clip.get_tokenizer(name)
        image_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    return ClipEncoder(model, tokenizer, spec, image_size=image_size).to(device)
