"""The CLIP wrapper, on a tiny random open_clip model (offline)."""

import pytest
import torch


def test_text_and_image_features_are_normalised(tiny_clip):
    t = tiny_clip.encode_text(["The woman has blond hair.", "Der Mann lächelt, 笑顔"])
    assert t.shape == (2, tiny_clip.dim) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))
    i = tiny_clip.encode_images(torch.randint(0, 256, (3, 3, 40, 90), dtype=torch.uint8))
    assert i.shape == (3, tiny_clip.dim)
    torch.testing.assert_close(i.norm(dim=1), torch.ones(3))


def test_embed_generated_is_differentiable_and_clip_frozen(tiny_clip):
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    tiny_clip.embed_generated(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_clip.parameters())
    tiny_clip.train()
    assert not tiny_clip.model.training


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_empty_prompt_is_rejected(tiny_clip, bad):
    with pytest.raises(ValueError, match="empty"):
        tiny_clip.encode_text([bad])
