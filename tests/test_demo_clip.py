"""Training and measuring the demo CLIP, on a tiny config and a few toy faces."""

import numpy as np
import torch

from helpers.clip_encoder import load_clip, save_clip
from helpers.tools.demo_clip import retrieval_top1, train_clip

TINY = dict(
    embed_dim=16,
    vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)


def coloured_squares(n: int, seed: int = 0):
    """n images [32, 32, 3] that are red or blue, with matching captions and attributes."""
    rng = np.random.default_rng(seed)
    blue = rng.random(n) < 0.5
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    images[~blue, :, :, 0] = 220
    images[blue, :, :, 2] = 220
    images += rng.integers(0, 30, images.shape, dtype=np.uint8)
    captions = [["a blue square", "the square is blue"] if b else ["a red square", "the square is red"] for b in blue]
    return images, captions, blue[:, None]


def test_a_few_steps_learn_colours_and_retrieval_reports_them(tmp_path):
    images, captions, attrs = coloured_squares(64)
    model = train_clip(images, captions, steps=30, batch_size=32, lr=3e-3, config=TINY, progress=False)
    test_images, test_captions, test_attrs = coloured_squares(40, seed=1)
    report = retrieval_top1(model, test_images, [c[0] for c in test_captions], test_attrs, pool=20)
    assert report["queries"] == 40 and report["pool"] == 20
    # Two classes: chance of picking a same-colour image is 1/2; learned is far above it.
    assert report["attribute_match"] > 0.9
    assert report["exact"] <= report["attribute_match"]
    # Saved with the CLIP module's own format, it loads as a spec like any other.
    path = save_clip(tmp_path / "clip.pt", model, model_cfg=TINY)
    encoder = load_clip(str(path), device="cpu")
    text = encoder.encode_text(["a red square", "a blue square"])
    pixels = torch.from_numpy(test_images[:4]).permute(0, 3, 1, 2)
    sims = encoder.encode_images(pixels) @ text.T
    assert torch.equal(sims.argmax(1), torch.from_numpy(test_attrs[:4, 0]).long())


def test_training_is_deterministic_for_a_seed():
    images, captions, _ = coloured_squares(16)
    a = train_clip(images, captions, steps=2, batch_size=8, config=TINY, progress=False, seed=3)
    b = train_clip(images, captions, steps=2, batch_size=8, config=TINY, progress=False, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_prompt_retrieval_scores_each_hand_written_prompt(tmp_path):
    import pytest

    from helpers.tools.demo_clip import prompt_retrieval

    images, captions, _ = coloured_squares(64)
    model = train_clip(images, captions, steps=30, batch_size=32, lr=3e-3, config=TINY, progress=False)
    test_images, _, test_attrs = coloured_squares(60, seed=1)
    prompts = [("a blue square", ("blue",)), ("a red square", ())]
    report = prompt_retrieval(model, test_images, test_attrs, prompts, ["blue"], pool=20, pools_per_prompt=5)
    assert set(report["per_prompt"]) == {"a blue square", "a red square"} and report["skipped"] == []
    assert report["attribute_match"] > 0.9  # chance: about 1/2 in each pool
    only_red = test_attrs & False
    assert prompt_retrieval(model, test_images, only_red, prompts, ["blue"], pool=20)["skipped"] == ["a blue square"]
    with pytest.raises(ValueError, match="asks for"):
        prompt_retrieval(model, test_images, test_attrs, [("a green square", ("green",))], ["blue"], pool=20)
