"""``strata info`` through the installed console script.

Every subprocess imports torch (several seconds on a small CPU), so the module starts all of its
invocations at once, in parallel, and the tests read their results.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from strata import load_config
from strata.cli import build_parser, main
from strata.cost.model import model_cost

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER = "configs/tiny/transformer.yaml"
INTER = "configs/tiny/inter.yaml"
INTER_1B = "configs/paper/inter-1b.yaml"


def strata_command() -> list[str]:
    """The console script next to this interpreter, else on PATH, else ``python -m strata.cli``."""
    beside = Path(sys.executable).parent / "strata"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("strata")
    if found:
        return [found]
    return [sys.executable, "-m", "strata.cli"]


OVERRIDES = ["model.d_model=256", "model.mamba.d_state=16"]
RUNS = {
    "table": ["info", INTER_1B],
    # overrides right after the config path, options after them
    "bf16": ["info", INTER, *OVERRIDES, "--json", "--context", "1024"],
    "fp32": ["info", INTER, *OVERRIDES, "--context", "1024", "--dtype", "fp32", "--json"],
    "unknown_key": ["info", TRANSFORMER, "model.foo=1"],
    "wrong_type": ["info", TRANSFORMER, "model.d_model=abc", "--json"],
    "heads": ["info", TRANSFORMER, "model.attention.n_heads=6"],
    "symbol": ["info", TRANSFORMER, "model.layout=AXM", "--json"],
}


@pytest.fixture(scope="module")
def runs():
    command = strata_command()
    env = {**os.environ, "COLUMNS": "120"}  # rich wraps tables to the terminal width; make it fixed

    def run(args):
        return subprocess.run(command + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    with ThreadPoolExecutor(max_workers=len(RUNS)) as pool:
        results = dict(zip(RUNS, pool.map(run, RUNS.values())))
    return results


def ok_json(result) -> dict:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data


def test_json_matches_model_cost(runs):
    data = ok_json(runs["bf16"])
    for key in ("params", "non_embedding_params", "flops_per_token", "cache_bytes", "layout"):
        assert key in data
    expected = model_cost(load_config(ROOT / INTER, OVERRIDES).model, 1024, "bf16")
    assert data["layout"] == expected.layout == "MMAMMM"
    assert data["params"] == expected.params
    assert data["non_embedding_params"] == expected.non_embedding_params
    assert data["flops_per_token"] == pytest.approx(expected.flops_per_token, rel=1e-12)
    assert data["cache_bytes"] == expected.cache_bytes
    assert data["context"] == 1024 and data["dtype"] == "bf16"
    assert [b["params"] for b in data["blocks"]] == [b.params for b in expected.blocks]
    assert [b["cache_bytes"] for b in data["blocks"]] == [b.cache_bytes for b in expected.blocks]


def test_table_mentions_layout_and_parameters(runs):
    result = runs["table"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = model_cost(load_config(ROOT / INTER_1B).model)
    out = result.stdout
    assert "layout" in out and "MMMAMMMAMMMMM" in out
    assert "parameters" in out and f"{expected.params:,}" in out
    assert "non-embedding parameters" in out and f"{expected.non_embedding_params:,}" in out
    assert "43.37 MiB" in out  # cache at the config's 8K context, bf16
    assert "per block" in out and out.count("M Mamba-2") == 11 and out.count("A attention") == 2


def test_context_and_fp32_double_the_bf16_cache(runs):
    bf16, fp32 = ok_json(runs["bf16"]), ok_json(runs["fp32"])
    assert bf16["context"] == fp32["context"] == 1024
    assert (bf16["dtype"], fp32["dtype"]) == ("bf16", "fp32")
    assert fp32["cache_bytes"] == 2 * bf16["cache_bytes"]
    assert [f["cache_bytes"] for f in fp32["blocks"]] == [2 * b["cache_bytes"] for b in bf16["blocks"]]
    assert fp32["params"] == bf16["params"] and fp32["flops_per_token"] == bf16["flops_per_token"]
    # --context changes the figures: the tiny config's own context is 256
    config = load_config(ROOT / INTER, OVERRIDES).model
    assert config.context_length == 256
    assert bf16["cache_bytes"] != model_cost(config).cache_bytes
    assert bf16["flops_per_token"] != model_cost(config).flops_per_token


def test_overrides_after_the_config_path_apply(runs):
    data = ok_json(runs["bf16"])
    plain = model_cost(load_config(ROOT / INTER).model, 1024)
    overridden = load_config(ROOT / INTER, OVERRIDES).model
    assert (overridden.d_model, overridden.mamba.d_state) == (256, 16)
    assert data["params"] == model_cost(overridden, 1024).params != plain.params
    assert data["cache_bytes"] != plain.cache_bytes


@pytest.mark.parametrize(
    "name, key, text",
    [
        ("unknown_key", "model.foo", "unknown key"),
        ("wrong_type", "model.d_model", "integer"),
        ("heads", "model.attention.n_heads", "does not divide d_model"),
        ("symbol", "model.layout", "unknown layout symbol 'X'"),
    ],
)
def test_invalid_config_is_one_line_on_stderr(runs, name, key, text):
    result = runs[name]
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert TRANSFORMER in line and key in line and text in line
    assert "Traceback" not in line


# --- the parser, in process (no torch import per case) ------------------------------------------


def test_parser_keeps_overrides_in_order():
    args = build_parser().parse_args(["info", TRANSFORMER, "a.b=1", "a.b=2", "--dtype", "fp16"])
    assert args.config == TRANSFORMER and args.overrides == ["a.b=1", "a.b=2"] and args.dtype == "fp16"


def test_parser_rejects_unknown_dtype():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["info", TRANSFORMER, "--dtype", "int8"])


def test_overrides_may_follow_options(capsys):
    assert main(["info", str(ROOT / TRANSFORMER), "--json", "model.layout=AA", "--context", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "AA" and out["context"] == 64


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(ROOT / TRANSFORMER), "--bogus"])
    assert exit_info.value.code != 0 and "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("context", [0, -5])
def test_non_positive_context_is_rejected(context):
    config = load_config(ROOT / TRANSFORMER).model
    with pytest.raises(ValueError):
        model_cost(config, context)
