"""Runs the notebooks (collected by nbval from notebooks/) in the smoke mode.

nbval's kernels inherit this process's environment, and they start after collection,
so setting the variables here selects the smoke mode (toy faces, tiny random CLIP, a few
CPU steps; see helpers/notebook.py) and gives the notebooks one fresh work folder per
test session, where notebook 01's features file is found by notebooks 03 to 05.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HELPERS_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a notebook run by the tests must never reach the network


def pytest_collect_file(file_path, parent):
    """When the first notebook is collected: a temporary work folder for this session's notebooks."""
    if file_path.suffix == ".ipynb" and "HELPERS_WORKDIR" not in os.environ:
        workdir = tempfile.mkdtemp(prefix="notebooks-smoke-")
        os.environ["HELPERS_WORKDIR"] = workdir
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    return None
