"""Every benchmark runs end to end at a tiny size, so none rots unseen between the runs that
fill BENCHMARKS.md: the figures it writes are real measurements (finite, positive), with each
contender it compares present."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY_RUNS = {
    "decode": ["--contexts", "64", "--batches", "1", "--new", "4", "--repeats", "1"],
    "aunet": ["--batch", "1", "--seq", "64", "--context", "64", "--new", "4", "--repeats", "1"],
    "multiple_choice": ["--items", "5", "--repeats", "1"],
    "train_step": ["--batch", "1", "--seq", "32", "--repeats", "1"],
    "hf_models": ["--families", "bamba", "falconh1", "llama", "mamba2", "granite", "nemotronh", "--d-model", "32",
                  "--layers", "2", "--batch", "1", "--seq", "16", "--contexts", "32", "--new", "4", "--repeats", "1"],
    "serve": ["--requests", "4", "--max-tokens", "4", "--clients", "1", "2", "--rounds", "2", "--shared", "300", "--trials", "1", "--no-peer"],
}
# The measured figures of a row (a row holds one of the groups); the rest echoes the settings.
MEASURED = {
    "decode": [("tokens_per_s",)],
    "aunet": [("training_ratio", "decoding_ratio")],
    "multiple_choice": [("cached_s", "full_s", "speedup")],
    "train_step": [("strata_s", "hf_s", "speedup"), ("tokens_per_s", "flops_per_s", "mfu")],
    "hf_models": [("strata_s", "hf_s", "speedup"),
                  ("strata_tokens_per_s", "hf_tokens_per_s", "speedup", "strata_prefill_tokens_per_s", "hf_prefill_tokens_per_s")],
    "serve": [("tokens_per_s", "p50_s", "p99_s"), ("cold_ttft_s", "hit_ttft_s", "speedup")],
}


def run_benchmark(name: str, *args: str) -> None:
    result = subprocess.run([sys.executable, BENCHMARKS / f"{name}.py", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


@pytest.mark.parametrize("name", list(TINY_RUNS))
def test_benchmark_writes_real_measurements(tmp_path, name):
    rows_file = tmp_path / "rows.jsonl"
    run_benchmark(name, *TINY_RUNS[name], "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert rows
    assert all(math.isfinite(x) and x >= 0 for row in rows for x in numbers(row))
    for row in rows:
        group = next((keys for keys in MEASURED[name] if keys[0] in row), None)
        assert group, f"{name}: a row without measurements: {row}"
        assert all(x > 0 for key in group for x in numbers(row[key])), row
    if name == "decode":
        assert {row["model"] for row in rows} >= {"transformer", "mamba2", "inter", "intra", "HF Llama", "HF Mamba2"}
    if name == "hf_models":
        assert [row["family"] for row in rows if row["what"] == "train"] == TINY_RUNS[name][1:7]
        assert [row["family"] for row in rows if row["what"] == "decode"] == ["bamba", "falconh1"]


def test_the_document_masking_benchmark_times_every_family_both_ways(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    run_benchmark("train_step", "--document-masking", "--batch", "1", "--seq", "32", "--repeats", "1",
                  "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert {row["case"] for row in rows} >= {"document masking transformer", "document masking mamba2",
                                             "document masking inter", "document masking swa"}
    assert all(row["plain_s"] > 0 and row["masked_s"] > 0 and math.isfinite(row["overhead"]) for row in rows)


def test_mqar_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "mqar"
    run_benchmark("mqar", "--families", "attention", "mamba2", "--steps", "2", "--pairs", "4", "--examples", "8", "--out", str(out))
    report = json.loads((out / "mqar.json").read_text())
    assert set(report["families"]) == {"attention", "mamba2"}
    assert (out / "mqar.md").read_text().count("| attention |") >= 1
    assert (out / "mqar.png").stat().st_size > 0


def test_the_gpu_benchmark_runs_its_sections_at_toy_size_on_the_cpu(tmp_path):
    """benchmarks/gpu.py is what a session lent a GPU runs as it is; --toy runs the same code on
    the CPU (tiny presets, float32, eager), so it is known to work before a GPU is at hand."""
    run_benchmark("gpu", "--toy", "--no-compile", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu.json").read_text())
    sections = {row["section"] for row in result["rows"]}
    assert sections == {"training", "scan", "decode"} and not result["skipped"]
    assert all(row[key] > 0 for row in result["rows"] for key in ("tokens_per_s", "ms") if key in row)
    assert {row["model"] for row in result["rows"] if row["section"] == "training"} == {
        "tiny llama", "tiny mamba2", "tiny inter", "tiny intra"}
    assert "| decode tokens/s, batch 4 |" in (tmp_path / "gpu.md").read_text()
