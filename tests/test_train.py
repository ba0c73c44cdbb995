"""Training through the real CLI, on real text: learning, exact resume after kill -9, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import REPRODUCIBLE_BLAS
from strata.data import corpus_path, load_documents, split_documents
from strata.train.trainer import gzip_bits_per_byte

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
# Small, fast runs: 64-token windows, 4 sequences a step.
FAST = ["model.context_length=64", "train.batch_size=4", "train.eval_bytes=4096", "data.valid_fraction=0.01"]


def strata(*args, check=True, timeout=600, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "strata.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"strata {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def validations(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in r]


@pytest.fixture(scope="module")
def shakespeare() -> Path:
    return corpus_path("shakespeare")


def test_resume_after_kill_repeats_the_straight_run_exactly(tmp_path, shakespeare):
    common = [TINY / "transformer.yaml", "--data", shakespeare, "--quiet", *FAST,
              "train.save_every=20", "train.eval_every=1000", "train.batch_size=8", "model.context_length=128"]
    # (later overrides win: 8 sequences of 128 tokens make steps slow enough to kill between saves)
    straight = tmp_path / "straight"
    strata("train", *common, "--steps", 40, "--out", straight, env=REPRODUCIBLE_BLAS)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "strata.cli", "train", *map(str, common), "--steps", "40",
                                "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=REPRODUCIBLE_BLAS)
    checkpoint = killed / "checkpoints" / "step-000020"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before its step-20 checkpoint"
    assert not (killed / "checkpoints" / "step-000040").exists(), "killed too late to test resuming"

    strata("train", "--resume", killed, "--quiet", env=REPRODUCIBLE_BLAS)
    expected, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == expected  # bit-identical, step by step


# Steps per family: enough for each to beat gzip -9 on the same held-out bytes (3.09 bits per byte
# on this split) with margin; an untrained model scores about 8.
@pytest.mark.parametrize("family, steps", [("transformer", 150), ("swa", 150), ("mamba2", 100), ("inter", 100),
                                           ("intra", 100)])
def test_each_tiny_family_learns_shakespeare(tmp_path, shakespeare, family, steps):
    """The bar is a compressor on the run's own held-out text, not a constant: the model must
    predict Shakespeare better than gzip does."""
    run = tmp_path / family
    strata("train", TINY / f"{family}.yaml", "--data", shakespeare, "--steps", steps, "--out", run, "--quiet",
           "model.context_length=128", "train.batch_size=8", f"train.eval_every={steps}", "train.lr=3e-3",
           "data.valid_fraction=0.02")
    final = validations(run)[-1]
    _, held_out = split_documents(load_documents([str(shakespeare)]), 0.02)
    gzip = gzip_bits_per_byte(held_out)
    assert final["step"] == steps and 3.0 < gzip < 3.2
    assert final["val_bpb"] < gzip, f"{family}: validation bpb {final['val_bpb']:.3f}, gzip {gzip:.3f}"


def test_bpe_and_byte_runs_score_the_same_held_out_bytes(tmp_path, shakespeare):
    runs = {}
    for tokenizer, vocab_size in (("bytes", 259), ("bpe", 512)):
        runs[tokenizer] = tmp_path / tokenizer
        strata("train", TINY / "transformer.yaml", "--data", shakespeare, "--steps", 5, "--out", runs[tokenizer],
               "--quiet", *FAST, f"data.tokenizer={tokenizer}", "data.bpe_vocab_size=512", f"model.vocab_size={vocab_size}")
    held_out = tmp_path / "held_out.txt"
    held_out.write_bytes(shakespeare.read_bytes()[-20000:])
    scores = {name: json.loads(strata("eval", run, "--data", held_out, "--json").stdout) for name, run in runs.items()}
    assert scores["bytes"]["bytes"] == scores["bpe"]["bytes"] == 20000
    assert all(0 < score["bpb"] < 12 for score in scores.values())


def test_generate_continues_a_prompt(tmp_path, shakespeare):
    run = tmp_path / "run"
    strata("train", TINY / "transformer.yaml", "--data", shakespeare, "--steps", 3, "--out", run, "--quiet", *FAST)
    first = strata("generate", run, "--prompt", "ROMEO:", "--max-new", 40, "--seed", 1).stdout
    again = strata("generate", run, "--prompt", "ROMEO:", "--max-new", 40, "--seed", 1).stdout
    assert first.startswith("ROMEO:") and first == again


# --- bad input: one clear line, non-zero exit, nothing trained ----------------------------------


def fails_cleanly(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_empty_and_binary_files(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "blob.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 10)
    for path, words in [(tmp_path / "nope.txt", ["nope.txt"]), (empty, ["empty.txt", "empty"]), (binary, ["blob.txt", "binary"])]:
        fails_cleanly(strata("train", TINY / "transformer.yaml", "--data", path, "--out", tmp_path / "run", check=False), *words)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_jsonl_without_the_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "wrong key"}) + "\n")
    fails_cleanly(strata("train", TINY / "transformer.yaml", "--data", path, "--out", tmp_path / "run", check=False),
                  "docs.jsonl", "2", "text")


def test_unknown_corpus(tmp_path):
    fails_cleanly(strata("train", TINY / "transformer.yaml", "--data", "no-such-corpus", "--out", tmp_path / "r", check=False),
                  "no-such-corpus", "shakespeare")


def test_unwritable_run_directory(tmp_path, shakespeare):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    fails_cleanly(strata("train", TINY / "transformer.yaml", "--data", shakespeare, "--out", blocker / "run", check=False),
                  "not writable")


def test_resuming_with_another_architecture(tmp_path, shakespeare):
    run = tmp_path / "run"
    strata("train", TINY / "transformer.yaml", "--data", shakespeare, "--steps", 2, "--out", run, "--quiet", *FAST)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 128", "d_model: 64"))
    fails_cleanly(strata("train", "--resume", run, "--steps", 4, check=False), "different architecture")


def test_repeated_non_finite_losses_stop_the_run_naming_the_step(tmp_path, shakespeare):
    result = strata("train", TINY / "transformer.yaml", "--data", shakespeare, "--steps", 50, "--out", tmp_path / "run",
                    "--quiet", *FAST, "train.lr=1e6", "train.warmup=0", "train.clip=null", "train.max_bad_steps=3", check=False)
    line = fails_cleanly(result, "non-finite", "step")
    skipped = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r.get("skipped")]
    assert len(skipped) == 3 and f"step {skipped[-1]['step']}" in line
