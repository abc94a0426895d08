"""The demo CLIP: a small open_clip CLIP trained contrastively on toy faces (a maintainer tool).

It stands in for OpenAI's ViT-B/32 where weights cannot be downloaded: same
classes (``open_clip.CLIP``), same BPE tokenizer and 77-token context, smaller
towers (a ViT on 64 px images and a 3-layer text transformer, width 64).
Training is the symmetric InfoNCE of CLIP (Radford et al. 2021, ``losses.info_nce``
with CLIP's learnable temperature) on (toy face, one of its captions) pairs. The
file ``assets/demo_clip.pt`` holds the config and weights (``clip_encoder.save_clip``);
``load_clip("demo")`` reads it, so sampling never imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip_encoder import CLIP_MEAN, CLIP_STD, build_clip_model
from ..losses import info_nce

DEMO_CLIP_CONFIG: dict[str, Any] = dict(
    embed_dim=128,
    vision_cfg=dict(layers=3, width=64, head_width=32, patch_size=8, image_size=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3),
)


def _to_pixels(images_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
    return (images_u8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def train_clip(
    images: np.ndarray,
    captions: Sequence[Sequence[str]],
    *,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Train a small CLIP on image/caption pairs.

    images: uint8 [N, S, S, 3] at the model's image size; captions: N lists of
    strings (one is drawn per image per step). AdamW with warm-up and cosine
    decay; deterministic for a seed on a given machine. Returns the model in eval mode.
    """
    import open_clip
    from tqdm.auto import tqdm

    config = config or DEMO_CLIP_CONFIG
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # Tokenise every caption once; a step then only indexes tensors.
    flat = [c for caps in captions for c in caps]
    tokens = tokenizer(flat)
    owner_start = torch.tensor(np.cumsum([0] + [len(c) for c in captions[:-1]]))
    counts = torch.tensor([len(c) for c in captions])
    if (counts == 0).any():
        raise ValueError("every image needs at least one caption to train the demo CLIP")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    torch.set_flush_denormal(True)  # denormal floats slow CPU training many times over
    gen = torch.Generator().manual_seed(seed)
    model = build_clip_model(config, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    bar = tqdm(range(steps), desc="demo CLIP", disable=not progress)
    for step in bar:
        idx = torch.randperm(len(pixels), generator=gen)[:batch_size]
        pick = owner_start[idx] + (torch.rand(len(idx), generator=gen) * counts[idx]).long()
        # Light augmentation: random horizontal flips (no attribute is left/right).
        batch = _to_pixels(pixels[idx], mean, std)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        batch[flip] = batch[flip].flip(-1)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        # CLIP's learnable logit scale s is the inverse temperature, capped at 100 as CLIP caps it
        temperature = 1 / model.logit_scale.exp().clamp(max=100)
        loss = info_nce(model.encode_image(batch), model.encode_text(tokens[pick]), temperature=temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_log is not None:
                on_log(dict(step=step, loss=loss.item(), lr=lr_at(step)))
    return model.eval()


@torch.no_grad()
def _image_features(model: nn.Module, images: np.ndarray) -> Tensor:
    """uint8 [N, S, S, 3] -> L2-normalised image features [N, embed_dim], in batches of 256 (eval mode)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    model.eval()
    return torch.cat(
        [F.normalize(model.encode_image(_to_pixels(torch.from_numpy(np.ascontiguousarray(images[i : i + 256])), mean, std)), dim=-1)
         for i in range(0, len(images), 256)]
    )


@torch.no_grad()
def retrieval_top1(
    model: nn.Module,
    images: np.ndarray,
    captions: Sequence[str],
    attributes: np.ndarray,
    *,
    pool: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Text-to-image retrieval on held-out pairs, in pools of ``pool`` images.

    images uint8 [N, S, S, 3]; captions: one caption per image; attributes bool
    [N, A]. For each caption, the pool's images are ranked by similarity; the
    top-1 counts as correct when it is the caption's own image (``exact``) or
    any image with exactly the same attributes (``attribute_match``, the
    measure that matters: toy faces with equal attributes are interchangeable).
    """
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    image_features = _image_features(model, images)
    text_features = torch.cat(
        [F.normalize(model.encode_text(tokenizer(list(captions[i : i + 256]))), dim=-1) for i in range(0, len(captions), 256)]
    )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    attrs = torch.as_tensor(attributes, dtype=torch.bool)
    exact = match = total = 0
    for start in range(0, len(order) - pool + 1, pool):
        ids = order[start : start + pool]
        sims = text_features[ids] @ image_features[ids].T  # [pool captions, pool images]
        best = ids[sims.argmax(dim=1)]
        exact += int((best == ids).sum())
        match += int((attrs[best] == attrs[ids]).all(dim=1).sum())
        total += len(ids)
    if total == 0:
        raise ValueError(f"need at least {pool} held-out images, got {len(images)}")
    return dict(exact=exact / total, attribute_match=match / total, queries=float(total), pool=float(pool))


@torch.no_grad()
def prompt_retrieval(
    model: nn.Module,
    images: np.ndarray,
    attributes: np.ndarray,
    prompts: Sequence[tuple[str, Sequence[str]]],
    names: Sequence[str],
    *,
    pool: int = 100,
    pools_per_prompt: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Retrieval with hand-written prompts: does the top-1 image show exactly what a prompt asks?

    images uint8 [N, S, S, 3] (held out), attributes bool [N, A] over ``names``;
    prompts: (text, the attribute names it asks for; every other one is asked absent,
    as the caption grammar mentions every present attribute). For each prompt,
    ``pools_per_prompt`` pools of ``pool`` images, each with one image that has
    exactly the prompt's attributes and ``pool - 1`` random others; a pool counts when
    its top-1 image has exactly those attributes. Prompts with no such held-out image
    are listed under ``skipped``. Returns the overall ``attribute_match``, one score
    per prompt and the skipped prompts.
    """
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    image_features = _image_features(model, images)
    text_features = F.normalize(model.encode_text(tokenizer([p for p, _ in prompts])), dim=-1)
    attrs = torch.as_tensor(attributes, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    per_prompt, skipped = {}, []
    for (text, asked), feature in zip(prompts, text_features):
        unknown = sorted(set(asked) - set(names))
        if unknown:
            raise ValueError(f"prompt {text!r} asks for {unknown}, which are not among {list(names)}")
        want = torch.tensor([n in asked for n in names])
        matching = (attrs == want).all(dim=1).nonzero().flatten()
        if len(matching) == 0:
            skipped.append(text)
            continue
        hits = 0
        for _ in range(pools_per_prompt):
            target = matching[torch.randint(len(matching), (), generator=gen)]
            others = torch.randperm(len(images), generator=gen)[: pool - 1]
            ids = torch.cat([target.view(1), others])
            best = ids[(image_features[ids] @ feature).argmax()]
            hits += int((attrs[best] == want).all())
        per_prompt[text] = hits / pools_per_prompt
    scores = list(per_prompt.values())
    return dict(attribute_match=float(np.mean(scores)) if scores else None, per_prompt=per_prompt, skipped=skipped,
                pool=float(pool))
