"""The command line entry point."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helpers", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "summary" in result.stdout


def test_summary_prints_the_table():
    result = run_cli("summary", "--preset", "faces")
    assert result.returncode == 0, result.stderr
    assert "16,828,505" in result.stdout  # generator parameters of the faces preset (GLU up-blocks)


def test_unknown_subcommand_fails_cleanly():
    result = run_cli("paint")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_the_runtime_never_imports_the_maintainer_tools():
    # what the notebooks import stays apart from bench, the demo build and the classifier's training
    runtime = "helpers.sample, helpers.train, helpers.widget, helpers.evaluate, helpers.notebook, helpers.extract"
    code = (
        f"import sys, {runtime}, helpers.attributes, helpers.clip_encoder\n"
        "tools = sorted(m for m in sys.modules if m.startswith('helpers.tools'))\n"
        "assert not tools, tools\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["bench", "build-demo", "train-classifier", "quality"])
def test_the_maintainer_commands_keep_their_names(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"python -m helpers {command}" in result.stdout


def test_build_demo_refuses_standing_stats_without_measure_only():
    result = run_cli("build-demo", "--standing-stats", "50")
    assert result.returncode != 0
    assert "--standing-stats" in result.stderr and "--measure-only" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
