"""Sweeps: expansion and budgets of sweep files, the ready sweeps' FLOPs matching, and a real
6-run sweep through the CLI that is killed with SIGKILL halfway and completed by a second run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import ROOT, strata

from strata.cli import main
from strata.config import ConfigError
from strata.data import corpus_path
from strata.experiments.budget import plan_runs
from strata.experiments.sweep import plan_sweep
from strata.experiments.sweep_spec import load_sweep

READY = sorted((ROOT / "configs/sweeps").glob("*.yaml"))

# A model small enough that one run trains, validates and evaluates in a few seconds.
TINY = """
model:
  vocab_size: 259
  d_model: 32
  layout: {layers: 4, ratio: "1:1", placement: middle, special: A, base: M}
  context_length: 64
  attention: {n_heads: 2, n_kv_heads: 1, rope: {theta: 10000.0}}
  mamba: {d_ssm: 64, d_state: 16, head_dim: 16, chunk_size: 16}
  hybrid:
    attention: {n_heads: 2, n_kv_heads: 1, head_dim: 8, rope: {theta: 10000.0}}
    mamba: {d_ssm: 32, d_state: 16, head_dim: 16, chunk_size: 16}
  ffn: {kind: swiglu, d_ffn: 64}
data: {sources: [small.txt], valid_fraction: 0.05}
train: {batch_size: 2, lr: 3.0e-3, eval_every: 4, eval_bytes: 2048, save_every: 3}
"""
GRID = """
grid:
  family:
    - {name: inter, set: {model.layout.special: A}}
    - {name: intra, set: {model.layout.special: H}}
  ratio: {key: model.layout.ratio, values: ["1:0", "1:1", "1:3"]}
