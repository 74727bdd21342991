"""Shared pytest fixtures: quiet TensorFlow, the dev copy of Penn-Fudan, temp data dirs."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's development copy of Penn-Fudan lives beside the repository, never in it.
PENN_FUDAN_DIR = pathlib.Path(
    os.environ.get("PENN_FUDAN_DIR", REPO_ROOT.parent / "shared" / "datasets" / "PennFudanPed")
)


@pytest.fixture(scope="session")
def penn_fudan_dir():
    """Path of a Penn-Fudan directory; the test is skipped when it is absent."""
    if not (PENN_FUDAN_DIR / "PNGImages").is_dir():
        pytest.skip(f"Penn-Fudan not found at {PENN_FUDAN_DIR}")
    return PENN_FUDAN_DIR
