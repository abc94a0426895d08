"""The command line entry point."""

import subprocess
import sys
from pathlib import Path

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
    assert "15,428,729" in result.stdout  # generator parameters of the faces preset


def test_unknown_subcommand_fails_cleanly():
    result = run_cli("paint")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
