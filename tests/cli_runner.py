"""Running the real ``strata`` command in a subprocess, for the CLI tests."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# For tests that hold two runs bit for bit equal. Two runs on one machine are bit-identical only
# where the BLAS is: a threaded MKL, or one that picks kernels by memory alignment, may reorder sums
# from run to run (seen once on CI: two straight runs parted at step 3 by 1e-7). One thread and
# MKL's strict reproducible mode take the BLAS out of the comparison.
REPRODUCIBLE_BLAS = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}


def strata(*args, stdin=None, check=True, env=None) -> subprocess.CompletedProcess:
    """``strata ARGS`` with bytes in and out; a failure that ``check`` forbids shows stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "strata.cli", *map(str, args)], input=stdin, capture_output=True, timeout=600,
        check=False, env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"strata {' '.join(map(str, args))} failed:\n{result.stderr.decode()[-3000:]}")
    return result


def train_tiny(family: str, out: Path) -> Path:
    """A few training steps of a tiny preset on Shakespeare (named data): a real run directory to load."""
    strata(
        "train", ROOT / f"configs/tiny/{family}.yaml", "--data", "shakespeare", "--steps", 3,
        "--out", out, "--quiet", "model.context_length=64", "train.batch_size=4", "train.eval_bytes=4096",
        "data.valid_fraction=0.01",
    )
    return out
