"""The evaluation protocol end to end on a tiny checkpoint and the synthetic features file."""

import json

import pytest
import torch

from helpers.checkpoint import CHECKPOINT_FORMAT
from helpers.files import atomic_save
from helpers.config import ModelConfig
from helpers.errors import UserError
from helpers.evaluate import choose_prompts, evaluate, format_report, load_feature_extractor
from helpers.network import build_models

PROTOCOL_FIELDS = {
    "n_generated", "n_real", "resolution", "stage", "feature_extractor", "clip_spec", "seed", "checkpoint_step",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = ModelConfig(text_dim=32, z_dim=8, cond_dim=8, ng=64, nd=4, num_stages=2)
    G, _ = build_models(cfg, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    atomic_save(
        dict(format=CHECKPOINT_FORMAT, model_config=cfg.to_dict(), clip_spec="tiny-random", step=7,
             G_ema=G.state_dict()),
        path,
    )
    return path


def test_choose_prompts_is_seeded_and_cycles_captions():
    captions = [["a0", "a1"], [], ["c0"], ["d0", "d1", "d2"]]
    prompts, sources = choose_prompts(captions, 7, seed=3)
    assert prompts == choose_prompts(captions, 7, seed=3)[0]
    assert set(sources) == {0, 2, 3} and 1 not in sources  # no prompt from an uncaptioned image
    assert sources[:3] == sources[3:6]  # a seeded order, repeated
    first, second = prompts[sources.index(0)], prompts[3 + sources[3:].index(0)]
    assert first != second  # the second round uses the image's next caption
    with pytest.raises(UserError, match="no captions"):
        choose_prompts([[], []], 2, seed=0)


def test_report_has_metrics_and_protocol_and_is_deterministic(tiny_checkpoint, synthetic_features):
    kwargs = dict(n_images=6, seed=5, feature_extractor="random-conv", batch_size=4, kid_subsets=5,
                  device="cpu", progress=False)
    report = evaluate(tiny_checkpoint, synthetic_features, **kwargs)
    for key in ("fid", "kid", "kid_std", "clip_score", "r_precision"):
        assert isinstance(report[key], float), key
    assert report["fid"] > 0 and 0 <= report["clip_score"] <= 100 and 0 <= report["r_precision"] <= 1
    assert "attribute_accuracy" not in report  # synthetic data carry no attributes
    protocol = report["protocol"]
    assert PROTOCOL_FIELDS <= set(protocol)
    assert protocol["n_generated"] == 6 and protocol["n_real"] == 3  # the 3 test images
    assert protocol["resolution"] == 128 and protocol["stage"] == 2
    assert protocol["feature_extractor"].startswith("random-conv")
    assert protocol["clip_spec"] == "tiny-random" and protocol["seed"] == 5 and protocol["checkpoint_step"] == 7
    assert protocol["r_precision_candidates"] == 5  # 1 true + the 4 captions of the other 2 test images
    json.dumps(report)  # JSON-ready
    assert evaluate(tiny_checkpoint, synthetic_features, **kwargs) == report
    text = format_report(report)
    assert "FID" in text and "R-precision" in text and "random-conv" in text


def test_all_stages_and_clip_extractor(tiny_checkpoint, synthetic_features):
    report = evaluate(tiny_checkpoint, synthetic_features, n_images=3, stage="all", feature_extractor="clip",
                      kid_subsets=2, device="cpu", progress=False)
    assert set(report["per_stage"]) == {"64", "128"}
    assert report["fid"] == report["per_stage"]["128"]["fid"]
    assert report["protocol"]["feature_extractor"].startswith("clip image encoder (tiny-random")
    assert "64 px" in format_report(report)


def test_auto_extractor_falls_back_to_clip_offline(monkeypatch, tiny_clip):
    from helpers import metrics

    def offline(**kwargs):
        raise RuntimeError("cannot load the Inception-v3 FID weights (URLError: offline)")

    monkeypatch.setattr(metrics, "InceptionFeatures", offline)
    extractor, note = load_feature_extractor("auto", clip=tiny_clip)
    assert "clip" in extractor.name and "not comparable" in note
    with pytest.raises(UserError, match="Inception"):
        load_feature_extractor("inception", clip=tiny_clip)


def test_cli_writes_the_report(tiny_checkpoint, synthetic_features, tmp_path, capsys):
    from helpers.__main__ import main

    out = tmp_path / "report.json"
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--features", str(synthetic_features),
                 "--n-images", "3", "--feature-extractor", "random-conv", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert PROTOCOL_FIELDS <= set(report["protocol"]) and "fid" in report
    assert "report written to" in capsys.readouterr().out


def test_bad_inputs_are_clear(tiny_checkpoint, synthetic_features):
    with pytest.raises(UserError, match="at least 2"):
        evaluate(tiny_checkpoint, synthetic_features, n_images=1, device="cpu", progress=False)
    with pytest.raises(UserError, match="stage 3 does not exist"):
        evaluate(tiny_checkpoint, synthetic_features, stage=3, device="cpu", progress=False)


def test_attribute_accuracy_on_toy_faces(tiny_checkpoint, toy_features, monkeypatch):
    from helpers import attributes
    from helpers.checkpoint import CheckpointError
    from helpers.toyfaces import TOY_ATTRIBUTES

    classifier = attributes.AttributeClassifier(len(TOY_ATTRIBUTES)).eval()  # random weights: wiring only
    monkeypatch.setattr(attributes, "load_attribute_classifier", lambda **kwargs: classifier)
    kwargs = dict(n_images=4, feature_extractor="random-conv", kid_subsets=2, device="cpu", progress=False)
    report = evaluate(tiny_checkpoint, toy_features, **kwargs)
    accuracy = report["attribute_accuracy"]
    assert set(accuracy["per_attribute"]) == set(TOY_ATTRIBUTES)
    assert 0 <= accuracy["mean"] <= 1 and "attribute" in format_report(report)
    assert 0.5 <= accuracy["majority_baseline"] <= 1
    assert report["protocol"]["attribute_classifier"].startswith("toy-face attribute classifier")
    assert set(accuracy["recall"]) == set(TOY_ATTRIBUTES) and "recall" in format_report(report)

    class Answers(torch.nn.Module):  # a classifier that sees every attribute (yes) or none (no)
        def __init__(self, logit):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.tensor(logit))

        def forward(self, images):
            return self.logit.expand(images.shape[0], len(TOY_ATTRIBUTES))

    for logit, expected in ((10.0, 1.0), (-10.0, 0.0)):
        monkeypatch.setattr(attributes, "load_attribute_classifier", lambda logit=logit, **kwargs: Answers(logit))
        accuracy = evaluate(tiny_checkpoint, toy_features, **kwargs)["attribute_accuracy"]
        asked = [r for r in accuracy["recall"].values() if r is not None]
        assert asked and all(r == expected for r in asked) and accuracy["min_recall"] == expected

    def missing(**kwargs):
        raise CheckpointError("checkpoint not found: assets/attribute_classifier.pt")

    monkeypatch.setattr(attributes, "load_attribute_classifier", missing)
    report = evaluate(tiny_checkpoint, toy_features, **kwargs)
    assert "attribute_accuracy" not in report and "skipped" in report["protocol"]["attribute_note"]


def test_attribute_accuracy_needs_the_drawn_attributes(synthetic_features):
    """A toy faces folder (source kind "folder") qualifies by its attribute names; CelebA's 40 do not."""
    from helpers.captions import CELEBA_ATTRIBUTES
    from helpers.evaluate import _attribute_tools
    from helpers.toyfaces import TOY_ATTRIBUTES

    data = torch.load(synthetic_features, weights_only=False)
    assert _attribute_tools(data) is None  # no attributes at all
    data["meta"]["source_kind"] = "folder"
    data["attributes"] = dict(names=list(TOY_ATTRIBUTES), values=torch.zeros(12, len(TOY_ATTRIBUTES), dtype=torch.bool))
    assert _attribute_tools(data) is not None
    data["attributes"] = dict(names=list(CELEBA_ATTRIBUTES), values=torch.zeros(12, 40, dtype=torch.bool))
    assert _attribute_tools(data) is None
