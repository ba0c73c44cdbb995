"""No bad input ends in a traceback: each case below stops, through the real ``strata`` command,
with one line naming the problem (the last line of stderr), before any work is lost."""

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import ROOT, strata, train_tiny

from strata.config import load_config
from strata.inference.generate import generate, prompt_context
from strata.train.checkpoint import list_checkpoints, load_checkpoint
from strata.train.runs import open_run

TINY = ROOT / "configs/tiny/transformer.yaml"
# What train_tiny trains: Shakespeare, a context of 64 bytes, a checkpoint at step 3.
SMALL = ["--data", "shakespeare", "--quiet", "model.context_length=64", "train.batch_size=4", "train.eval_bytes=4096",
         "data.valid_fraction=0.01"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Three steps of the tiny Transformer (context 64 bytes): one checkpoint, step-000003."""
    return train_tiny("transformer", tmp_path_factory.mktemp("bad-input") / "run")


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A copy of the run that a test may damage."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def fails_with(result: subprocess.CompletedProcess, pattern: str, lines: int | None = None) -> str:
    """Assert a non-zero exit whose stderr ends with one line matching ``pattern``, no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(pattern, last), last
    if lines is not None:
        assert len(stderr.strip().splitlines()) == lines, stderr
    return last


# --- (a) disk full while saving a checkpoint ---------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        # A write past the limit then fails with EFBIG instead of the signal killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_the_run_resumes(copy):
    # 1 MB per file: the optimiser state (6.5 MB) and the weights (3.3 MB) cannot be written.
    limited = subprocess.run([sys.executable, "-m", "strata.cli", "train", "--resume", str(copy), "--steps", "4", "--quiet"],
                             capture_output=True, timeout=600, preexec_fn=_file_size_limit(1_000_000))
    fails_with(limited, re.escape(f"strata: error: {copy}/checkpoints/.tmp-step-000004/optimizer.pt: cannot save the "
                                  "checkpoint of step 4 (File too large); the newest complete checkpoint, "
                                  "step-000003, is intact"))
    assert [path.name for path in list_checkpoints(copy)] == ["step-000003"]
    assert not list((copy / "checkpoints").glob(".tmp-*"))  # the partial save is cleaned up
    assert load_checkpoint(copy / "checkpoints/step-000003").step == 3

    strata("train", "--resume", copy, "--steps", 4, "--quiet")  # with room again, it goes on from step 3
    assert [path.name for path in list_checkpoints(copy)] == ["step-000004", "step-000003"]
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [step for step in steps if step > 3] == [4, 4]  # the step, then the final validation


# --- (b) a device this machine does not have ---------------------------------------------------


ABSENT_DEVICES = ["cuda:99", "xpu:7", "gpu0"]
ABSENT_DEVICES += [] if torch.cuda.is_available() else ["cuda"]
ABSENT_DEVICES += [] if torch.backends.mps.is_available() else ["mps"]


@pytest.mark.parametrize("device", ABSENT_DEVICES)
def test_a_device_this_machine_does_not_have(tmp_path, device):
    result = strata("train", TINY, "--out", tmp_path / "run", "--steps", 1, *SMALL, f"train.device={device}", check=False)
    name = device != "gpu0"
    fails_with(result, re.escape(f"strata: config error: train.device: {device!r} ")
               + (r"is not a device of this machine, which has cpu(, \w+:\d+)*" if name else
                  re.escape("is not a device name (auto, cpu, cuda, cuda:N, mps or xpu); ") + r"this machine has cpu.*"),
               lines=1)
    assert not (tmp_path / "run").exists()  # stopped before anything was written


# --- (c) --max-new so large that the cache cannot be allocated ---------------------------------


def test_max_new_whose_cache_would_not_fit_is_refused_with_the_memory_it_needs(run):
    result = strata("generate", run, "--prompt", "x", "--max-new", 10**12, check=False)
    # 4 layers x 2 KV heads x (32 + 32) x 4 bytes = 2,048 bytes a token, for BOS, "x" and 10^12 new tokens.
    fails_with(result, re.escape(f"strata: error: --max-new 1,000,000,000,000: the cache for 1,000,000,000,002 tokens "
                                 f"needs {2048 * (10**12 + 2) / 2**30:,.1f} GiB, more than the ")
               + r"[\d,]+\.\d GiB (available on this machine|left under this process's cgroup memory limit)"
               + re.escape("; ask for fewer new tokens"), lines=1)
    assert result.stdout == b""  # refused before anything was generated


# --- (d) a prompt longer than the model's context ----------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused(run):
    result = strata("generate", run, "--prompt", "ROMEO:" + "y" * 200, "--max-new", 5, check=False)
    fails_with(result, re.escape("strata: error: the prompt is 207 tokens, longer than the model's context of 64 "
                                 "(model.context_length); shorten it, or give --truncate left to keep its last 64 tokens"),
               lines=1)
    assert result.stdout == b""


def test_truncate_left_keeps_the_last_tokens_and_says_so(run):
    prompt = "ROMEO:" + "y" * 100 + "JULIET:"
    result = strata("generate", run, "--prompt", prompt, "--max-new", 10, "--temperature", 0, "--truncate", "left")
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "strata: note: the prompt is 114 tokens, longer than the model's context of 64 (model.context_length); "
        "kept its last 64 tokens (--truncate left)")
    trained = open_run(run)
    kept = [trained.tokenizer.bos_id, *trained.tokenizer.encode(prompt.encode()).tolist()][-64:]
    expected = generate(trained.model, kept, 10, tokenizer=trained.tokenizer)[0].text
    assert result.stdout.decode() == prompt[-64:] + expected + "\n"


