"""The numbered notebooks as committed: outputs stripped, thin, Colab-first.

(The notebooks themselves run top to bottom in the smoke mode through nbval, collected
from notebooks/ by the same ``python -m pytest``; see conftest.py and pyproject.toml.)
"""

import json
import re
from pathlib import Path

import nbformat
import pytest

from helpers import notebook as nb
from helpers.notebook import NOTEBOOKS, REPO, colab_badge, colab_url

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"


def code_cells(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_five_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs_stripped(name):
    raw = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
    nb = nbformat.from_dict(raw)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, "saved widget state: strip it"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a cell has outputs: clear them before committing"
            assert cell.execution_count is None, f"{name}: a cell has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_title_badge_and_description(name):
    first = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells[0]
    assert first.cell_type == "markdown"
    assert re.match(r"# \d\d · \w", first.source), "the first line is the title"
    assert colab_badge(name) in first.source
    assert "HELPERS_SMOKE=1" in first.source  # says how the two modes are chosen
    assert len(first.source.split("\n\n")) >= 4  # title, badge, what it does, modes


def code_lines(source):
    """The lines of a cell that do something: no blank lines, comments or Colab form fields."""
    return [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")
            and "#@param" not in line]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_bootstrap_then_settings_cell(name):
    bootstrap, settings, *_ = code_cells(name)
    src = bootstrap.source
    assert 'if "google.colab" in sys.modules:' in src  # Colab-only work is guarded
    assert f'"{nb.REPO_URL_ENV}", "{nb.repo_url({})}"' in src  # the clone address helpers names too
    assert '"git", "clone"' in src
    assert 'helpers" / "__init__.py"' in src and "parents" in src  # elsewhere: find the repository root
    assert '(ROOT / "helpers").is_dir()' in src  # a leftover folder without the package is cloned again
    assert "raise RuntimeError(" in src  # outside the repository: say where to open the notebook
    assert src.rstrip().endswith('print("\\n".join(nb.setup(mount=MOUNT_DRIVE)))')
    # the rest (pip, chdir, Drive) is nb.setup's: the cell only makes helpers importable
    code = "\n".join(code_lines(src))
    assert not any(word in code for word in ("pip", "chdir", "drive.mount", "requirements")), code
    assert len(code_lines(src)) <= 14, "keep the bootstrap short: move work into helpers.notebook.setup"
    assert "#@param" in settings.source and "nb.notebook_config(" in settings.source


def test_every_bootstrap_is_the_same():
    assert len({code_cells(name)[0].source for name in NOTEBOOKS}) == 1


MARKDOWN_IMAGE = re.compile(r"!\[[^\]]+\]\((\.\./assets/[^)\s]+\.png)\)")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_shows_a_picture_before_it_is_run(name):
    """GitHub shows notebooks without outputs: a markdown image from assets/ (a relative path GitHub renders)."""
    cells = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
    images = [m for c in cells if c.cell_type == "markdown" for m in MARKDOWN_IMAGE.findall(c.source)]
    assert images, f"{name}: no markdown image from ../assets/"
    for image in images:
        path = (NOTEBOOK_DIR / image).resolve()
        assert path.is_file(), f"{name}: {image} does not exist"
        assert path.stat().st_size < 400_000, f"{image}: keep the notebook pictures small"


def test_notebook_figures_are_small_and_named_by_their_tool():
    """The pictures of helpers.tools.notebook_figures: in assets/, small, named in its docstring."""
    from helpers.tools import notebook_figures

    for name in ("notebook_01_pairs.png", "notebook_02_stages.png", "notebook_03_preview.png",
                 "notebook_05_scored.png"):
        assert name in notebook_figures.__doc__
        assert (ROOT / "assets" / name).stat().st_size < 150_000, f"{name} is over 150 KB"
    picture = notebook_figures.figure_pairs()  # the one that needs no model: toy faces and captions
    assert picture.width > notebook_figures.COLUMNS * notebook_figures.TILE


@pytest.mark.parametrize("name", ["03_training.ipynb"])
def test_training_runs_one_step_by_hand_before_the_long_run(name):
    cells = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
    sources = [c.source for c in cells]
    hand = next(i for i, s in enumerate(sources) if "trainer.train_step(batch)" in s)
    long_run = next(i for i, s in enumerate(sources) if "train(features, cfg.run_dir" in s)
    assert hand < long_run
    assert "Trainer(" in sources[hand] and "DataLoader(" in sources[hand] and "nb.loss_table(values)" in sources[hand]
    assert "run_dir" not in sources[hand]  # the hand step writes nothing into the run folder
    why = " ".join(s for s in sources[hand + 1 : long_run] if "detached" in s)
    assert "detached" in why and "G" in why


@pytest.mark.parametrize("name", ["03_training.ipynb", "04_sampling.ipynb", "05_evaluation.ipynb"])
def test_generated_pictures_say_why_they_are_gray_in_the_smoke_mode(name):
    assert any("nb.picture_note(cfg" in c.source for c in code_cells(name))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_shell_scripts_and_no_definitions(name):
    cells = code_cells(name)
    for index, cell in enumerate(cells):
        for line in cell.source.splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("!", "%%", "%run", "%sx")), f"{name}: shell line {line!r}"
            assert "!python" not in stripped and "os.system" not in stripped
            assert "cuda.is_available() else" not in stripped, f"{name}: ask helpers.devices for the device"
            assert not re.match(r"(def|class) ", line), f"{name}: define it in helpers, not in a notebook"
        if index > 0:
            assert "subprocess" not in cell.source, f"{name}: call the function, do not run a command"
    bootstrap = cells[0].source
    commands = re.findall(r"subprocess\.run\(\[([^\]]*)\]", bootstrap)
    assert commands and all(c.startswith('"git", "clone"') for c in commands)  # the one thing before helpers imports


def test_readme_lists_every_notebook_with_its_badge():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Notebooks" in readme
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    for name in NOTEBOOKS:
        assert colab_url(name) in section
        assert f"notebooks/{name}" in section
    assert f"`{REPO}`" in section  # the one place a fork changes
