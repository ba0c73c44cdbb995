"""AU-Net through the real CLI: train, resume exactly (the loader's levels are part of its
windows), evaluate bits per byte and multiple choice, generate; AU-Net on BPE is refused."""

import json
from pathlib import Path

import pytest

from cli_runner import REPRODUCIBLE_BLAS, strata
from strata.data import corpus_path

ROOT = Path(__file__).resolve().parents[1]
AUNET2 = ROOT / "configs" / "tiny" / "aunet2.yaml"
# Constant learning rate, so a 3-step run resumed to 6 steps follows the 6-step run's schedule.
FAST = ["model.context_length=128", "train.batch_size=4", "train.eval_bytes=4096", "data.valid_fraction=0.01",
        "train.schedule=constant", "train.warmup=0", "train.eval_every=1000", "--quiet"]


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def shakespeare() -> Path:
    return corpus_path("shakespeare")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare) -> Path:
    out = tmp_path_factory.mktemp("aunet") / "run"
    strata("train", AUNET2, "--data", shakespeare, "--steps", 6, "--out", out, *FAST, env=REPRODUCIBLE_BLAS)
    return out


def test_a_resumed_run_repeats_the_straight_run_exactly(tmp_path, shakespeare, run):
    resumed = tmp_path / "resumed"
    strata("train", AUNET2, "--data", shakespeare, "--steps", 3, "--out", resumed, *FAST, env=REPRODUCIBLE_BLAS)
    strata("train", "--resume", resumed, "--steps", 6, "--quiet", env=REPRODUCIBLE_BLAS)
    assert losses(resumed) == losses(run)  # bit-identical, step by step
    assert sorted(losses(run)) == list(range(1, 7))


def test_eval_scores_bytes_and_tasks(run, shakespeare, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_bytes(shakespeare.read_bytes()[-5000:])
    scores = json.loads(strata("eval", run, "--data", held_out, "--json").stdout)
    assert scores["bytes"] == 5000 and 0 < scores["bpb"] < 9
    tasks = json.loads(strata("eval", run, "--tasks", "sotu-word-order", "--limit", 8, "--json").stdout)  # a task name
    assert tasks["sotu-word-order"]["n"] == 8 and 0 <= tasks["sotu-word-order"]["acc"] <= 1


def test_generate_streams_a_continuation(run):
    first = strata("generate", run, "--prompt", "ROMEO:", "--max-new", 30, "--seed", 1).stdout
    again = strata("generate", run, "--prompt", "ROMEO:", "--max-new", 30, "--seed", 1).stdout
    assert first.startswith(b"ROMEO:") and first == again


def test_aunet_on_bpe_is_refused_naming_the_key(tmp_path, shakespeare):
    result = strata("train", AUNET2, "--data", shakespeare, "--out", tmp_path / "bpe", "data.tokenizer=bpe", check=False)
    assert result.returncode != 0 and b"Traceback" not in result.stderr
    assert b"data.tokenizer: AU-Net reads bytes" in result.stderr
