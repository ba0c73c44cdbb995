"""``strata generate``: streaming a trained run's continuation, any prompt bytes, stop strings,
the interactive loop, and clear errors."""

from pathlib import Path

import pytest
from cli_runner import strata, train_tiny

from strata.inference.generate import generate
from strata.train.runs import open_run

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A few steps of the tiny intra-layer hybrid: attention and Mamba caches both decode."""
    return train_tiny("intra", tmp_path_factory.mktemp("generate") / "run")


def test_greedy_output_is_the_prompt_then_the_api_continuation(run):
    printed = strata("generate", run, "--prompt", "ROMEO:", "--max-new", 30, "--temperature", 0).stdout
    trained = open_run(run)
    expected = generate(trained.model, b"ROMEO:", 30, tokenizer=trained.tokenizer)[0].text
    assert printed.decode() == "ROMEO:" + expected + "\n"


def test_any_prompt_bytes_from_a_file(run, tmp_path):
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"nul \x00 invalid \xff\xfe " + b"y" * 40)  # within the run's context of 64 tokens
    result = strata("generate", run, "--prompt-file", prompt, "--max-new", 20, "--seed", 0)
    printed = result.stdout.decode("utf-8")  # replacement characters, never invalid output
    assert printed.startswith("nul \x00 invalid \ufffd\ufffd yyy")


def test_stop_string_ends_the_output(run):
    free = strata("generate", run, "--prompt", "A", "--max-new", 40, "--temperature", 0).stdout.decode()
    continuation = free[1:-1]
    stop = continuation[12:15]
    stopped = strata("generate", run, "--prompt", "A", "--max-new", 40, "--temperature", 0, "--stop", stop).stdout.decode()
    assert stopped == "A" + continuation[: continuation.index(stop)] + "\n"


def test_interactive_reads_one_prompt_per_line_until_end_of_input(run):
    result = strata("generate", run, "--interactive", "--max-new", 8, "--temperature", 0, stdin=b"first\nsecond\n")
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith("first") and lines[1].startswith("second")
    assert b"Ctrl-D" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --prompt TEXT, --prompt-file PATH or --interactive"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt: cannot read the prompt file"),
        (["--prompt", "x", "--top-p", "2"], "--top-p: must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature: must be in [0, inf]"),
    ],
)
def test_bad_generate_arguments_fail_with_one_clear_line(run, args, message):
    result = strata("generate", run, *args, check=False)
    assert result.returncode == 2 and result.stdout == b""
    assert message in result.stderr.decode().strip().splitlines()[-1]
    assert b"Traceback" not in result.stderr