def test_interactive_reports_a_too_long_prompt_and_reads_the_next(run):
    result = strata("generate", run, "--interactive", "--max-new", 4, "--temperature", 0,
                    stdin=b"y" * 100 + b"\nshort\n")
    assert "strata: error: the prompt is 101 tokens, longer than the model's context of 64" in result.stderr.decode()
    assert result.stdout.decode().startswith("short")


def test_a_model_of_mamba2_blocks_only_has_no_context_limit():
    assert prompt_context(load_config(ROOT / "configs/tiny/mamba2.yaml").model) is None
    assert prompt_context(load_config(TINY, ["model.context_length=64"]).model) == 64
    assert prompt_context(load_config(ROOT / "configs/tiny/aunet2.yaml").model) == load_config(
        ROOT / "configs/tiny/aunet2.yaml").model.context_length


# --- (e) a model that would not fit in memory ---------------------------------------------------


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path):
    # The 7B AU-Net preset with a 10x deeper trunk: 78B parameters, 1.1 TiB to train, more than any
    # machine this runs on (the preset alone, 7.96B x 16 bytes = 119 GiB, fits a large server).
    result = strata("train", ROOT / "configs/paper/aunet2-7b.yaml", "--out", tmp_path / "run", "--quiet",
                    "train.device=cpu", "model.stages.1.layout=" + "A" * 320, check=False)
    fails_with(result, re.escape("strata: config error: model: 78,025,613,312 parameters need at least 1,162.7 GiB to "
                                 "train on cpu (16 bytes each: fp32 weights, gradients and AdamW's two moments), more "
                                 "than the ")
               + r"[\d,]+\.\d GiB (available on this machine|left under this process's cgroup memory limit)"
               + re.escape("; choose a smaller model or train on a GPU (train.device) or a machine with more memory"),
               lines=1)
    assert not (tmp_path / "run").exists()


# --- (f) zero or negative steps, (g) a validation fraction outside its range ------------------


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(tmp_path, steps):
    flag = strata("train", TINY, "--out", tmp_path / "run", "--steps", steps, check=False)
    fails_with(flag, re.escape(f"strata train: error: argument --steps: must be at least 1, got {steps}"))
    key = strata("train", TINY, "--out", tmp_path / "run", f"train.steps={steps}", check=False)
    fails_with(key, re.escape(f"strata: config error: {TINY}: train.steps: Input should be greater than 0 (got {steps})"),
               lines=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("fraction", "bound"), [("0", "greater than 0"), ("-0.1", "greater than 0"),
                                                 ("1", "less than 0.5"), ("1.5", "less than 0.5")])
def test_valid_fraction_must_be_a_fraction(tmp_path, fraction, bound):
    key = strata("train", TINY, "--out", tmp_path / "run", f"data.valid_fraction={fraction}", check=False)
    fails_with(key, re.escape(f"strata: config error: {TINY}: data.valid_fraction: Input should be {bound} (got {fraction})"),
               lines=1)
    flag = strata("tokenizer", "train", "--data", "shakespeare", "--valid-fraction", fraction, "--out", tmp_path / "bpe",
                  check=False)
    fails_with(flag, re.escape(f"strata tokenizer train: error: argument --valid-fraction: must be in (0, 0.5), got {fraction}"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "bpe").exists()


# --- (h) a corrupted safetensors file -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_corrupted_weights_file_is_one_line_through_generate_and_eval(copy, damage):
    weights = copy / "checkpoints/step-000003/model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"\x00garbage" + data[16:])
    expected = (re.escape(f"strata: error: {weights}: unreadable (SafetensorError: ") + r"[^\n]+"
                + re.escape(f"); {copy} has no older checkpoint to fall back to"))
    fails_with(strata("generate", copy, "--prompt", "x", check=False), expected, lines=1)
    if damage == "overwritten":
        return
    fails_with(strata("eval", copy, "--data", "shakespeare", check=False), expected, lines=1)
    # Named directly, the checkpoint is the only one tried.
    direct = strata("generate", weights.parent, "--prompt", "x", check=False)
    fails_with(direct, re.escape(f"strata: error: {weights}: unreadable (SafetensorError: ") + r"[^\n]+\)", lines=1)


def test_a_corrupted_newest_checkpoint_is_passed_over_in_one_warning_line(copy):
    newest = Path(shutil.copytree(copy / "checkpoints/step-000003", copy / "checkpoints/step-000004"))
    (newest / "model.safetensors").write_bytes(b"not safetensors")
    result = strata("generate", copy, "--prompt", "x", "--max-new", 3)
    warning, = result.stderr.decode().strip().splitlines()
    assert re.fullmatch(re.escape(f"strata: warning: {newest}/model.safetensors: unreadable (SafetensorError: ")
                        + r"[^\n]+" + re.escape("); falling back to the previous checkpoint (step-000003)"), warning)
