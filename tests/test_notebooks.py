"""The numbered notebooks as committed: outputs stripped, thin, Colab-first.

(The notebooks themselves run top to bottom in the smoke mode through nbval, collected
from notebooks/ by the same ``python -m pytest``; see conftest.py and pyproject.toml.)
"""

import json
import re
from pathlib import Path

import nbformat
import pytest

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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_bootstrap_then_settings_cell(name):
    bootstrap, settings, *_ = code_cells(name)
    src = bootstrap.source
    assert 'if "google.colab" in sys.modules:' in src  # Colab-only work is guarded
    assert f'"HELPERS_REPO_URL", "https://github.com/{REPO}"' in src
    assert '"git", "clone"' in src and '"pip", "install"' in src and "requirements.txt" in src
    assert 'helpers" / "__init__.py"' in src and "parents" in src  # elsewhere: find the repository root
    assert "nb.setup(mount=MOUNT_DRIVE)" in src
    assert "#@param" in settings.source and "nb.notebook_config(" in settings.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_shell_scripts_and_no_definitions(name):
    cells = code_cells(name)
    for index, cell in enumerate(cells):
        for line in cell.source.splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("!", "%%", "%run", "%sx")), f"{name}: shell line {line!r}"
            assert "!python" not in stripped and "os.system" not in stripped
            assert not re.match(r"(def|class) ", line), f"{name}: define it in helpers, not in a notebook"
        if index > 0:
            assert "subprocess" not in cell.source, f"{name}: call the function, do not run a command"
    bootstrap = cells[0].source
    commands = re.findall(r"subprocess\.run\(\[([^\]]*)\]", bootstrap)
    assert commands and all(c.startswith(('"git", "clone"', "sys.executable, \"-m\", \"pip\"")) for c in commands)


def test_readme_lists_every_notebook_with_its_badge():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Notebooks" in readme
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    for name in NOTEBOOKS:
        assert colab_url(name) in section
        assert f"notebooks/{name}" in section
    assert f"`{REPO}`" in section  # the one place a fork changes
