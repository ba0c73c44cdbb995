"""Shared fixtures. Data comes by name (``strata.data.corpus_path("sotu")``, ``dataset_path("udhr")``),
fetched once into the cache; $STRATA_DATA, when set (CI points it at ../shared/data), is a local
copy that saves the downloads. The multiple-choice files the tests read are the project's own
(``tests/data/tasks``, written by ``tests/data/make_tasks.py``)."""

import os
from pathlib import Path

# Triton's interpreter runs the GPU kernels on CPU tensors (tests/test_kernels.py). Triton decides
# when it is first imported whether its own library functions (tl.sum, ...) are interpreted, and
# other tests import it first (through torch and transformers), so the switch is set here, before
# anything is imported. Only kernels chosen with STRATA_KERNELS=triton ever run under it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under ``pytest -n N`` (pytest-xdist) each worker has a core to itself: one thread for it and for
# the processes its tests start, instead of N workers each spreading over every core. Set before
# torch is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "data" / "tasks"


def local_copy_present() -> bool:
    shared = os.environ.get("STRATA_DATA")
    return bool(shared) and (Path(shared) / "corpora" / "shakespeare.txt").is_file()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``network`` download from the registries; with a local copy of the data they
    are skipped, so a run beside ../shared (CI) needs no network."""
    if not local_copy_present():
        return
    skip = pytest.mark.skip(reason="a local copy of the data is present ($STRATA_DATA): no downloads")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tasks_dir() -> Path:
    """The project's own small multiple-choice files: sotu-next-sentence (4 choices),
    sotu-word-order (2) and udhr-language (4), 60 items each."""
    return TASKS_DIR
