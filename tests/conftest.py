"""Shared fixtures. Real data lives outside the repository, in $STRATA_DATA (default ../shared/data)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("STRATA_DATA") or ROOT.parent / "shared" / "data")
# Named corpora (``shakespeare``) resolve through $STRATA_DATA, in this process and in the CLI runs
# the tests start, so no test downloads by accident.
os.environ["STRATA_DATA"] = str(DATA_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder. Missing data is a broken setup, not a reason to skip: fail loudly."""
    if not (DATA_DIR / "corpora" / "shakespeare.txt").is_file():
        pytest.fail(
            f"shared test data not found at {DATA_DIR} (no corpora/shakespeare.txt); "
            "set STRATA_DATA to the folder holding corpora/, udhr/ and tasks/",
            pytrace=False,
        )
    return DATA_DIR
