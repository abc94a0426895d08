"""The CLIP wrapper, on a tiny random open_clip model (offline)."""

import copy

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


# --------------------------------------------------------------------------- OpenAI's ViT-B/32, offline
# A random model of the real architecture stands in for the download: open_clip's download
# function returns its file, so everything after the download runs as on Colab.


@pytest.fixture(scope="module")
def openai_standin(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()  # random weights
    with torch.no_grad():  # MLP inputs of order one, as in trained weights, where the activations differ
        for name, p in reference.named_parameters():
            if name.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.mul_(3.0)
    path = tmp_path_factory.mktemp("openai") / "ViT-B-32.pt"
    torch.save(reference.state_dict(), path)  # OpenAI's key names: the open_clip CLIP class shares them
    return reference, path


def _features(encoder):
    texts = ["The woman has blond hair and wears eyeglasses.", "A smiling man with a mustache."]
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return encoder.encode_text(texts), encoder.encode_images(images)


def test_vit_b_32_is_built_with_quick_gelu_like_openai_trained_it(monkeypatch, openai_standin):
    import sys
    import types
    from importlib import metadata

    import open_clip
    import open_clip.factory

    from helpers import clip_encoder
    from helpers.clip_encoder import ClipEncoder, load_clip

    reference, path = openai_standin
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(path))
    import open_clip.openai  # open_clip < 2.29 downloads OpenAI's weights here instead

    if hasattr(open_clip.openai, "download_pretrained_from_url"):
        monkeypatch.setattr(open_clip.openai, "download_pretrained_from_url", lambda url, **kw: str(path))
    monkeypatch.setattr(clip_encoder, "_require_weights_or_network", lambda name, pretrained: None)
    loaded = load_clip("ViT-B-32", device="cpu")
    assert loaded.activation == "quick_gelu"
    assert loaded.identity["activation"] == "quick_gelu" and loaded.identity["open_clip"] == metadata.version("open_clip_torch")
    expected = _features(ClipEncoder(reference, open_clip.get_tokenizer("ViT-B-32"), "reference", image_size=224))
    for got, want in zip(_features(loaded), expected):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    # OpenAI's own file given as a path, and OpenAI's `clip` package as the backend, give the same features
    local = load_clip(str(path), device="cpu")
    assert local.activation == "quick_gelu"
    for got, want in zip(_features(local), expected):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    fake = types.ModuleType("clip")  # OpenAI's package (not on PyPI): its load() returns OpenAI's network
    fake.load = lambda name, device="cpu", jit=False: (open_clip.load_openai_model(str(path), device="cpu"), None)
    fake.tokenize = lambda texts, truncate=False: open_clip.get_tokenizer("ViT-B-32")(texts)
    monkeypatch.setitem(sys.modules, "clip", fake)
    for got, want in zip(_features(load_clip("openai-clip:ViT-B/32", device="cpu")), expected):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_a_gelu_build_of_openai_weights_would_differ(openai_standin):
    # The check above can fail: the same weights under nn.GELU give other features.
    import open_clip

    from helpers.clip_encoder import ClipEncoder

    reference, path = openai_standin
    gelu = open_clip.create_model("ViT-B-32", pretrained=None)
    gelu.load_state_dict(reference.state_dict())
    tok = open_clip.get_tokenizer("ViT-B-32")
    a = _features(ClipEncoder(gelu, tok, "gelu", image_size=224))
    b = _features(ClipEncoder(reference, tok, "quick", image_size=224))
    assert ClipEncoder(gelu, tok, "gelu", image_size=224).activation == "gelu"
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[1] - b[1]).abs().max() > 1e-3  # 5x the tolerance above


def test_unknown_clip_names_suggest_close_ones():
    from helpers.clip_encoder import load_clip
    from helpers.errors import UserError

    with pytest.raises(UserError, match="did you mean ViT-B-32"):
        load_clip("ViT-B-33", device="cpu")
    with pytest.raises(UserError, match="unknown pretrained weights 'nope'.*openai"):
        load_clip("ViT-B-32/nope", device="cpu")


def test_vit_b_32_without_network_fails_at_once(monkeypatch):
    import time

    from helpers import clip_encoder
    from helpers.errors import UserError

    monkeypatch.setattr(clip_encoder, "_cached_weights", lambda cfg: False)
    monkeypatch.setattr(clip_encoder, "_online", lambda host, timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(UserError, match="run once with network.*local weights file"):
        clip_encoder.load_clip("ViT-B-32", device="cpu")
    assert time.perf_counter() - started < 5


def test_a_different_clip_is_refused_naming_both(tiny_clip):
    from helpers.clip_encoder import check_same_clip
    from helpers.errors import UserError

    check_same_clip(tiny_clip.identity, tiny_clip, what="x.pt")  # the same: accepted
    check_same_clip(None, tiny_clip, what="x.pt")  # an older file that recorded nothing (a GELU CLIP: silent)
    other = dict(tiny_clip.identity, activation="quick_gelu", open_clip="2.24.0")
    with pytest.raises(UserError, match=r"x.pt was made with CLIP 'tiny-random' with quick_gelu \(open_clip 2.24.0\).*with gelu"):
        check_same_clip(other, tiny_clip, what="x.pt")


def test_openais_torchscript_file_is_told_apart_from_a_state_dict(tmp_path):
    from helpers.clip_encoder import needs_quick_gelu

    scripted, plain = tmp_path / "ViT-B-32.pt", tmp_path / "state.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert needs_quick_gelu("ViT-B-32", str(scripted))  # as MODEL//path: OpenAI's file runs with QuickGELU
    assert not needs_quick_gelu("ViT-B-32", str(plain))  # other files: the model name decides


def test_an_older_file_with_openai_weights_gets_a_warning(tiny_clip, monkeypatch):
    from helpers.clip_encoder import check_same_clip

    monkeypatch.setattr(tiny_clip, "activation", "quick_gelu")
    with pytest.warns(UserWarning, match="does not record which activation"):
        check_same_clip(None, tiny_clip, what="old.pt")


def test_the_same_spec_with_other_weights_is_refused(tiny_clip, tmp_path):
    """A rebuilt demo CLIP keeps its spec ("demo") but not its weights: features made with the
    earlier one must not train with the new one (the CLIP loss would read another text space)."""
    from helpers.clip_encoder import ClipEncoder, check_same_clip
    from helpers.errors import UserError

    recorded = tiny_clip.identity
    assert recorded["weights"] == tiny_clip.identity["weights"]  # stable for the same weights
    model = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    rebuilt = ClipEncoder(model, tiny_clip.tokenizer, tiny_clip.spec, image_size=tiny_clip.image_size)
    with pytest.raises(UserError, match="with other weights than the one loaded now"):
        check_same_clip(recorded, rebuilt, what="features.pt")
    check_same_clip({k: v for k, v in recorded.items() if k != "weights"}, rebuilt, what="old.pt")  # not recorded
