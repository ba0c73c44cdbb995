"""Trainer options: gradient accumulation, budgets, Ctrl-C, MoE balancing (small in-process runs)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from strata import load_config
from strata.train.trainer import plan_steps, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.context_length=32", "train.eval_every=1000", "train.eval_bytes=2048", "data.valid_fraction=0.002"]


def config(*overrides, preset="transformer"):
    return load_config(ROOT / "configs/tiny" / f"{preset}.yaml", ["data.sources=[shakespeare]", *SMALL, *overrides])


def step_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_gradient_accumulation_equals_one_bigger_batch(tmp_path):
    train(config("train.steps=4", "train.batch_size=8"), tmp_path / "big", quiet=True)
    train(config("train.steps=4", "train.batch_size=4", "train.grad_accum=2"), tmp_path / "accum", quiet=True)
    assert step_losses(tmp_path / "big") == pytest.approx(step_losses(tmp_path / "accum"), abs=1e-5)


def test_budgets_pick_the_first_reached():
    base = config("train.steps=1000")
    assert plan_steps(base, tokens_per_step=100, flops_per_token=10.0) == 1000
    assert plan_steps(config("train.steps=1000", "train.tokens=1050"), 100, 10.0) == 11
    assert plan_steps(config("train.steps=1000", "train.flops=50000"), 100, 10.0) == 50


def test_time_limit_stops_early_and_saves(tmp_path):
    result = train(config("train.steps=100000", "train.time_limit=2"), tmp_path / "run", quiet=True)
    assert result.stopped_early == "time limit" and 0 < result.step < 100000
    assert (tmp_path / "run" / "checkpoints" / f"step-{result.step:06d}").is_dir()


def test_moe_balance_bias_moves_during_training(tmp_path):
    train(config("train.steps=5", preset="intra-moe"), tmp_path / "moe", quiet=True)
    weights = load_file(str(tmp_path / "moe" / "checkpoints" / "step-000005" / "model.safetensors"))
    biases = [tensor for name, tensor in weights.items() if name.endswith("balance_bias")]
    assert biases and any(bias.abs().sum() > 0 for bias in biases)
    assert all(bias.abs().max() <= 5 * 1e-3 + 1e-9 for bias in biases)  # at most one update per step


def test_ctrl_c_saves_then_exits(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "strata.cli", "train", str(ROOT / "configs/tiny/transformer.yaml"),
               "--data", "shakespeare", "--steps", "100000", "--out", str(run), "--quiet", *SMALL]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped early: interrupted" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert (run / "checkpoints" / f"step-{max(steps):06d}").is_dir()
