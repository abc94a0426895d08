"""The interactive prompt widget for notebooks: type a sentence, press Generate, see faces.

Built from ipywidgets classes and options that exist in both 7.7.1 (what
Colab ships) and 8.x. The picture is shown in an ``Image`` widget (PNG bytes),
so it appears without ``display()`` calls; problems (an empty prompt, a
missing checkpoint, a long-prompt warning) are written into the widget as a
message, never as a traceback, and anything printed while generating lands in
the widget's own ``Output`` area.
"""

from __future__ import annotations

import html
import os
import warnings
from typing import Any

import ipywidgets as widgets

from .checkpoint import CheckpointError
from .config import stage_resolutions
from .errors import UserError

DEFAULT_PROMPT = "a blonde lady with glasses"
MAX_WIDGET_IMAGES = 16  # the most images one press of Generate makes
_SEED_MAX = 2**31 - 1


def _message(text: str, colour: str) -> str:
    return f'<span style="color:{colour}">{html.escape(text)}</span>'


class PromptWidget(widgets.VBox):
    """The prompt widget (an ipywidgets VBox); see ``prompt_widget``.

    Its parts are attributes, so a notebook (or a test) can drive it:
    ``prompt`` (Textarea), ``seed`` (BoundedIntText), ``random_button``,
    ``count`` (BoundedIntText, images per prompt), ``stage`` (Dropdown),
    ``generate_button``, ``message`` (HTML), ``image`` (Image, PNG) and
    ``output`` (Output). ``generate()`` is what the Generate button runs.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: Any = None,
        prompt: str = DEFAULT_PROMPT,
        seed: int = 0,
        n: int = 4,
        max_n: int = MAX_WIDGET_IMAGES,
        size: int | None = None,
    ) -> None:
        self._source = model
        self._device = device
        self._loaded = None  # the LoadedGenerator, loaded on first use
        self._size = size
        wide = widgets.Layout(width="100%")
        self.prompt = widgets.Textarea(value=prompt, placeholder="Describe a face in English", rows=2, layout=wide)
        self.seed = widgets.BoundedIntText(value=seed, min=0, max=_SEED_MAX, description="seed", layout=widgets.Layout(width="200px"))
        self.random_button = widgets.Button(description="random seed", tooltip="pick a new random seed")
        self.count = widgets.BoundedIntText(value=min(n, max_n), min=1, max=max_n, description="images", layout=widgets.Layout(width="160px"))
        self.stage = widgets.Dropdown(description="stage", layout=widgets.Layout(width="200px"))
        self.generate_button = widgets.Button(description="Generate", button_style="primary")
        self.message = widgets.HTML(value="")
        self.image = widgets.Image(value=b"", format="png")
        self.output = widgets.Output()
        self._set_stage_options(3)

        self.random_button.on_click(self._on_random)
        self.generate_button.on_click(self.generate)
        controls = widgets.HBox([self.seed, self.random_button, self.count, self.stage, self.generate_button])
        super().__init__([self.prompt, controls, self.message, self.image, self.output])
        self._load_quietly()

    # ---------------------------------------------------------------- state

    def _set_stage_options(self, num_stages: int) -> None:
        options = [(f"{size} px", str(i + 1)) for i, size in enumerate(stage_resolutions(num_stages))]
        options.append(("all stages", "all"))
        self.stage.options = options
        self.stage.value = str(num_stages)

    def _ensure_model(self):
        from .sample import LoadedGenerator, load_generator

        if self._loaded is None:
            source = self._source
            self._loaded = source if isinstance(source, LoadedGenerator) else load_generator(source, device=self._device)
            self._set_stage_options(self._loaded.num_stages)
        return self._loaded

    def _load_quietly(self) -> None:
        """Load the model now so the stage list is right; a failure becomes the message."""
        with self.output:  # errors are caught inside: see generate()
            try:
                self._ensure_model()
            except (UserError, CheckpointError, FileNotFoundError, ValueError) as err:
                self.message.value = _message(str(err), "#b00020")

    # ---------------------------------------------------------------- handlers

    def _on_random(self, _button: Any = None) -> None:
        from .sample import random_seed

        self.seed.value = random_seed()

    def render(self):
        """Generate with the current settings and return the PIL picture and the notes (warnings)."""
        from . import pictures
        from .sample import generate, select_stages

        model = self._ensure_model()
        prompts = [self.prompt.value]
        seed, n = int(self.seed.value), int(self.count.value)
        stages = select_stages(self.stage.value, model.num_stages)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = generate(prompts, n=n, seed=seed, model=model)
        seeds = [seed + j for j in range(n)]
        if len(stages) == 1:
            picture = pictures.prompt_grid(images[stages[0]], prompts, seeds, labels=False, size=self._size)
        else:
            labels = [f"seed {s}" for s in seeds]
            picture = pictures.stage_panel([images[i] for i in stages], size=self._size, row_labels=labels)
        return picture, [str(w.message) for w in caught]

    def generate(self, _button: Any = None) -> None:
        """The Generate button: draw the grid into the widget, or say what went wrong."""
        from . import pictures

        self.generate_button.disabled = True
        self.message.value = _message("generating...", "#555555")
        # Errors are caught inside the Output context: in a kernel, Output would
        # otherwise print the traceback itself and swallow the exception.
        with self.output:
            try:
                picture, notes = self.render()
                self.image.value = pictures.png_bytes(picture)
                text = f"seeds {self.seed.value}..{self.seed.value + self.count.value - 1}"
                self.message.value = "<br>".join(
                    [_message(note, "#a15c00") for note in notes] + [_message(text, "#555555")]
                )
            except (UserError, CheckpointError, FileNotFoundError, ValueError) as err:
                self.message.value = _message(str(err), "#b00020")
            except Exception as err:  # the widget must answer with a message, not a traceback
                self.message.value = _message(f"unexpected error ({type(err).__name__}): {err}", "#b00020")
            finally:
                self.generate_button.disabled = False


def prompt_widget(
    model: Any = None,
    *,
    device: Any = None,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    n: int = 4,
    max_n: int = MAX_WIDGET_IMAGES,
    size: int | None = None,
) -> PromptWidget:
    """The prompt widget: a text area, a seed box with a random-seed button, the number
    of images, a stage selector (64 / 128 / 256 px or all side by side), a Generate
    button, a message line and the picture (one row, one column per seed).

    model: a ``LoadedGenerator``, a checkpoint path, or None for the embedded demo
    model (loaded now onto ``device``; if that fails the widget says why and tries
    again on Generate). ``size`` is the tile size in px (default: the stage's own).
    Show it by making it the last expression of a cell, or with ``display(...)``.
    """
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    return PromptWidget(model, device=device, prompt=prompt, seed=seed, n=n, max_n=max_n, size=size)
