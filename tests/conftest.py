"""Shared fixtures: where the repository and the project's reference-data mirror are."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's shared, checksummed copies of the reference data; always present beside the repository.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shared_data_dir() -> Path:
    return SHARED_DATA_DIR
