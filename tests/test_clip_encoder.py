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


def test_long_prompt_is_truncated_with_a_warning(tiny_clip):
    from helpers.clip_encoder import CONTEXT_LENGTH, LongPromptWarning

    long_text = " ".join(["blond"] * 120)
    assert tiny_clip.token_count(long_text) > CONTEXT_LENGTH
    with pytest.warns(LongPromptWarning, match="truncated"):
        long_feature = tiny_clip.encode_text([long_text])
    # The documented rule: only the first 75 tokens (plus start/end) are read.
    cut = " ".join(["blond"] * (CONTEXT_LENGTH - 2))
    torch.testing.assert_close(long_feature, tiny_clip.encode_text([cut]))
    assert tiny_clip.too_long(["short", long_text]) == [1]


def test_non_ascii_prompt_works(tiny_clip):
    f = tiny_clip.encode_text(["Élodie a les cheveux blonds 😀", "금발 여성"])
    assert torch.isfinite(f).all() and f.shape == (2, tiny_clip.dim)


def test_local_weights_file_round_trip(tmp_path, tiny_clip):
    from helpers.clip_encoder import TINY_RANDOM, load_clip, save_clip

    path = save_clip(tmp_path / "my_clip.pt", tiny_clip.model, model_cfg=TINY_RANDOM, meta=dict(note="test"))
    loaded = load_clip(str(path), device="cpu")
    assert loaded.spec == str(path) and loaded.dim == tiny_clip.dim and loaded.image_size == 64
    texts = ["The man has a beard."]
    torch.testing.assert_close(loaded.encode_text(texts), tiny_clip.encode_text(texts))


def test_bad_weights_files_have_clear_errors(tmp_path):
    from helpers.clip_encoder import load_clip

    with pytest.raises(FileNotFoundError, match="CLIP weights file not found"):
        load_clip(str(tmp_path / "missing.pt"), device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_clip(str(tmp_path / "junk.pt"), device="cpu")


def test_demo_spec_says_when_the_demo_clip_is_missing(tmp_path, monkeypatch, tiny_clip):
    import helpers.clip_encoder as ce

    monkeypatch.setattr(ce, "DEMO_CLIP_PATH", tmp_path / "demo_clip.pt")
    with pytest.raises(FileNotFoundError, match="demo CLIP is not built yet"):
        ce.load_clip("demo", device="cpu")
    ce.save_clip(tmp_path / "demo_clip.pt", tiny_clip.model, model_cfg=ce.TINY_RANDOM)
    demo = ce.load_clip("demo", device="cpu")
    assert demo.spec == "demo" and demo.dim == tiny_clip.dim


def test_openai_clip_backend_is_optional(monkeypatch, tiny_clip):
    import sys
    import types

    import open_clip

    from helpers.clip_encoder import LongPromptWarning, load_clip

    monkeypatch.setitem(sys.modules, "clip", None)  # not installed
    with pytest.raises(ValueError, match="git `clip` package"):
        load_clip("openai-clip:ViT-B/32", device="cpu")

    bpe = open_clip.get_tokenizer("ViT-B-32")
    fake = types.ModuleType("clip")  # stands in for OpenAI's package: same calls, tiny model
    fake.load = lambda name, device="cpu", jit=False: (tiny_clip.model, None)
    fake.tokenize = lambda texts, truncate=False: bpe(texts)
    fake._tokenizer = bpe
    monkeypatch.setitem(sys.modules, "clip", fake)
    enc = load_clip("openai-clip:ViT-B/32", device="cpu")
    assert enc.spec == "openai-clip:ViT-B/32" and enc.image_size == 64
    torch.testing.assert_close(enc.encode_text(["a smiling woman"]), tiny_clip.encode_text(["a smiling woman"]))
    with pytest.warns(LongPromptWarning):
        enc.encode_text(["word " * 100])
