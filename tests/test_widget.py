"""The prompt widget: built, driven and read back without a browser or a kernel."""

import io

import pytest
from PIL import Image

from helpers import sample
from helpers.config import ModelConfig
from helpers.network import build_models
from helpers.pictures import PADDING
from helpers.sample import load_generator, save_generator
from helpers.widget import PromptWidget, prompt_widget


def make_checkpoint(path, *, num_stages):
    cfg = ModelConfig(text_dim=32, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=num_stages)
    generator, _ = build_models(cfg, seed=0)
    return save_generator(path, generator, clip_spec="tiny-random")


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("w") / "g2.pt", num_stages=2)


def shown(widget):
    return Image.open(io.BytesIO(widget.image.value))


def test_widget_generates_a_grid_into_its_image(ckpt2, capsys):
    w = prompt_widget(ckpt2, device="cpu", n=3, seed=5)
    assert isinstance(w, PromptWidget)
    assert [v for _, v in w.stage.options] == ["1", "2", "all"] and w.stage.value == "2"
    w.prompt.value = "The man has a beard."
    w.generate_button.click()
    assert shown(w).size == (3 * 128 + 4 * PADDING, 128 + 2 * PADDING)
    assert "seeds 5..7" in w.message.value and not w.generate_button.disabled
    w.stage.value = "all"
    w.generate()  # the handler itself
    assert shown(w).width == 2 * 128 + 3 * PADDING and shown(w).height > 3 * 128  # 64 | 128, one row per seed
    assert capsys.readouterr().out == ""  # nothing leaks out of the widget


def test_widget_is_deterministic_by_seed(ckpt2, monkeypatch):
    model = load_generator(ckpt2, device="cpu")
    a, b = prompt_widget(model, n=2, seed=3), prompt_widget(model, n=2, seed=3)
    a.generate()
    b.generate()
    assert a.image.value == b.image.value
    monkeypatch.setattr(sample, "random_seed", lambda: 12345)
    b.random_button.click()
    assert b.seed.value == 12345


def test_widget_reports_bad_input_as_a_message(ckpt2, capsys):
    w = prompt_widget(ckpt2, device="cpu", n=1)
    w.prompt.value = "   "
    w.generate()
    assert "empty" in w.message.value and w.image.value == b""
    w.prompt.value = "The woman has blond hair and wears eyeglasses. " * 12
    w.generate()
    assert "77" in w.message.value and len(w.image.value) > 0  # truncated, with the warning shown
    assert capsys.readouterr().out == ""


def test_widget_without_a_demo_model_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "DEMO_GENERATOR", tmp_path / "demo_generator.pt")
    w = prompt_widget()
    assert "build-demo" in w.message.value
    w.generate_button.click()
    assert "build-demo" in w.message.value and w.image.value == b""


def test_widget_uses_only_widgets_that_ipywidgets_7_has(ckpt2):
    import ipywidgets

    w = prompt_widget(ckpt2, device="cpu")
    kinds = {type(c).__name__ for c in (w, *w.children, *w.children[1].children)}
    assert kinds <= {"PromptWidget", "Textarea", "HBox", "BoundedIntText", "Button", "Dropdown", "HTML", "Image", "Output"}
    assert ipywidgets.__version__.split(".")[0] in {"7", "8"}


def test_no_traceback_reaches_a_kernel(monkeypatch, tmp_path, ckpt2):
    """In a kernel, an exception inside an Output context is printed as a traceback
    (and swallowed); the widget must catch its errors before that happens."""
    from ipywidgets.widgets import widget_output

    class FakeShell:
        tracebacks = []

        def showtraceback(self, exc_tuple, **kwargs):
            self.tracebacks.append(exc_tuple)

    shell = FakeShell()
    monkeypatch.setattr(widget_output, "get_ipython", lambda: shell)
    monkeypatch.setattr(sample, "DEMO_GENERATOR", tmp_path / "demo_generator.pt")
    w = prompt_widget()
    w.generate()
    assert "build-demo" in w.message.value
    good = prompt_widget(ckpt2, device="cpu", n=1)
    good.prompt.value = ""
    good.generate()
    assert "empty" in good.message.value
    assert shell.tracebacks == []