"""


def write_sweep(folder: Path, text: str) -> Path:
    (folder / "tiny.yaml").write_text(TINY)
    path = folder / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", READY, ids=[path.stem for path in READY])
def test_ready_sweeps_are_flops_matched_at_every_size(path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the dry run's table, unwrapped
    sweep = load_sweep(path)
    assert set(sweep.spec.sizes) == {"cpu", "gpu"}
    for size in sweep.spec.sizes:
        _, _, runs, _, _ = plan_sweep(path, size)
        budget = sweep.budget(size)
        assert budget.kind == "flops" and len(runs) >= 4
        counted = [run.counted_flops(budget.head) for run in runs]
        assert max(counted) / min(counted) - 1 <= 0.02, (path.name, size)
        assert all(abs(flops / budget.value - 1) <= 0.01 for flops in counted)
        assert main(["sweep", str(path), "--size", size, "--dry-run"]) == 0
        printed = capsys.readouterr().out
        assert "FLOPs-matched" in printed and runs[-1].name in printed


def test_grid_names_order_and_overrides(tmp_path):
    path = write_sweep(tmp_path, "base: {config: tiny.yaml, set: {train.lr: 1.0e-3}}\n"
                                 "sizes: {small: {set: {model.layout.layers: 8}}, big: {set: {model.d_model: 64}}}\n"
                                 + GRID + "also: [{name: mamba2, set: {model.layout.ratio: '0:1'}}]\n")
    sweep = load_sweep(path)
    runs = sweep.runs(None, ["train.seed=3"])  # the first size, small, by default
    assert [run.name for run in runs] == ["inter-1to0", "inter-1to1", "inter-1to3", "intra-1to0", "intra-1to1",
                                          "intra-1to3", "mamba2"]
    assert runs[1].choices == {"family": "inter", "ratio": "1:1"} and runs[-1].choices == {}
    planned = {run.name: run for run in plan_runs(runs, None)}
    assert planned["inter-1to1"].config.model.layout == "AMAAMAMM"  # 8 layers from the size, placed in the middle
    assert planned["intra-1to3"].config.model.layout.count("H") == 2
    assert planned["mamba2"].config.model.layout == "M" * 8
    assert planned["mamba2"].config.train.lr == 1e-3 and planned["mamba2"].config.train.seed == 3
    with pytest.raises(ConfigError, match=r"sizes: no size 'huge'; known: small, big"):
        sweep.runs("huge")


@pytest.mark.parametrize("text, message", [
    (GRID.replace("special: A}", "specal: A}"), r"run inter-1to0\): model.layout.specal: unknown key"),
    (GRID.replace('"1:3"', "1:3"), r"model.layout.ratio: quote the ratio"),
    (GRID.replace("name: intra", "name: in-tra"), r"sweep.yaml: grid.family.1.name: String should match"),
    (GRID + "budget: {kind: flops}\n", r"budget.value: required"),
    (GRID.replace("values: [", "vals: ["), r"sweep.yaml: grid.ratio.values: Field required"),
    (GRID + "budget: {kind: params, value: 1000}\n", r"budget: a params budget needs `values`"),
    (GRID.replace('"1:3"', '"0:1"').replace('"1:0", ', ""), r"run intra-0to1\): the same config as run inter-0to1"),
    (GRID + "eval: {task: [x.jsonl]}\n", r"sweep.yaml: eval: task: unknown key"),
    (GRID + "eval: {tasks: [$STRATA_NO_SUCH_VAR/x.jsonl]}\n", r"eval.tasks: .* names an environment variable that is not set"),
])
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = write_sweep(tmp_path, "base: {config: tiny.yaml}\n" + text)
    with pytest.raises(ConfigError, match=message):
        plan_sweep(path, None)


def test_budgets_set_the_steps(tmp_path):
    base = "base: {config: tiny.yaml}\n" + GRID
    _, _, runs, _, _ = plan_sweep(write_sweep(tmp_path, base + "budget: {kind: flops, value: 3.0e9}\n"), None)
    assert all(abs(run.flops / 3e9 - 1) < 0.01 for run in runs)
    assert runs[0].steps > runs[-1].steps  # attention blocks are cheaper here: more steps
    assert all(run.config.train.steps == run.steps and run.config.train.flops is None for run in runs)

    with pytest.raises(ConfigError, match=r"run intra-1to3\): budget.value: 1e\+08 FLOPs is too small.*give at least 2.8e\+09"):
        plan_sweep(write_sweep(tmp_path, base + "budget: {kind: flops, value: 1.0e8}\n"), None)

    _, _, runs, _, _ = plan_sweep(write_sweep(tmp_path, base + "budget: {kind: tokens, value: 1280}\n"), None)
    assert {run.steps for run in runs} == {10} and {run.tokens for run in runs} == {1280}

    params = base + "budget: {kind: params, value: 60000, key: model.ffn.d_ffn, values: [32, 64, 128, 256]}\n"
    _, _, runs, _, _ = plan_sweep(write_sweep(tmp_path, params), None)
    for run in runs:  # the candidate nearest the budget, checked against every other candidate
        chosen = run.matched["model.ffn.d_ffn"]
        assert run.config.model.ffn.d_ffn == chosen
        per_ffn_unit = 3 * 32 * 4  # three matrices of d_model x d_ffn in each of 4 blocks
        others = [run.cost.non_embedding_params + (value - chosen) * per_ffn_unit for value in (32, 64, 128, 256)]
        assert abs(run.cost.non_embedding_params - 60000) == min(abs(n - 60000) for n in others)


def test_a_folder_resumes_across_a_key_added_with_a_default_but_not_a_changed_config(tmp_path):
    """A plan written before ``model.hybrid.branches`` existed still matches today's run; a plan
    whose config really differs is refused, naming the key."""
    from rich.console import Console

    from strata.experiments.sweep import _prepare

    sweep, size, runs, evaluation, mqar = plan_sweep(write_sweep(tmp_path, "base: {config: tiny.yaml}\n" + GRID), None)
    run, run_dir, console = runs[-1], tmp_path / "out" / runs[-1].name, Console(quiet=True)
    _prepare(run_dir, run, evaluation, mqar, sweep, size, console)
    plan = json.loads((run_dir / "plan.json").read_text())
    del plan["config"]["model"]["hybrid"]["branches"]  # as an older strata wrote it
    (run_dir / "plan.json").write_text(json.dumps(plan))
    _prepare(run_dir, run, evaluation, mqar, sweep, size, console)

    plan["config"]["model"]["d_model"] = 48
    (run_dir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=r"was started with another config \(config\.model\.d_model: 48 then, 32 now\)"):
        _prepare(run_dir, run, evaluation, mqar, sweep, size, console)


def _finished(out: Path) -> list[str]:
    return sorted(path.parent.name for path in out.glob("*/done.json"))


def test_killed_sweep_completes_only_the_missing_runs_then_reports(tmp_path):
    (tmp_path / "small.txt").write_bytes(corpus_path("shakespeare").read_bytes()[:60000])
    sweep = write_sweep(tmp_path, "description: tiny test sweep\nbase: {config: tiny.yaml}\n" + GRID
                        + "budget: {kind: flops, value: 3.0e9}\n"
                        + "eval: {data: [small.txt], decode: {new: 8, repeats: 1, context: 32}}\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "strata", "sweep", str(sweep), "--out", str(out)]
    # Its own process group, so that SIGKILL takes the sweep and the run it is training at once.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while True:
            # One run finished, another with a checkpoint halfway: kill them all now.
            started = [path for path in out.glob("*/checkpoints/step-*") if not (path.parents[1] / "done.json").exists()]
            if _finished(out) and started:
                break
            assert process.poll() is None, "the sweep ended before it could be killed halfway"
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _finished(out)
    assert 1 <= len(before) < 6
    killed = started[0].parents[1]
    stamps = {name: [(out / name / file).stat().st_mtime_ns for file in ("metrics.jsonl", "done.json")] for name in before}

    again = subprocess.run([*command, "--jobs", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"skipping {len(before)} finished" in again.stdout
    assert _finished(out) == sorted(["inter-1to0", "inter-1to1", "inter-1to3", "intra-1to0", "intra-1to1", "intra-1to3"])
    for name in before:  # untouched: not trained or evaluated again
        assert [(out / name / file).stat().st_mtime_ns for file in ("metrics.jsonl", "done.json")] == stamps[name]
    assert "resuming from step" in (killed / "log.txt").read_text()
    plan = json.loads((killed / "plan.json").read_text())
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, plan["steps"] + 1))  # each step once: the resumed run continued exactly
    for name in _finished(out):
        evals = {path.stem for path in (out / name / "evals").glob("*.json")}
        assert evals == {"heldout", "decode"}

    report = strata("report", out)
    table = (out / "report.md").read_text()
    assert "| run | family | ratio | blocks | params |" in table and "decode tok/s (this machine)" in table
    assert all(f"| {name} | " in table for name in _finished(out))
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("run,family,ratio,blocks")
    plots = sorted(out.glob("*.png"))
    assert len(plots) >= 3
    from matplotlib.image import imread

    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(plot).shape[0] > 100
    assert "inter-1to0" in report.stdout.decode()
